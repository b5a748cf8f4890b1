//! The bounded export queue between the reader and the exporter.
//!
//! The reader never blocks on it: a push that would exceed the item limit or
//! the memory cap drops the oldest requests first and counts them (per engine
//! and in total). One item is one request: its validated record, encoded into
//! spans only when its batch is sent (a queued request holds ~300 bytes, not
//! the ~1.4 KiB of its encoded spans).
//!
//! Delivery progress: the items the reader hands on from one poll of one
//! ring form a poll batch ([`PollBatches::open`]); each holds a
//! [`DeliveryToken`] of it, released when the item is dropped: exported,
//! failed for good, dropped by this queue, or counted failed at the shutdown
//! deadline (every end of an item is counted before the item is dropped).
//! The reader commits the ring's read cursor only up to the first record of
//! the oldest batch with a token still held ([`PollBatches::commit_point`]),
//! so an agent killed with records read but not delivered leaves them to its
//! successor. A SIGKILL runs no destructor: nothing undelivered is released.

use crate::capture::CaptureReason;
use crate::pipeline::accounting::{EngineHandle, EngineStats};
use crate::pipeline::sampling::SpanSampling;
use crate::pipeline::spans::{self, SpanContext};
use crate::pipeline::stalls::Stall;
use crate::pipeline::steps::RequestSteps;
use ringside_shm_protocol::{Detail, RequestRecord};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// How its spans are marked for downstream samplers.
    pub sampling: SpanSampling,
    /// Its inter-token gaps and batch context, when the engine's steps were
    /// joined to it.
    pub steps: Option<RequestSteps>,
    /// Its share of the poll batch it was read in (None: not from a ring the
    /// reader tracks, e.g. in tests and benchmarks).
    pub delivery: Option<DeliveryToken>,
    /// Why it was captured, when it is part of an incident capture: each of
    /// its spans then carries `ringside.capture.reason`.
    pub capture: Option<CaptureReason>,
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
            sampling: SpanSampling::default(),
            steps: None,
            delivery: None,
            capture: None,
        }
    }

    /// The same, as part of an incident capture for `reason`.
    #[must_use]
    pub fn with_capture(mut self, reason: CaptureReason) -> Self {
        self.capture = Some(reason);
        self
    }

    /// The same, with the sampling decision's marks.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SpanSampling) -> Self {
        self.sampling = sampling;
        self
    }

    /// The same, carrying the request's stalls as span events.
    pub fn with_stalls(mut self, stalls: Vec<Stall>) -> Self {
        self.bytes += stalls.len() * std::mem::size_of::<Stall>();
        self.stalls = stalls.into_boxed_slice();
        self
    }
}

/// One poll batch, shared by its items' tokens and the reader.
#[derive(Debug)]
struct PollBatch {
    /// Tokens not yet released.
    remaining: AtomicUsize,
    /// The reader, woken when the last token is released (so that the
    /// cursor is committed right after the export, not a poll later).
    reader: std::thread::Thread,
}

/// An item's share of its poll batch; dropping it releases the share.
#[derive(Debug)]
pub struct DeliveryToken(Arc<PollBatch>);

impl Drop for DeliveryToken {
    fn drop(&mut self) {
        // Release: whatever happened to the item (its export, its counting)
        // happens before the reader, loading with Acquire, commits past it.
        if self.0.remaining.fetch_sub(1, Ordering::Release) == 1 {
            self.0.reader.unpark();
        }
    }
}

/// The unfinished poll batches of one ring, oldest first: where its read
/// cursor may be committed.
#[derive(Debug, Default)]
pub struct PollBatches {
    /// (ticket of the batch's first item, the batch).
    unfinished: VecDeque<(u64, Arc<PollBatch>)>,
    /// Length at which finished batches behind an unfinished one are
    /// removed (amortised: twice the length after the last removal).
    compact_at: usize,
}

impl PollBatches {
    /// Opens a batch whose first item is the record of ticket `first`, with
    /// exactly `n` tokens (one per item; `n > 0`). The reader that calls it
    /// is woken when the last one is released.
    pub fn open(&mut self, first: u64, n: usize) -> impl Iterator<Item = DeliveryToken> + use<> {
        let batch = Arc::new(PollBatch {
            remaining: AtomicUsize::new(n),
            reader: std::thread::current(),
        });
        self.unfinished.push_back((first, Arc::clone(&batch)));
        std::iter::repeat_n(batch, n).map(DeliveryToken)
    }

