//! Bounded work before admission (issue 12): what a request may cost before it holds a slot.
//!
//! - [`PromptBound`]: a prompt whose byte length cannot fit the context is refused before it
//!   is tokenized. Each token of the prompt stands for at most `max_token_bytes` of its bytes
//!   (the longest token of the vocabulary, measured once at load), so a prompt of `b` bytes
//!   has at least `ceil(b / max_token_bytes)` tokens.
//! - [`WorkGate`]: tokenizing, and parsing a large body, run on the blocking pool, never on
//!   the async workers that answer `/health`, and at most a fixed number of each at once (more
//!   runnable threads than cores would stretch every thread's wait for a turn); a bounded
//!   number of requests wait for a turn, the rest get 429.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token_type::LlamaTokenAttr;
use tokio::sync::Semaphore;

/// What the engine knows, from the vocabulary, about how few tokens a text can become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptBound {
    /// The most input bytes one token can stand for; `None` when the tokenizer allows no
    /// bound (see [`PromptBound::of`]).
    max_token_bytes: Option<NonZeroUsize>,
}

impl PromptBound {
    /// A bound of at most `max_token_bytes` input bytes per token (`None`: no bound).
    #[must_use]
    pub const fn new(max_token_bytes: Option<NonZeroUsize>) -> Self {
        Self { max_token_bytes }
    }

    /// Measures the vocabulary of `model` (about 30 ms for 262 144 tokens).
    ///
    /// The bound holds for llama.cpp's SentencePiece (`llama`) and byte-level BPE (`gpt2`)
    /// tokenizers: every token they emit either was matched in the text as a special token's
    /// text, or covers a stretch of the (space-escaped) text that is that token's piece, or is
    /// one byte-fallback token for one byte; added tokens (BOS, a space prefix) only add —
    /// unless a special token strips the whitespace around it (`lstrip`/`rstrip`). The
    /// measure takes the longer of the token's raw text and its rendered piece. Other
    /// tokenizers normalise (WordPiece drops whitespace, Unigram collapses it), so a token can
    /// stand for more bytes than it spells: no bound, and only [`WorkGate`] bounds them.
    #[must_use]
    pub fn of(model: &LlamaModel) -> Self {
        let kind = model
            .meta_val_str("tokenizer.ggml.model")
            .unwrap_or_default();
        if !matches!(kind.as_str(), "llama" | "gpt2") {
            tracing::info!(tokenizer = %kind,
                "no byte bound for this tokenizer: prompts are tokenized before the context check");
            return Self::new(None);
        }
        let vocab = model.vocab();
        let mut piece = Vec::new();
        let mut longest = 0;
        for token in vocab.tokens() {
            let attrs = vocab.attr(token);
            if attrs.contains(LlamaTokenAttr::LStrip) || attrs.contains(LlamaTokenAttr::RStrip) {
                // Such a special token swallows the whitespace around it, however long.
                tracing::info!(
                    token = token.0,
                    "no byte bound: a special token strips the whitespace around it"
                );
                return Self::new(None);
            }
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, true, None);
            let text = vocab.text(token).map_or(0, |t| t.to_bytes().len());
            longest = longest.max(piece.len()).max(text);
        }
        Self::new(NonZeroUsize::new(longest))
    }

    /// The most bytes one token stands for, when bounded.
    #[must_use]
    pub const fn max_token_bytes(&self) -> Option<NonZeroUsize> {
        self.max_token_bytes
    }

    /// The fewest tokens `bytes` of text can be tokenized into, when bounded.
    #[must_use]
    pub fn min_tokens(&self, bytes: usize) -> Option<usize> {
        self.max_token_bytes.map(|max| bytes.div_ceil(max.get()))
    }
}

/// Why gated work did not run.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Every turn is taken and the waiting line is full.
    #[error("{waiting} requests are already waiting for a turn")]
    Busy {
        /// The line's bound.
        waiting: usize,
    },
    /// The work panicked.
    #[error("the work failed: {0}")]
    Failed(String),
}

