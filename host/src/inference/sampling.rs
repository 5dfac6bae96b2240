//! Choosing the next token from logits: temperature, top-k, top-p, from a seeded generator.
//!
//! Pure functions of (logits, settings, generator state), so the same seed gives the same
//! text on every machine.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1: all).
    pub top_p: f64,
}

impl Sampling {
    /// Check the settings, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Pick a token id from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        let mut best = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] || logits[best].is_nan() {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature == 0.0 || logits.len() <= 1 {
        return argmax();
    }
    // Candidates sorted by logit, most likely first; ties broken by id for determinism.
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if idx.is_empty() {
        return argmax();
    }
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 && s.top_k < idx.len() {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (n, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[n] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn s(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn greedy_top_k_and_top_p_restrict_choices() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&logits, &s(0.0, 0, 1.0), &mut rng), 1);
        for _ in 0..200 {
            let t = sample(&logits, &s(1.0, 2, 1.0), &mut rng);
            assert!(t == 1 || t == 3, "top-k 2 gave {t}");
            // p(1) ≈ 0.45, p(3) ≈ 0.41: top-p 0.4 keeps only the first.
            assert_eq!(sample(&logits, &s(1.0, 0, 0.4), &mut rng), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_distribution_follows_logits() {
        let logits = [0.0f32, (3.0f32).ln()];
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..4000)
                .map(|_| sample(&logits, &s(1.0, 0, 1.0), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let ones = draw(7).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn validation_names_the_bad_setting() {
        assert!(s(-1.0, 0, 1.0)
            .validate()
            .unwrap_err()
            .contains("temperature"));
        assert!(s(1.0, 0, 0.0).validate().unwrap_err().contains("top-p"));
        assert!(s(0.7, 40, 0.9).validate().is_ok());
    }
}
