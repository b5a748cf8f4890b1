//! The inference thread and its continuous-batching scheduler.
//!
//! One OS thread owns the llama.cpp context. It keeps up to `--parallel` sequences ("slots"),
//! each with its own llama.cpp sequence id and KV stream. Every step:
//!
//! 1. decodes the next token of every decoding sequence: one `llama_decode` per fixed group of
//!    consecutive slots that has one (`decode_groups`), idle members carrying a placeholder
//!    token that is removed right after,
//! 2. then computes prompt chunks of prefilling sequences, oldest first, up to `--batch-size`
//!    tokens in all, one sequence per call, each chunk ending at the next multiple of
//!    `PROMPT_CHUNK` (or the prompt's end), so a long prompt is spread over several steps,
//!
//! samples after each call and streams text to the request's channel. Between steps it admits
//! queued requests into free slots (continuous batching) and notices closed response channels
//! (client gone: abort). A finished or aborted sequence frees its slot immediately.
//!
//! Why the calls are shaped this way (issue 12, engine/README.md *Reproducible sampling*):
//! llama.cpp's CPU kernels choose a path, and so a rounding, from the micro-batch's shape.
//! With every decode row in a group of one fixed kernel class and every prompt computed in the
//! same chunks whatever was reused, a request's logits depend on its own tokens only:
//! identical requests sample identical text, with the prompt cache and under any load.
//!
//! Prompt cache: a freed slot keeps the KV of the prompt it computed (the generated part is
//! removed). A new request goes to the free slot whose kept prompt shares the longest prefix
//! with its own and skips that prefix's whole chunks: a conversation's next turn, or a repeated
//! system prompt, costs only its new tokens (and < one chunk). The reused count is the
//! request's `cached_tokens`. Kept only while the slot's KV still holds every position from 0
//! (a sliding-window layer may have let early ones go on a long prompt).
//!
//! Admission is bounded: at most `--parallel + --max-queue` requests are admitted at once; the
//! HTTP layer answers 429 beyond that.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use ringside_shm_protocol as shm;
use tokio::sync::mpsc::UnboundedSender;

use crate::clock::now_ns;
use crate::metrics::Metrics;
use crate::model::{Loaded, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopOutcome, Utf8Assembler};
pub use crate::telemetry::TraceIds;
use crate::telemetry::inflight::{Admission, Tracked, Tracker};
use crate::telemetry::{
    ErrorKind, FinishReason, Operation, OutcomeKind, RequestOutcome, SamplingRecord, Telemetry,
};

/// Scheduler settings.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Slots: sequences decoded together.
    pub parallel: u32,
    /// Context per sequence, in tokens.
    pub ctx_size: NonZeroU32,
    /// Most tokens per decode step.
    pub batch_size: u32,
    /// llama.cpp threads.
    pub threads: u32,
    /// Requests that may wait for a slot.
    pub max_queue: usize,
    /// Reuse a freed slot's prompt KV for a request sharing its prefix.
    pub prompt_cache: bool,
}

/// A request handed to the inference thread.
#[derive(Debug)]
pub struct Job {
    /// 128-bit request id.
    pub request_id: [u8; 16],
    /// Chat or text completion.
    pub operation: Operation,
    /// Trace identity.
    pub trace: TraceIds,
    /// Monotonic arrival stamp.
    pub t_arrival_ns: u64,
    /// Queue depth when the request arrived.
    pub queue_depth_at_arrival: u16,
    /// Prompt tokens (non-empty, shorter than the per-sequence context).
    pub prompt: Vec<LlamaToken>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Token limit requested (`None`: until the context is full).
    pub max_tokens: Option<u32>,
    /// Which parameters the caller set.
    pub params_set: u16,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Streamed response.
    pub stream: bool,
    /// Index of the served model name.
    pub model_index: u16,
    /// Where text and the end of the request go. Closed = client gone.
    pub events: UnboundedSender<Event>,
    /// The request's in-flight table entry; set by [`SchedulerHandle::submit`].
    pub inflight: Option<Tracked>,
}

/// Token accounting of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens (end-of-generation tokens excluded).
    pub completion_tokens: u32,
    /// Prompt tokens reused from the KV cache.
    pub cached_prompt_tokens: u32,
}

/// What the inference thread tells a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// More completion text.
    Text(String),
    /// Generation ended normally (`stop` or `length`).
    Done {
        /// `Stop` or `Length`.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The engine failed the request.
    Failed(String),
    /// The engine ended the request unfinished (the shutdown deadline): 503.
    Aborted(String),
}

/// Why a request could not be handed to the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// All slots are busy and the queue is full.
    #[error("queue full")]
    QueueFull,
    /// The inference thread has stopped.
    #[error("the inference thread has stopped")]
    Stopped,
}