    /// The ticket the read cursor may be committed to, given the consumer's
    /// cursor (everything below it read): the first item of the oldest
    /// unfinished batch, else `cursor`. Never decreases while `cursor` does
    /// not.
    pub fn commit_point(&mut self, cursor: u64) -> u64 {
        let done = |b: &PollBatch| b.remaining.load(Ordering::Acquire) == 0;
        while self.unfinished.front().is_some_and(|(_, b)| done(b)) {
            self.unfinished.pop_front();
        }
        if self.unfinished.len() >= self.compact_at.max(64) {
            // Batches finished out of order behind an unfinished one: only
            // the unfinished ones decide the commit point.
            self.unfinished.retain(|(_, b)| !done(b));
            self.compact_at = self.unfinished.len() * 2;
        }
        self.unfinished.front().map_or(cursor, |(first, _)| *first)
    }

    /// Whether any batch still has an item queued or in flight.
    pub fn is_empty(&self) -> bool {
        self.unfinished
            .iter()
            .all(|(_, b)| b.remaining.load(Ordering::Acquire) == 0)
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

    /// `n` items of a poll batch whose first record is ticket `first`.
    fn batch(batches: &mut PollBatches, a: &Arc<EngineHandle>, first: u64, n: u8) -> Vec<Item> {
        let mut items: Vec<Item> = (0..n).map(|t| item(a, 1, t)).collect();
        for (item, token) in items.iter_mut().zip(batches.open(first, usize::from(n))) {
            item.delivery = Some(token);
        }
        items
    }

    #[test]
    fn the_cursor_stays_at_the_oldest_unsettled_poll_batch_and_advances_as_items_are_dropped() {
        let a = engine("a");
        let mut batches = PollBatches::default();
        assert_eq!(batches.commit_point(7), 7, "nothing queued: the cursor");
        let mut first = batch(&mut batches, &a, 10, 3);
        let second = batch(&mut batches, &a, 20, 2);
        let mut third = batch(&mut batches, &a, 25, 1);
        assert_eq!(batches.commit_point(30), 10);
        assert!(!batches.is_empty());
        // Out of order: the second batch settles first; the cursor waits.
        drop(second);
        assert_eq!(batches.commit_point(30), 10);
        // Two of the first batch's three: still waiting for the third.
        first.truncate(1);
        assert_eq!(batches.commit_point(30), 10);
        drop(first);
        // The first and second settled: the third's first record.
        assert_eq!(batches.commit_point(30), 25);
        drop(third.pop());
        assert_eq!(batches.commit_point(30), 30, "all settled: the cursor");
        assert!(batches.is_empty());
    }

    #[test]
    fn items_dropped_by_the_queue_or_taken_and_dropped_settle_their_batch() {
        let a = engine("a");
        let mut batches = PollBatches::default();
        let q = ExportQueue::new(2, usize::MAX, 100);
        q.push_all(batch(&mut batches, &a, 0, 2));
        q.push_all(batch(&mut batches, &a, 2, 2));
        // The overflow dropped the first batch (counted): settled.
        assert_eq!(a.stats.snapshot().queue_dropped, 2);
        assert_eq!(batches.commit_point(4), 2);
        // Taken by the exporter: not settled until it is done with them.
        let taken = q.take(usize::MAX);
        assert_eq!(batches.commit_point(4), 2);
        drop(taken);
        assert_eq!(batches.commit_point(4), 4);
    }

    #[test]
    fn batches_settled_behind_an_unsettled_one_do_not_pile_up() {
        let a = engine("a");
        let mut batches = PollBatches::default();
        let held = batch(&mut batches, &a, 0, 1);
        for t in 1..10_000u64 {
            drop(batch(&mut batches, &a, t, 1));
            assert_eq!(batches.commit_point(t + 1), 0);
            assert!(
                batches.unfinished.len() <= 128,
                "{}",
                batches.unfinished.len()
            );
        }
        drop(held);
        assert_eq!(batches.commit_point(10_000), 10_000);
        assert!(batches.unfinished.is_empty());
    }

    #[test]
    fn the_last_settled_item_wakes_the_reader() {
        let a = engine("a");
        let mut batches = PollBatches::default();
        let items = batch(&mut batches, &a, 0, 3);
        let exporter = std::thread::spawn(move || drop(items));
        // Woken by the drop (a timeout would leave it unsettled here only if
        // the wake-up were missing and the drop slow).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while batches.commit_point(3) != 3 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::park_timeout(std::time::Duration::from_secs(1));
        }
        exporter.join().unwrap();
    }
}