/// At most `concurrency` jobs (tokenizations, or parses of large bodies) at once, on the
/// blocking pool; at most `max_waiting` requests waiting for a turn.
#[derive(Debug)]
pub struct WorkGate {
    permits: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    concurrency: usize,
}

impl WorkGate {
    /// A gate for `concurrency` jobs at once (at least one) and `max_waiting` waiting.
    #[must_use]
    pub fn new(concurrency: usize, max_waiting: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            permits: Semaphore::new(concurrency),
            waiting: AtomicUsize::new(0),
            max_waiting,
            concurrency,
        }
    }

    /// Jobs that may run at once.
    #[must_use]
    pub const fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Runs `work` on the blocking pool once a turn is free. Dropping the future while it
    /// waits gives up the place; once started, `work` runs to its end and keeps its turn until
    /// then, so the bound holds even for requests whose client left.
    ///
    /// # Errors
    /// [`GateError::Busy`] at once when `max_waiting` requests already wait;
    /// [`GateError::Failed`] when `work` panicked.
    pub async fn run<T, F>(&self, work: F) -> Result<T, GateError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = match self.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                let place = WaitingPlace::take(&self.waiting, self.max_waiting)?;
                let permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|e| GateError::Failed(e.to_string()))?;
                drop(place);
                permit
            }
        };
        // The turn travels with the work: a dropped request cannot free it early.
        let held = permit;
        let result = tokio::task::spawn_blocking(work).await;
        drop(held);
        result.map_err(|e| GateError::Failed(e.to_string()))
    }

    /// Requests waiting for a turn now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A place in the waiting line, given back when dropped.
struct WaitingPlace<'a>(&'a AtomicUsize);

impl<'a> WaitingPlace<'a> {
    fn take(waiting: &'a AtomicUsize, max: usize) -> Result<Self, GateError> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Self(waiting))
            .map_err(|_| GateError::Busy { waiting: max })
    }
}

impl Drop for WaitingPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_byte_bound_is_the_ceiling_of_bytes_over_the_longest_token() {
        let bound = PromptBound::new(NonZeroUsize::new(16));
        // Both sides of each multiple: 16 bytes may be one token, 17 are at least two.
        assert_eq!(bound.min_tokens(0), Some(0));
        assert_eq!(bound.min_tokens(1), Some(1));
        assert_eq!(bound.min_tokens(16), Some(1));
        assert_eq!(bound.min_tokens(17), Some(2));
        assert_eq!(bound.min_tokens(16 * 4095), Some(4095));
        assert_eq!(bound.min_tokens(16 * 4095 + 1), Some(4096));
        assert_eq!(PromptBound::new(None).min_tokens(1 << 30), None);
    }

    #[tokio::test]
    async fn the_gate_runs_at_most_its_concurrency_and_refuses_beyond_the_waiting_line() {
        let gate = Arc::new(WorkGate::new(1, 1));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let running = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.run(move || release_rx.recv().is_ok()).await })
        };
        while gate.permits.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queued = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.run(|| 7).await })
        };
        while gate.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(matches!(
            gate.run(|| 0).await,
            Err(GateError::Busy { waiting: 1 })
        ));
        release_tx.send(()).unwrap();
        assert!(running.await.unwrap().unwrap());
        assert_eq!(queued.await.unwrap().unwrap(), 7);
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.run(|| 8).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_frees_its_place() {
        let gate = Arc::new(WorkGate::new(1, 1));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let running = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.run(move || release_rx.recv().is_ok()).await })
        };
        while gate.permits.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gave_up = tokio::time::timeout(Duration::from_millis(20), gate.run(|| 1)).await;
        assert!(gave_up.is_err());
        assert_eq!(gate.waiting(), 0);
        release_tx.send(()).unwrap();
        assert!(running.await.unwrap().unwrap());
    }
}