/// Why the inference thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// llama.cpp could not create the context.
    #[error("llama.cpp could not create a context of {n_ctx} tokens: {source}")]
    Context {
        /// Tokens requested.
        n_ctx: u32,
        /// llama.cpp's error.
        source: llama_cpp_2::LlamaContextLoadError,
    },
    /// `ctx-size × parallel` does not fit in 32 bits.
    #[error("--ctx-size × --parallel is too large")]
    ContextTooLarge,
    /// The OS refused to start the thread.
    #[error("could not spawn the inference thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The thread ended before reporting.
    #[error("the inference thread ended during start-up")]
    Died,
}

/// The HTTP side's handle on the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    /// Tokens of context per sequence (prompt + completion).
    pub n_ctx_seq: u32,
}

#[derive(Debug)]
struct Shared {
    admitted: AtomicUsize,
    /// Set at the shutdown deadline: everything admitted ends as 503, nothing more is.
    abort: AtomicBool,
    limit: usize,
    metrics: Arc<Metrics>,
    tracker: Tracker,
}

impl SchedulerHandle {
    /// Requests waiting for a slot right now.
    #[must_use]
    pub fn queue_depth(&self) -> usize {
        self.shared.metrics.queue_depth.load(Ordering::Relaxed)
    }

    /// Requests admitted and not ended (queued or running).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.shared.admitted.load(Ordering::Acquire)
    }

    /// Ends every admitted request as 503 (recorded, the client told) between two decode
    /// steps, and refuses new ones: the shutdown deadline.
    pub fn abort_all(&self) {
        self.shared.abort.store(true, Ordering::Release);
    }

    /// Admits `job`, or refuses it when `parallel + max_queue` requests are already admitted.
    ///
    /// # Errors
    /// [`SubmitError::QueueFull`] (429) or [`SubmitError::Stopped`] (503); the job is dropped.
    pub fn submit(&self, mut job: Job) -> Result<(), SubmitError> {
        if self.shared.abort.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        let limit = self.shared.limit;
        self.shared
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| SubmitError::QueueFull)?;
        self.shared
            .metrics
            .queue_depth
            .fetch_add(1, Ordering::Relaxed);
        // Admitted: visible in the in-flight table from now on. An entry is freed before the
        // admission it belongs to is given back, so a table of `parallel + max_queue` entries
        // always has room here.
        job.inflight = self.shared.tracker.admit(
            &Admission {
                request_id: job.request_id,
                trace: job.trace,
                operation: job.operation,
                t_arrival_ns: job.t_arrival_ns,
                prompt_tokens: saturate_u32(job.prompt.len()),
                max_tokens: job.max_tokens.unwrap_or(0),
                stream: job.stream,
                model_index: job.model_index,
            },
            now_ns(),
        );
        self.tx.send(job).map_err(|mpsc::SendError(mut job)| {
            if let Some(tracked) = job.inflight.take() {
                tracked.release();
            }
            self.shared.admitted.fetch_sub(1, Ordering::AcqRel);
            self.shared
                .metrics
                .queue_depth
                .fetch_sub(1, Ordering::Relaxed);
            SubmitError::Stopped
        })
    }
}

/// Starts the inference thread on a loaded model; returns once its context exists, with the
/// thread's join handle. The thread ends when every [`SchedulerHandle`] is dropped and the
/// admitted requests are done.
///
/// # Errors
/// See [`StartError`].
pub fn start(
    loaded: Loaded,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    telemetry: Telemetry,
) -> Result<(SchedulerHandle, std::thread::JoinHandle<()>), StartError> {
    let n_ctx = config
        .ctx_size
        .get()
        .checked_mul(config.parallel)
        .ok_or(StartError::ContextTooLarge)?;
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<u32, StartError>>(1);
    let shared = Arc::new(Shared {
        admitted: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        limit: (config.parallel as usize).saturating_add(config.max_queue),
        metrics: Arc::clone(&metrics),
        tracker: telemetry.tracker(),
    });
    metrics
        .slots
        .store(config.parallel as usize, Ordering::Relaxed);
    metrics.max_queue.store(config.max_queue, Ordering::Relaxed);
    let thread_shared = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("inference".to_owned())
        .spawn(move || {
            let Loaded { backend, model } = loaded;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n_ctx))
                .with_n_batch(config.batch_size)
                .with_n_ubatch(config.batch_size)
                .with_n_seq_max(config.parallel)
                .with_kv_unified(false)
                .with_swa_full(false)
                .with_n_threads(i32::try_from(config.threads).unwrap_or(i32::MAX))
                .with_n_threads_batch(i32::try_from(config.threads).unwrap_or(i32::MAX));
            let ctx = match model.llama.new_context(&backend, params) {
                Ok(ctx) => ctx,
                Err(source) => {
                    let _ = ready_tx.send(Err(StartError::Context { n_ctx, source }));
                    return;
                }
            };
            let n_ctx_seq = ctx.n_ctx() / config.parallel.max(1);
            if ready_tx.send(Ok(n_ctx_seq)).is_err() {
                return;
            }
            let mut engine = Engine::new(&model, ctx, config, n_ctx_seq, thread_shared, telemetry);
            engine.run(&rx);
            tracing::info!("inference thread stopped");
        })
        .map_err(StartError::Spawn)?;
    let n_ctx_seq = ready_rx.recv().map_err(|_| StartError::Died)??;
    Ok((
        SchedulerHandle {
            tx,
            shared,
            n_ctx_seq,
        },
        thread,
    ))
}

