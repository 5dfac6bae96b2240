//! Learning-rate schedules as pure functions of the optimizer step.
//!
//! Policy apart from mechanism: the loop asks for the rate of step `k` and hands it to the
//! optimizer; nothing here holds state, so a resumed run gets exactly the rates the
//! uninterrupted one would have, from the step number alone.
//!
//! Steps are 1-based (the step being taken, as `OptimStep::step`). With `W` warmup steps and
//! `T` total steps:
//! - warmup, `k <= W`: `peak * k / W`, rising linearly from 0 (at the virtual step 0) to the
//!   peak at step `W`;
//! - after warmup, with progress `p = (k - W) / (T - W)` in `(0, 1]`: constant `peak`, linear
//!   `peak + (min - peak) * p`, or cosine `min + (peak - min) * (1 + cos(pi * p)) / 2`; the
//!   decaying shapes reach `min_lr` exactly at step `T`;
//! - steps past `T` keep the final value.

use codex_plugin_api::{Schedule, ScheduleKind};

/// The learning rate for optimizer step `step` (1-based) of `total_steps`, peaking at `peak`.
pub(crate) fn learning_rate(schedule: &Schedule, peak: f64, total_steps: u64, step: u64) -> f64 {
    let warmup = schedule.warmup_steps;
    if step <= warmup {
        // warmup > 0 here unless step == 0, the virtual step before training.
        return if warmup == 0 {
            0.0
        } else {
            peak * step as f64 / warmup as f64
        };
    }
    if total_steps <= warmup {
        // Training ends inside the warmup: there is no decay phase.
        return peak;
    }
    let progress = ((step - warmup) as f64 / (total_steps - warmup) as f64).min(1.0);
    let min = schedule.min_lr;
    match schedule.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Linear => peak + (min - peak) * progress,
        ScheduleKind::Cosine => {
            min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEAK: f64 = 1e-3;
    const MIN: f64 = 1e-5;
    const TOL: f64 = 1e-15;

    fn schedule(kind: ScheduleKind, warmup_steps: u64) -> Schedule {
        Schedule {
            kind,
            warmup_steps,
            min_lr: MIN,
        }
    }

    fn check(kind: ScheduleKind, warmup: u64, total: u64, step: u64, expect: f64) {
        let got = learning_rate(&schedule(kind, warmup), PEAK, total, step);
        assert!(
            (got - expect).abs() <= TOL,
            "{kind:?} warmup {warmup} total {total} step {step}: got {got}, expected {expect}"
        );
    }

    #[test]
    fn warmup_rises_linearly_from_zero_to_the_peak() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            check(kind, 10, 100, 0, 0.0);
            check(kind, 10, 100, 1, PEAK / 10.0);
            check(kind, 10, 100, 5, PEAK / 2.0);
            check(kind, 10, 100, 10, PEAK);
        }
    }

    #[test]
    fn decaying_schedules_end_at_min_lr() {
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            check(kind, 10, 100, 100, MIN);
            check(kind, 0, 100, 100, MIN);
            check(kind, 10, 100, 250, MIN);
        }
        check(ScheduleKind::Constant, 10, 100, 100, PEAK);
    }

    #[test]
    fn midpoints() {
        // Half-way through the decay both shapes sit half-way between peak and floor.
        check(ScheduleKind::Cosine, 10, 110, 60, (PEAK + MIN) / 2.0);
        check(ScheduleKind::Linear, 10, 110, 60, (PEAK + MIN) / 2.0);
        // A quarter of the way, cosine is still above the straight line.
        let cos = learning_rate(&schedule(ScheduleKind::Cosine, 0), PEAK, 100, 25);
        let lin = learning_rate(&schedule(ScheduleKind::Linear, 0), PEAK, 100, 25);
        assert!(cos > lin, "{cos} <= {lin}");
        check(
            ScheduleKind::Cosine,
            0,
            100,
            25,
            MIN + (PEAK - MIN) * 0.5 * (1.0 + (std::f64::consts::FRAC_PI_4).cos()),
        );
    }

    #[test]
    fn no_warmup_starts_at_the_peak_curve() {
        check(ScheduleKind::Constant, 0, 100, 1, PEAK);
        check(ScheduleKind::Linear, 0, 100, 1, PEAK + (MIN - PEAK) / 100.0);
    }

    #[test]
    fn runs_shorter_than_warmup_stay_in_warmup() {
        check(ScheduleKind::Cosine, 10, 5, 5, PEAK / 2.0);
        check(ScheduleKind::Cosine, 10, 5, 7, PEAK * 0.7);
    }

    #[test]
    fn monotone_up_then_down() {
        for kind in [
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Constant,
        ] {
            let s = schedule(kind, 20);
            let lrs: Vec<f64> = (0..=200).map(|k| learning_rate(&s, PEAK, 200, k)).collect();
            assert!(
                lrs[..=20].windows(2).all(|w| w[1] > w[0]),
                "{kind:?} warmup not increasing"
            );
            assert!(
                lrs[20..].windows(2).all(|w| w[1] <= w[0]),
                "{kind:?} decay not non-increasing"
            );
            assert!(
                lrs.iter().all(|&x| (0.0..=PEAK).contains(&x)),
                "{kind:?} out of range"
            );
            assert!(
                lrs[20..].iter().all(|&x| x >= MIN - TOL),
                "{kind:?} below the floor"
            );
        }
    }
}
