//! Sampling: greedy, temperature, top-k, top-p, seeded; the RNG state lives in the request.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// What a request asks of generation (OpenAI / vLLM names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 (or ≥ vocab) means no top-k cut.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    /// Number of top log-probabilities to return per token (`None`: no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |param, reason: &str| {
            Err(EngineError::BadParam {
                param,
                reason: reason.to_string(),
            })
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1");
        }
        if self.min_tokens > self.max_tokens {
            return bad("min_tokens", "must not exceed max_tokens");
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return bad("logprobs", "at most 20 top log-probabilities");
        }
        Ok(())
    }
}

/// A request's sampler: parameters plus its own RNG, serializable so it can travel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sampler {
    rng: ChaCha8Rng,
}

/// One sampled token with its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The sampler `n` sampled tokens later (each draw takes one 32-bit word).
    pub fn skip(&mut self, n: u64) {
        let at = self.rng.get_word_pos();
        self.rng.set_word_pos(at + n as u128);
    }

    fn uniform(&mut self) -> f32 {
        // 24 random bits: every value exactly representable, in [0, 1).
        (self.rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Picks the next token. `banned` tokens (EOS before `min_tokens`) get no probability.
    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams, banned: &[u32]) -> Sampled {
        let mut masked;
        let logits = if banned.is_empty() {
            logits
        } else {
            masked = logits.to_vec();
            for &b in banned {
                if let Some(x) = masked.get_mut(b as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            masked.as_slice()
        };
        let token = if p.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits, p)
        };
        let (logprob, top) = match p.logprobs {
            Some(n) => logprobs(logits, token, n),
            None => (0.0, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn draw(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        // Candidates sorted by logit (ties by id), cut by top-k, then softmax at temperature.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                cum += x;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let u = self.uniform();
        let mut cum = 0.0;
        for (i, &x) in probs.iter().enumerate() {
            cum += x;
            if u < cum {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max + logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(n);
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        top = idx.iter().map(|&i| (i, logits[i as usize] - lse)).collect();
    }
    (logits[token as usize] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let l = logits();
        let s = Sampler::new(1).sample(&l, &SamplingParams::greedy(1), &[]);
        assert_eq!(s.token, argmax(&l));
        assert_eq!(l[s.token as usize], 9.9);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_state_travels() {
        let l = logits();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            ..SamplingParams::greedy(1)
        };
        let run = |s: &mut Sampler| {
            (0..50)
                .map(|_| s.sample(&l, &p, &[]).token)
                .collect::<Vec<_>>()
        };
        let a = run(&mut Sampler::new(42));
        let b = run(&mut Sampler::new(42));
        assert_eq!(a, b);
        assert_ne!(a, run(&mut Sampler::new(43)));
        // Serialize mid-way, continue elsewhere: same continuation.
        let mut s = Sampler::new(42);
        let first: Vec<u32> = (0..20).map(|_| s.sample(&l, &p, &[]).token).collect();
        let json = serde_json::to_string(&s).unwrap_or_default();
        let mut moved: Sampler = serde_json::from_str(&json).unwrap_or_else(|_| Sampler::new(0));
        let rest: Vec<u32> = (0..30).map(|_| moved.sample(&l, &p, &[]).token).collect();
        assert_eq!([first, rest].concat(), a);
        // top-k 20 of 100 distinct logits: only ids whose logit is in the top 20.
        assert!(a.iter().all(|&t| l[t as usize] >= 8.0));
    }

    #[test]
    fn banned_tokens_are_never_picked() {
        let l = logits();
        let best = argmax(&l);
        let s = Sampler::new(1).sample(&l, &SamplingParams::greedy(1), &[best]);
        assert_ne!(s.token, best);
    }

    #[test]
    fn logprobs_are_normalised() {
        let l = vec![0.0f32, (2.0f32).ln(), 0.0, (4.0f32).ln()];
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy(1)
        };
        let s = Sampler::new(1).sample(&l, &p, &[]);
        assert_eq!(s.token, 3);
        assert!((s.logprob - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![3, 1]);
    }
}