struct Slot {
    job: Job,
    seq: i32,
    fed: usize,
    n_past: i32,
    pending_token: Option<LlamaToken>,
    generated: u32,
    max_tokens: u32,
    sampler: Sampler,
    utf8: Utf8Assembler,
    stop: StopMatcher,
    t_scheduled: u64,
    t_first: u64,
    t_last: u64,
    running_at_schedule: u16,
    /// Prompt tokens taken from the slot's KV cache instead of computed.
    cached_prompt: u32,
}

struct Engine<'m> {
    model: &'m Model,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    batch_size: usize,
    slots: Vec<Option<Slot>>,
    pending: VecDeque<Job>,
    n_ctx_seq: u32,
    shared: Arc<Shared>,
    telemetry: Telemetry,
    piece: Vec<u8>,
    prompt_cache: bool,
    /// Per slot: the tokens its KV stream holds from position 0 while it is free.
    kept: Vec<Vec<LlamaToken>>,
    /// The fixed groups of consecutive slots whose next tokens are decoded together.
    groups: Vec<std::ops::Range<usize>>,
    /// Prompt chunk size: prompts are computed in chunks that start at its multiples.
    chunk: usize,
    /// Scratch of `decode_group`, kept so a step allocates nothing: (sequence, position) of
    /// each placeholder row, and (slot, batch index) of each real row.
    placeholders: Vec<(usize, usize)>,
    outputs: Vec<(usize, i32)>,
    /// Scratch of `step`: the prefilling slots, oldest first.
    prefill_order: Vec<usize>,
    /// What the current step did, for its step record; reset at each step's start.
    current: shm::Step,
    /// Requests that ended during the current step, recorded after its step record (so a
    /// reader that has a request's record already has every step that carried it), each
    /// with its in-flight entry, released right after its record is pushed. At most one per
    /// slot per step: the capacity is `--parallel`, so pushing never allocates.
    ended: Vec<(RequestOutcome, Option<Tracked>)>,
}

/// The token a group's idle sequence carries through a decode call; its KV is removed after.
const PLACEHOLDER: LlamaToken = LlamaToken(0);

/// Most tokens in a prompt chunk (below `--batch-size`): the prompt cache reuses whole chunks.
const PROMPT_CHUNK: usize = 64;

/// Splits `parallel` slots into the fixed groups decoded together: consecutive slots (llama.cpp
/// puts only consecutive sequence ids into one micro-batch) and group sizes that give every
/// row the same kernels — all multiples of 4 rows (repacked Q4_K weights go through the 4-row
/// GEMM kernel) or all 2–3 rows (the one-row GEMV kernel; at least two sequences, so attention
/// never takes the path llama.cpp keeps for a lone token). One slot: one row, always.
fn decode_groups(parallel: usize) -> Vec<std::ops::Range<usize>> {
    let sizes: Vec<usize> = match parallel {
        0 => Vec::new(),
        1 => vec![1],
        p if p % 4 == 0 => vec![4; p / 4],
        p => match p % 3 {
            0 => vec![3; p / 3],
            2 => std::iter::once(2).chain(vec![3; p / 3]).collect(),
            _ => [2, 2].into_iter().chain(vec![3; (p - 4) / 3]).collect(),
        },
    };
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect()
}

