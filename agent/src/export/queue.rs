//! The bounded export queue between the reader and the exporter.
//!
//! The reader never blocks on it: a push that would exceed the item limit or
//! the memory cap drops the oldest requests first and counts them (per engine
//! and in total). One item is one request: its validated record, encoded into
//! spans only when its batch is sent (a queued request holds ~300 bytes, not
//! the ~1.4 KiB of its encoded spans).

use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::spans::{self, SpanContext};
use crate::pipeline::stalls::Stall;
use ringside_shm_protocol::{Detail, RequestRecord};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One request to export, with the engine it belongs to.
#[derive(Debug)]
pub struct Item {
    /// The engine.
    pub engine: Arc<EngineHandle>,
    /// How the engine's records become spans.
    pub ctx: Arc<SpanContext>,
    /// The validated record.
    pub record: RequestRecord,
    /// Request span only, or with its phases.
    pub detail: Detail,
    /// Spans it becomes.
    pub spans: usize,
    /// Memory held.
    pub bytes: usize,
    /// Stalls the agent saw in the engine's in-flight table while the request
    /// ran (usually none: then nothing is allocated).
    pub stalls: Box<[Stall]>,
}

impl Item {
    /// One request of `engine`.
    pub fn new(
        engine: Arc<EngineHandle>,
        ctx: Arc<SpanContext>,
        record: RequestRecord,
        detail: Detail,
    ) -> Self {
        Self {
            engine,
            ctx,
            spans: spans::span_count(&record, detail),
            record,
            detail,
            bytes: std::mem::size_of::<Self>(),
            stalls: Box::default(),
        }
    }

    /// The same, carrying the request's stalls as span events.
    pub fn with_stalls(mut self, stalls: Vec<Stall>) -> Self {
        self.bytes += stalls.len() * std::mem::size_of::<Stall>();
        self.stalls = stalls.into_boxed_slice();
        self
    }
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Item>,
    bytes: usize,
    spans: usize,
}

/// A bounded FIFO of [`Item`]s with a memory cap.
#[derive(Debug)]
pub struct ExportQueue {
    state: Mutex<State>,
    max_items: usize,
    max_bytes: usize,
    /// Requests dropped because the queue was full, in total.
    pub dropped: AtomicU64,
    /// Wakes the exporter when a batch is ready.
    pub ready: tokio::sync::Notify,
    batch_spans: usize,
}

impl ExportQueue {
    /// A queue holding at most `max_items` requests and `max_bytes` bytes;
    /// the exporter is woken once `batch_spans` spans are queued.
    pub fn new(max_items: usize, max_bytes: usize, batch_spans: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_items: max_items.max(1),
            max_bytes: max_bytes.max(1),
            dropped: AtomicU64::new(0),
            ready: tokio::sync::Notify::new(),
            batch_spans: batch_spans.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a
        // way that matters more than losing the agent: keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends an item, dropping the oldest ones (counted) while the queue is
    /// over its limits. Returns how many were dropped.
    pub fn push(&self, item: Item) -> u64 {
        self.push_all(std::iter::once(item))
    }

    /// Appends items under one lock, dropping the oldest ones (counted) while
    /// the queue is over its limits. Returns how many were dropped.
    pub fn push_all(&self, items: impl IntoIterator<Item = Item>) -> u64 {
        let mut dropped = 0;
        let wake;
        {
            let mut state = self.lock();
            for item in items {
                // Room first, then the push: the deque never grows past
                // `max_items` (no doubling of its buffer under overload).
                while state.items.len() >= self.max_items
                    || (state.bytes + item.bytes > self.max_bytes && !state.items.is_empty())
                {
                    let Some(old) = state.items.pop_front() else {
                        break;
                    };
                    state.bytes -= old.bytes;
                    state.spans -= old.spans;
                    EngineStats::add(&old.engine.stats.queue_dropped, 1);
                    dropped += 1;
                }
                state.bytes += item.bytes;
                state.spans += item.spans;
                state.items.push_back(item);
            }
            wake = state.spans >= self.batch_spans;
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if wake {
            self.ready.notify_one();
        }
        dropped
    }

    /// Takes whole items, oldest first, until about `max_spans` spans (at
    /// least one item if any is queued).
    pub fn take(&self, max_spans: usize) -> Vec<Item> {
        let mut state = self.lock();
        let mut out = Vec::new();
        let mut spans = 0;
        while let Some(front) = state.items.front() {
            if !out.is_empty() && spans + front.spans > max_spans {
                break;
            }
            let Some(item) = state.items.pop_front() else {
                break;
            };
            spans += item.spans;
            state.bytes -= item.bytes;
            state.spans -= item.spans;
            out.push(item);
        }
        out
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spans queued.
    pub fn spans(&self) -> usize {
        self.lock().spans
    }

    /// Bytes queued (estimate).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn engine(name: &str) -> Arc<EngineHandle> {
        Arc::new(EngineHandle {
            id: 0,
            instance: name.into(),
            pid: 1,
            resource: Resource::default(),
            stats: EngineStats::default(),
        })
    }

    /// A request of `engine` with 4 spans (`Detail::Phases`) or 1, tagged
    /// in its request id.
    fn item(engine: &Arc<EngineHandle>, n: usize, tag: u8) -> Item {
        let mut record = crate::pipeline::spans::tests::raw_record(u64::from(tag))
            .decode(1)
            .unwrap();
        record.request_id[0] = tag;
        let detail = if n == 4 {
            Detail::Phases
        } else {
            Detail::Request
        };
        let ctx = Arc::new(crate::pipeline::spans::tests::ctx(
            crate::pipeline::spans::AttributeSet::Both,
        ));
        let item = Item::new(Arc::clone(engine), ctx, record, detail);
        assert_eq!(item.spans, n);
        item
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_them_per_engine() {
        let a = engine("a");
        let b = engine("b");
        let q = ExportQueue::new(3, usize::MAX, 100);
        for tag in 0..5u8 {
            let e = if tag % 2 == 0 { &a } else { &b };
            q.push(item(e, 4, tag));
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        // Items 0 (a) and 1 (b) were the oldest.
        assert_eq!(a.stats.snapshot().queue_dropped, 1);
        assert_eq!(b.stats.snapshot().queue_dropped, 1);
        let taken = q.take(usize::MAX);
        let tags: Vec<u8> = taken.iter().map(|i| i.record.request_id[0]).collect();
        assert_eq!(tags, [2, 3, 4]);
        assert_eq!(q.spans(), 0);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn the_memory_cap_bounds_the_queue() {
        let a = engine("a");
        let one = item(&a, 4, 0).bytes;
        let q = ExportQueue::new(usize::MAX, one * 10, 1);
        for tag in 0..100u8 {
            q.push(item(&a, 4, tag));
            assert!(q.bytes() <= one * 10);
        }
        assert_eq!(q.len(), 10);
        assert_eq!(a.stats.snapshot().queue_dropped, 90);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 90);
    }

    #[test]
    fn take_respects_the_batch_size_in_whole_requests() {
        let a = engine("a");
        let q = ExportQueue::new(100, usize::MAX, 100);
        for tag in 0..5u8 {
            q.push(item(&a, 4, tag));
        }
        assert_eq!(q.take(8).len(), 2);
        assert_eq!(q.take(3).len(), 1, "at least one item even if larger");
        assert_eq!(q.take(100).len(), 2);
        assert!(q.take(100).is_empty());
        assert!(q.is_empty());
    }
}
