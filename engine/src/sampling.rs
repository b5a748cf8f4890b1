//! Per-request token sampling over raw logits: OpenAI-style frequency/presence penalties,
//! temperature (0 = greedy), top-k, top-p, seeded randomness.
//!
//! Runs on the inference thread once per sequence per step; after the first call it reuses its
//! buffers and does not allocate.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Effective sampling parameters of one request (already validated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` selects the most likely token (greedy).
    pub temperature: f32,
    /// Nucleus sampling mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: u32,
    /// Seed of the random generator; `None` draws one.
    pub seed: Option<u64>,
    /// Subtracted from a token's logit once per earlier occurrence in the completion.
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit when it occurred in the completion at all.
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// Logits more than this many temperature-scaled nats below the maximum carry less than
/// e^-27.6 ≈ 1e-12 of the top token's probability each; they are dropped before sorting.
const NEGLIGIBLE_NATS: f32 = 27.6;

/// A sampler for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    counts: HashMap<i32, u32>,
    scratch: Vec<f32>,
    candidates: Vec<(i32, f32)>,
}

impl Sampler {
    /// A sampler for `params`; the seed is drawn at random when not given.
    #[must_use]
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
            scratch: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The seed in use (the given one or the drawn one).
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Records a generated token (for the penalties).
    pub fn accept(&mut self, token: i32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    fn has_penalties(&self) -> bool {
        !self.counts.is_empty()
            && (self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0)
    }

    /// Picks the next token from `logits` (one value per vocabulary entry). Returns `None` only
    /// for an empty vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> Option<i32> {
        let logits: &[f32] = if self.has_penalties() {
            self.scratch.clear();
            self.scratch.extend_from_slice(logits);
            for (&token, &count) in &self.counts {
                if let Some(l) = usize::try_from(token)
                    .ok()
                    .and_then(|i| self.scratch.get_mut(i))
                {
                    #[allow(clippy::cast_precision_loss)]
                    let count = count as f32;
                    *l -= count * self.params.frequency_penalty + self.params.presence_penalty;
                }
            }
            &self.scratch
        } else {
            logits
        };

        let (best, max) = argmax(logits)?;
        let temperature = self.params.temperature;
        if temperature <= 0.0 || self.params.top_k == 1 {
            return Some(best);
        }

        let floor = max - NEGLIGIBLE_NATS * temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l >= floor)
                .filter_map(|(i, l)| i32::try_from(i).ok().map(|i| (i, *l))),
        );
        let by_weight_desc =
            |a: &(i32, f32), b: &(i32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k as usize;
        if k > 0 && k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(k - 1, by_weight_desc);
            self.candidates.truncate(k);
        }

        // Softmax with temperature, in place (the second field becomes the weight).
        let mut total = 0.0f64;
        for c in &mut self.candidates {
            let w = f64::from((c.1 - max) / temperature).exp();
            #[allow(clippy::cast_possible_truncation)]
            let w32 = w as f32;
            c.1 = w32;
            total += w;
        }
        if !(total.is_finite() && total > 0.0) {
            return Some(best);
        }

        // Nucleus: only the head of the distribution needs sorting. Sort the top 256, and widen
        // (×8) only while they hold less than `top_p` of the mass.
        let top_p = f64::from(self.params.top_p);
        let len = self.candidates.len();
        let mut kept = len;
        if top_p < 1.0 {
            let mut n = len.min(256);
            loop {
                if n < len {
                    self.candidates
                        .select_nth_unstable_by(n - 1, by_weight_desc);
                }
                self.candidates[..n].sort_unstable_by(by_weight_desc);
                let mut cum = 0.0f64;
                let mut found = None;
                for (i, c) in self.candidates[..n].iter().enumerate() {
                    cum += f64::from(c.1) / total;
                    if cum >= top_p {
                        found = Some(i + 1);
                        break;
                    }
                }
                if let Some(found) = found {
                    kept = found;
                    break;
                }
                if n == len {
                    break;
                }
                n = len.min(n.saturating_mul(8));
            }
        }
        let kept = &self.candidates[..kept.max(1)];
        let mass: f64 = kept.iter().map(|c| f64::from(c.1)).sum();
        let mut target = self.rng.random::<f64>() * mass;
        for c in kept {
            target -= f64::from(c.1);
            if target < 0.0 {
                return Some(c.0);
            }
        }
        kept.last().map(|c| c.0)
    }
}

/// Index and value of the largest logit (first on ties; NaN never wins). Two branch-free passes
/// that the compiler vectorises: the vocabulary of the default model has 262 144 entries.
fn argmax(logits: &[f32]) -> Option<(i32, f32)> {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let index = logits.iter().position(|&x| x == max)?;
    i32::try_from(index).ok().map(|i| (i, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_max() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]), Some(1));
        assert_eq!(s.sample(&[]), None);
    }

    #[test]
    fn penalties_change_greedy_choice() {
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        s.accept(1);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0]), Some(2));
        let p = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.4,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        s.accept(1);
        assert_eq!(s.sample(&[0.0, 3.0, 2.5]), Some(1));
        s.accept(1);
        assert_eq!(s.sample(&[0.0, 3.0, 2.5]), Some(2));
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0));
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let distinct: std::collections::HashSet<_> = run().into_iter().collect();
        assert!(
            distinct.len() > 1,
            "temperature 1 should not be deterministic over 50 draws"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict() {
        let logits = [5.0, 4.9, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        for _ in 0..100 {
            assert!(matches!(s.sample(&logits), Some(0 | 1)));
        }
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.1,
            ..params(5.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), Some(0));
        }
    }
}
