//! Dynamic loss scaling, as PyTorch's `torch.amp.GradScaler` updates its scale.
//!
//! Policy apart from mechanism: the loop multiplies the loss, divides the gradients, checks
//! them and skips the optimizer; this says what the scale becomes after a step.

use codex_plugin_api::trainer::LossScaling;

/// The scale and growth tracker after a step whose gradients were all finite (`finite`) or
/// not: a non-finite step multiplies the scale by `backoff_factor` and restarts the count;
/// the `growth_interval`-th finite step in a row multiplies it by `growth_factor` (unless
/// that would make it infinite) and restarts the count.
pub(crate) fn update(settings: &LossScaling, scale: f64, tracker: u64, finite: bool) -> (f64, u64) {
    if !finite {
        return (scale * settings.backoff_factor, 0);
    }
    let tracker = tracker + 1;
    if tracker >= settings.growth_interval {
        let grown = scale * settings.growth_factor;
        // PyTorch keeps the scale when growing it would overflow f32.
        let grown = if (grown as f32).is_finite() {
            grown
        } else {
            scale
        };
        (grown, 0)
    } else {
        (scale, tracker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(steps: &[bool], interval: u64, expect: &[f64]) {
        let settings = LossScaling {
            growth_interval: interval,
            ..LossScaling::default()
        };
        let (mut scale, mut tracker) = (settings.init_scale, 0);
        let mut seen = Vec::new();
        for &finite in steps {
            (scale, tracker) = update(&settings, scale, tracker, finite);
            seen.push(scale);
        }
        assert_eq!(seen, expect);
    }

    #[test]
    fn backs_off_on_overflow_and_grows_after_an_interval_of_finite_steps() {
        let s = 65536.0;
        check(&[false, false, true], 2000, &[s / 2.0, s / 4.0, s / 4.0]);
        check(&[true, true, true], 2, &[s, 2.0 * s, 2.0 * s]);
        // An overflow restarts the count.
        check(&[true, false, true, true], 2, &[s, s / 2.0, s / 2.0, s]);
        check(&[true; 4], 1, &[2.0 * s, 4.0 * s, 8.0 * s, 16.0 * s]);
    }

    #[test]
    fn never_grows_past_f32() {
        let settings = LossScaling {
            growth_interval: 1,
            ..LossScaling::default()
        };
        let big = f64::from(f32::MAX);
        assert_eq!(update(&settings, big, 0, true), (big, 0));
    }
}