fn saturate_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn saturate_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl<'m> Engine<'m> {
    fn new(
        model: &'m Model,
        ctx: LlamaContext<'m>,
        config: SchedulerConfig,
        n_ctx_seq: u32,
        shared: Arc<Shared>,
        telemetry: Telemetry,
    ) -> Self {
        let batch_size = config.batch_size.max(config.parallel) as usize;
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(batch_size, 1),
            batch_size,
            slots: (0..config.parallel).map(|_| None).collect(),
            pending: VecDeque::new(),
            n_ctx_seq,
            shared,
            telemetry,
            piece: Vec::with_capacity(64),
            prompt_cache: config.prompt_cache,
            kept: (0..config.parallel).map(|_| Vec::new()).collect(),
            groups: decode_groups(config.parallel as usize),
            chunk: PROMPT_CHUNK.min(batch_size).max(1),
            placeholders: Vec::with_capacity(config.parallel as usize),
            outputs: Vec::with_capacity(config.parallel as usize),
            prefill_order: Vec::with_capacity(config.parallel as usize),
            current: shm::Step::default(),
            ended: Vec::with_capacity(config.parallel as usize),
        }
    }

    /// The free slot to run `prompt` in: the one whose kept tokens share the longest prefix
    /// with it (the lowest index on a tie), and that prefix's length.
    fn pick_slot(&self, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| {
                let shared = if self.prompt_cache {
                    common_prefix(&self.kept[i], prompt)
                } else {
                    0
                };
                (i, shared)
            })
            .max_by_key(|&(i, shared)| (shared, std::cmp::Reverse(i)))
    }

    /// Prepares slot `i`'s KV stream for a prompt sharing `shared` tokens with what it keeps;
    /// returns how many prompt tokens it can skip: whole chunks only, so that what follows is
    /// computed in exactly the chunks a fresh request computes, and never the last prompt token
    /// (its logits give the first output token).
    fn reuse_prefix(&mut self, i: usize, shared: usize, prompt_len: usize) -> usize {
        let reuse = shared.min(prompt_len.saturating_sub(1)) / self.chunk * self.chunk;
        let seq = u32::try_from(i).ok();
        let seq_id = i32::try_from(i).unwrap_or(i32::MAX);
        let trimmed = reuse > 0
            && self
                .ctx
                .clear_kv_cache_seq(seq, u32::try_from(reuse).ok(), None)
                .unwrap_or(false)
            // Every reused position must still be there (a sliding-window cache drops old
            // ones once a prompt outgrows the window).
            && self.ctx.kv_cache_seq_pos_min(seq_id) == 0
            && usize::try_from(self.ctx.kv_cache_seq_pos_max(seq_id)).ok() == Some(reuse - 1);
        self.kept[i].clear();
        if trimmed {
            reuse
        } else {
            let _ = self.ctx.clear_kv_cache_seq(seq, None, None);
            0
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn run(&mut self, rx: &mpsc::Receiver<Job>) {
        loop {
            if self.running() == 0 && self.pending.is_empty() {
                match rx.recv() {
                    Ok(job) => self.pending.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(job) => self.pending.push_back(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.running() == 0 && self.pending.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            if self.shared.abort.load(Ordering::Acquire) {
                self.abort_all();
                self.record_ended();
            }
            self.drop_abandoned();
            self.schedule();
            self.step();
            self.record_ended();
        }
    }

    /// Records the requests that ended since the last call, then releases their in-flight
    /// entries (a record first: a crash in between leaves the request in the ring or in the
    /// table, never in neither).
    fn record_ended(&mut self) {
        for (outcome, tracked) in self.ended.drain(..) {
            self.telemetry.record(&outcome);
            if let Some(tracked) = tracked {
                tracked.release();
            }
        }
    }

    /// The shutdown deadline: every running and queued request ends as 503.
    fn abort_all(&mut self) {
        const MESSAGE: &str = "The engine is shutting down";
        for i in 0..self.slots.len() {
            self.finish(i, FinishReason::Abort, Some(MESSAGE.to_owned()));
        }
        while let Some(job) = self.pending.pop_front() {
            self.metrics().queue_depth.fetch_sub(1, Ordering::Relaxed);
            let _ = job.events.send(Event::Aborted(MESSAGE.to_owned()));
            self.metrics()
                .shutdown_aborted
                .fetch_add(1, Ordering::Relaxed);
            self.end_unscheduled(job, 503, ErrorKind::Unavailable);
        }
    }

    /// Requests whose client left while they waited end as aborted.
    fn drop_abandoned(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].events.is_closed() {
                if let Some(job) = self.pending.remove(i) {
                    self.metrics().queue_depth.fetch_sub(1, Ordering::Relaxed);
                    self.end_unscheduled(job, 499, ErrorKind::ClientDisconnected);
                }
            } else {
                i += 1;
            }
        }
    }

    fn end_unscheduled(&self, mut job: Job, http_status: u16, error: ErrorKind) {
        let t = now_ns();
        let outcome = RequestOutcome {
            kind: OutcomeKind::Finished,
            operation: job.operation,
            request_id: job.request_id,
            trace_id: job.trace.trace_id,
            parent_span_id: job.trace.parent_span_id,
            trace_flags: job.trace.trace_flags,
            ot: job.trace.ot,
            span_id: job.trace.span_id,
            t_arrival_ns: job.t_arrival_ns,
            t_scheduled_ns: 0,
            t_first_token_ns: 0,
            t_last_token_ns: 0,
            t_finished_ns: t.max(job.t_arrival_ns),
            prompt_tokens: saturate_u32(job.prompt.len()),
            completion_tokens: 0,
            cached_prompt_tokens: 0,
            sampling: sampling_record(&job, job.sampling.seed.unwrap_or(0), 0),
            stream: job.stream,
            finish_reason: FinishReason::Abort,
            http_status,
            error,
            model_index: job.model_index,
            queue_depth: job.queue_depth_at_arrival,
            running: 0,
            sequence_slot: None,
        };
        self.telemetry.record(&outcome);
        if let Some(tracked) = job.inflight.take() {
            tracked.release();
        }
        self.metrics().count_request(job.operation, http_status);
        self.shared.admitted.fetch_sub(1, Ordering::AcqRel);
    }

    /// Moves queued requests into free slots, in arrival order.
    fn schedule(&mut self) {
        while !self.pending.is_empty() {
            let Some((free, shared)) = self.pending.front().and_then(|j| self.pick_slot(&j.prompt))
            else {
                return;
            };
            let Some(mut job) = self.pending.pop_front() else {
                return;
            };
            self.metrics().queue_depth.fetch_sub(1, Ordering::Relaxed);
            let seq = i32::try_from(free).unwrap_or(i32::MAX);
            let reused = self.reuse_prefix(free, shared, job.prompt.len());
            self.metrics()
                .count_cached_prompt_tokens(saturate_u32(reused));
            let room = self
                .n_ctx_seq
                .saturating_sub(saturate_u32(job.prompt.len()));
            let max_tokens = job.max_tokens.map_or(room, |m| m.min(room));
            let running = self.running() + 1;
            self.metrics().running.store(running, Ordering::Relaxed);
            self.metrics()
                .count_tokens(saturate_u32(job.prompt.len()), 0);
            let stop = StopMatcher::new(job.stop.clone());
            let sampler = Sampler::new(job.sampling);
            let t_scheduled = now_ns().max(job.t_arrival_ns);
            if let Some(tracked) = job.inflight.as_mut() {
                tracked.scheduled(t_scheduled, free, saturate_u32(reused), max_tokens);
            }
            self.slots[free] = Some(Slot {
                seq,
                fed: reused,
                n_past: i32::try_from(reused).unwrap_or(0),
                cached_prompt: saturate_u32(reused),
                pending_token: None,
                generated: 0,
                max_tokens,
                sampler,
                utf8: Utf8Assembler::default(),
                stop,
                t_scheduled,
                t_first: 0,
                t_last: 0,
                running_at_schedule: saturate_u16(running),
                job,
            });
        }
    }

    /// One scheduling step: every decoding sequence gets its next token (one decode call per
    /// group that has one), then prefilling sequences compute prompt chunks, oldest first, up
    /// to `--batch-size` tokens. See the module docs for why the calls are shaped this way.
    /// While tracing is on, the step is recorded in the step ring (one push, no allocation).
    fn step(&mut self) {
        let t_step = now_ns();
        // Decided once per step: with tracing off the step's record is numbered and counted
        // but neither assembled (no slot walk, no extra clock read) nor pushed.
        let recording = self.telemetry.records_steps();
        self.begin_step_record(t_step, recording);
        let mut rows = 0;
        for g in 0..self.groups.len() {
            rows += self.decode_group(g);
        }
        self.current.t_decode_end_ns = if recording && self.current.decode_calls > 0 {
            now_ns()
        } else {
            t_step
        };
        let mut budget = self.batch_size.saturating_sub(rows);
        let mut prefilling = std::mem::take(&mut self.prefill_order);
        prefilling.clear();
        prefilling.extend(
            self.slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().filter(|s| s.fed < s.job.prompt.len()).map(|_| i)),
        );
        prefilling.sort_by_key(|&i| self.slots[i].as_ref().map_or(u64::MAX, |s| s.t_scheduled));
        for &i in &prefilling {
            while budget > 0 {
                match self.prefill_chunk(i) {
                    Some(n) => budget = budget.saturating_sub(n),
                    None => break,
                }
            }
        }
        self.prefill_order = prefilling;
        let t_end = now_ns();
        if recording && (self.current.decode_calls > 0 || self.current.prefill_calls > 0) {
            self.current.t_end_ns = t_end.max(self.current.t_decode_end_ns);
            self.telemetry.record_step(&self.current);
        }
        for i in 0..self.slots.len() {
            if self.slots[i]
                .as_ref()
                .is_some_and(|s| s.job.events.is_closed())
            {
                self.finish(i, FinishReason::Abort, None);
            }
        }
        tracing::trace!(
            decode_rows = rows,
            step_us = t_end.saturating_sub(t_step) / 1000,
            "step"
        );
    }

    /// Starts the current step's record: its number and start, and (when `recording`) the
    /// slots, KV cells and queue as the step finds them. Counts are filled in as it runs.
    fn begin_step_record(&mut self, t_start: u64, recording: bool) {
        let number = self.current.step.wrapping_add(1).max(1);
        if !recording {
            self.current = shm::Step {
                step: number,
                t_start_ns: t_start,
                ..shm::Step::default()
            };
            return;
        }
        let mut occupied = 0;
        let mut kv_used = 0usize;
        for (slot, kept) in self.slots.iter().zip(&self.kept) {
            match slot {
                Some(s) => {
                    occupied += 1;
                    kv_used += usize::try_from(s.n_past).unwrap_or(0);
                }
                None => kv_used += kept.len(),
            }
        }
        self.current = shm::Step {
            step: number,
            t_start_ns: t_start,
            t_decode_end_ns: t_start,
            t_end_ns: t_start,
            slots_occupied: saturate_u16(occupied),
            slots_total: saturate_u16(self.slots.len()),
            kv_cells_used: saturate_u32(kv_used),
            kv_cells_total: self
                .n_ctx_seq
                .saturating_mul(saturate_u32(self.slots.len())),
            queue_depth: saturate_u32(self.pending.len()),
            ..shm::Step::default()
        };
    }

    /// Decodes the next token of every decoding sequence in group `g` in one call, the
    /// group's other sequences carrying a placeholder token (removed right after), and samples.
    /// Returns the rows decoded (0 when no sequence of the group is decoding).
    fn decode_group(&mut self, g: usize) -> usize {
        let group = self.groups[g].clone();
        if !group.clone().any(|i| {
            self.slots[i]
                .as_ref()
                .is_some_and(|s| s.pending_token.is_some())
        }) {
            return 0;
        }
        self.batch.clear();
        // Taken out of `self` for the call (the loop below borrows `self`), put back at the end.
        let mut placeholders = std::mem::take(&mut self.placeholders);
        let mut outputs = std::mem::take(&mut self.outputs);
        placeholders.clear();
        outputs.clear();
        for i in group.clone() {
            let seq = i32::try_from(i).unwrap_or(i32::MAX);
            let slot = self.slots[i].as_ref();
            let added = match slot.and_then(|s| Some((s.pending_token?, s.n_past))) {
                Some((token, n_past)) => {
                    let added = self.batch.add(token, n_past, &[seq], true);
                    outputs.push((i, self.batch.n_tokens() - 1));
                    added
                }
                None => {
                    // Right after what the sequence's KV holds: a prefilling slot's next
                    // position, a free slot's kept prompt length.
                    let end = slot.map_or(self.kept[i].len(), |s| {
                        usize::try_from(s.n_past).unwrap_or(0)
                    });
                    placeholders.push((i, end));
                    self.batch.add(
                        PLACEHOLDER,
                        i32::try_from(end).unwrap_or(i32::MAX),
                        &[seq],
                        false,
                    )
                }
            };
            if added.is_err() {
                // The batch holds at least `--parallel` tokens; unreachable, but never panic.
                break;
            }
        }
        let rows = usize::try_from(self.batch.n_tokens()).unwrap_or(0);
        self.current.decode_calls = self.current.decode_calls.saturating_add(1);
        self.current.decode_rows = self.current.decode_rows.saturating_add(saturate_u16(rows));
        for &(i, _) in &outputs {
            self.current.decode_slots.insert(i);
        }
        let result = self.ctx.decode(&mut self.batch);
        for &(i, end) in &placeholders {
            let _ =
                self.ctx
                    .clear_kv_cache_seq(u32::try_from(i).ok(), u32::try_from(end).ok(), None);
        }
        if let Err(e) = result {
            self.current.failed = true;
            tracing::error!(error = %e, tokens = rows, "llama_decode failed");
            for &(i, _) in &outputs {
                self.finish(i, FinishReason::Error, Some(format!("decode failed: {e}")));
            }
            self.placeholders = placeholders;
            self.outputs = outputs;
            return rows;
        }
        for &(i, index) in &outputs {
            let Some(slot) = self.slots[i].as_mut() else {
                continue;
            };
            slot.pending_token = None;
            slot.n_past += 1;
            let logits = self.ctx.get_logits_ith(index);
            match slot.sampler.sample(logits) {
                Some(token) => self.on_token(i, LlamaToken::new(token)),
                None => self.finish(i, FinishReason::Error, Some("empty vocabulary".into())),
            }
        }
        self.placeholders = placeholders;
        self.outputs = outputs;
        rows
    }

    /// Computes slot `i`'s next prompt chunk in a call of its own: from where it stands to the
    /// next multiple of the chunk size (or the prompt's end). The prompt's last chunk also
    /// samples the first token. Returns the tokens computed; `None` when the slot is not
    /// prefilling (or just failed).
    fn prefill_chunk(&mut self, i: usize) -> Option<usize> {
        let slot = self.slots[i].as_mut()?;
        let len = slot.job.prompt.len();
        if slot.fed >= len {
            return None;
        }
        let end = len.min((slot.fed / self.chunk + 1) * self.chunk);
        let seq = slot.seq;
        self.batch.clear();
        for (k, &token) in slot.job.prompt[slot.fed..end].iter().enumerate() {
            let last = slot.fed + k + 1 == len;
            let pos = slot.n_past + i32::try_from(k).unwrap_or(i32::MAX);
            if self.batch.add(token, pos, &[seq], last).is_err() {
                // The batch holds at least `--batch-size` ≥ chunk tokens; never panic.
                self.finish(i, FinishReason::Error, Some("batch overflow".into()));
                return None;
            }
        }
        let decoded = self.ctx.decode(&mut self.batch);
        self.current.prefill_calls = self.current.prefill_calls.saturating_add(1);
        self.current.prefill_slots.insert(i);
        self.current.prefill_tokens = self
            .current
            .prefill_tokens
            .saturating_add(saturate_u32(end - slot.fed));
        if let Err(e) = decoded {
            self.current.failed = true;
            tracing::error!(error = %e, tokens = end - slot.fed, "llama_decode failed");
            self.finish(i, FinishReason::Error, Some(format!("decode failed: {e}")));
            return None;
        }
        let n = end - slot.fed;
        slot.fed = end;
        slot.n_past = i32::try_from(end).unwrap_or(i32::MAX);
        if end < len {
            if let Some(tracked) = slot.job.inflight.as_mut() {
                tracked.prefilled(now_ns(), saturate_u32(end));
            }
            return Some(n);
        }
        let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
        match slot.sampler.sample(logits) {
            Some(token) => self.on_token(i, LlamaToken::new(token)),
            None => self.finish(i, FinishReason::Error, Some("empty vocabulary".into())),
        }
        Some(n)
    }

    fn on_token(&mut self, i: usize, token: LlamaToken) {
        let model: &'m Model = self.model;
        let vocab = model.llama.vocab();
        if vocab.is_eog(token) {
            self.finish(i, FinishReason::Stop, None);
            return;
        }
        let Some(slot) = self.slots[i].as_mut() else {
            return;
        };
        let t = now_ns();
        if slot.t_first == 0 {
            slot.t_first = t;
        }
        slot.t_last = t;
        slot.generated += 1;
        if let Some(tracked) = slot.job.inflight.as_mut() {
            tracked.token(t, slot.generated);
        }
        self.shared.metrics.count_tokens(0, 1);
        slot.sampler.accept(token.0);
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        let text = slot.utf8.push(&self.piece);
        let (out, stopped) = match slot.stop.push(&text) {
            StopOutcome::Continue(out) => (out, false),
            StopOutcome::Stopped(out) => (out, true),
        };
        let end = if !out.is_empty() && slot.job.events.send(Event::Text(out)).is_err() {
            Some(FinishReason::Abort)
        } else if stopped {
            Some(FinishReason::Stop)
        } else if slot.generated >= slot.max_tokens {
            Some(FinishReason::Length)
        } else {
            slot.pending_token = Some(token);
            None
        };
        if let Some(reason) = end {
            self.finish(i, reason, None);
        }
    }

    /// Keeps the prompt part of slot `i`'s KV stream for a later request (the module docs),
    /// or clears the stream.
    fn keep_prompt(&mut self, i: usize, slot: &Slot, reason: FinishReason) {
        let seq = u32::try_from(i).ok();
        let computed = slot.fed.min(slot.job.prompt.len());
        // After a failed decode what the stream holds is unknown.
        let keep = self.prompt_cache
            && reason != FinishReason::Error
            && computed > 0
            && self
                .ctx
                .clear_kv_cache_seq(seq, u32::try_from(computed).ok(), None)
                .unwrap_or(false);
        self.kept[i].clear();
        if keep {
            self.kept[i].extend_from_slice(&slot.job.prompt[..computed]);
        } else {
            let _ = self.ctx.clear_kv_cache_seq(seq, None, None);
        }
    }

    /// Ends the request in slot `i`: flush text, tell the client, keep its prompt's KV (or
    /// clear the stream), free the slot, and queue the outcome for [`Self::record_ended`].
    fn finish(&mut self, i: usize, reason: FinishReason, error: Option<String>) {
        let Some(mut slot) = self.slots[i].take() else {
            return;
        };
        self.keep_prompt(i, &slot, reason);
        let usage = Usage {
            prompt_tokens: saturate_u32(slot.job.prompt.len()),
            completion_tokens: slot.generated,
            cached_prompt_tokens: slot.cached_prompt,
        };
        let (status, kind) = match reason {
            FinishReason::Stop | FinishReason::Length => {
                // Flush an incomplete character and text held back for a stop string that
                // never completed: it is real output.
                let tail = slot.utf8.finish();
                let mut out = String::new();
                match slot.stop.push(&tail) {
                    StopOutcome::Continue(t) => {
                        out.push_str(&t);
                        out.push_str(&slot.stop.finish());
                    }
                    StopOutcome::Stopped(t) => out.push_str(&t),
                }
                if !out.is_empty() {
                    let _ = slot.job.events.send(Event::Text(out));
                }
                let delivered = slot
                    .job
                    .events
                    .send(Event::Done {
                        finish_reason: reason,
                        usage,
                    })
                    .is_ok();
                if delivered {
                    (200, ErrorKind::None)
                } else {
                    (499, ErrorKind::ClientDisconnected)
                }
            }
            // With a message: the engine ended it (the shutdown deadline).
            FinishReason::Abort => match error {
                Some(message) => {
                    let _ = slot.job.events.send(Event::Aborted(message));
                    self.shared
                        .metrics
                        .shutdown_aborted
                        .fetch_add(1, Ordering::Relaxed);
                    (503, ErrorKind::Unavailable)
                }
                None => (499, ErrorKind::ClientDisconnected),
            },
            FinishReason::Error | FinishReason::None => {
                let message = error.unwrap_or_else(|| "generation failed".to_owned());
                let _ = slot.job.events.send(Event::Failed(message));
                (500, ErrorKind::Internal)
            }
        };
        let reason = if status == 499 {
            FinishReason::Abort
        } else {
            reason
        };
        let t_finished = now_ns().max(slot.t_last).max(slot.t_scheduled);
        let outcome = RequestOutcome {
            kind: OutcomeKind::Finished,
            operation: slot.job.operation,
            request_id: slot.job.request_id,
            trace_id: slot.job.trace.trace_id,
            parent_span_id: slot.job.trace.parent_span_id,
            trace_flags: slot.job.trace.trace_flags,
            ot: slot.job.trace.ot,
            span_id: slot.job.trace.span_id,
            t_arrival_ns: slot.job.t_arrival_ns,
            t_scheduled_ns: slot.t_scheduled,
            t_first_token_ns: slot.t_first,
            t_last_token_ns: slot.t_last,
            t_finished_ns: t_finished,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            sampling: sampling_record(&slot.job, slot.sampler.seed(), slot.max_tokens),
            stream: slot.job.stream,
            finish_reason: reason,
            http_status: status,
            error: kind,
            model_index: slot.job.model_index,
            queue_depth: slot.job.queue_depth_at_arrival,
            running: slot.running_at_schedule,
            sequence_slot: u16::try_from(i).ok(),
        };
        self.ended.push((outcome, slot.job.inflight.take()));
        self.shared
            .metrics
            .count_request(slot.job.operation, status);
        self.shared
            .metrics
            .running
            .store(self.running(), Ordering::Relaxed);
        self.shared.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Length of the longest common prefix of `a` and `b`.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn sampling_record(job: &Job, seed: u64, max_tokens: u32) -> SamplingRecord {
    SamplingRecord {
        max_tokens,
        temperature: job.sampling.temperature,
        top_p: job.sampling.top_p,
        top_k: job.sampling.top_k,
        seed,
        frequency_penalty: job.sampling.frequency_penalty,
        presence_penalty: job.sampling.presence_penalty,
        params_set: job.params_set,
    }
}

#[cfg(test)]
mod tests {
    use super::decode_groups;

    /// Every slot in exactly one group of consecutive slots, and every group of one kernel
    /// class: all multiples of 4 rows, or all 2–3 rows (issue 12: a row's rounding must not
    /// depend on how many others are decoded with it).
    #[test]
    fn decode_groups_cover_the_slots_in_one_kernel_class() {
        assert_eq!(decode_groups(1), vec![0..1]);
        assert_eq!(decode_groups(4), vec![0..4]);
        assert_eq!(decode_groups(2), vec![0..2]);
        assert_eq!(decode_groups(7), vec![0..2, 2..4, 4..7]);
        for parallel in 2..=64 {
            let groups = decode_groups(parallel);
            let mut next = 0;
            for g in &groups {
                assert_eq!(g.start, next, "{parallel}: {groups:?}");
                next = g.end;
            }
            assert_eq!(next, parallel, "{parallel}: {groups:?}");
            let gemm = groups.iter().all(|g| g.len() == 4);
            let gemv = groups.iter().all(|g| (2..=3).contains(&g.len()));
            assert!(gemm || gemv, "{parallel}: {groups:?}");
        }
    }
}
