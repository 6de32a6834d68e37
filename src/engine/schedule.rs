//! Learning-rate schedules, a pure function of the step.

use crate::config::Schedule;

/// The rate at step `t` (0-based) of `total` steps of `per_epoch` steps each:
/// linear warm-up over `warmup` steps ((t+1)/warmup of the base), then the
/// schedule over the remaining steps.
pub fn rate(
    schedule: &Schedule,
    base: f64,
    t: u64,
    total: u64,
    warmup: u64,
    per_epoch: u64,
) -> f64 {
    if t < warmup {
        return base * (t + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let s = (t - warmup) as f64;
            base * (1.0 + (std::f64::consts::PI * s / span).cos()) / 2.0
        }
        Schedule::Linear => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            base * (1.0 - (t - warmup) as f64 / span)
        }
        Schedule::CosineEpochs => {
            let epochs = total.div_ceil(per_epoch.max(1)).max(1) as f64;
            let epoch = (t / per_epoch.max(1)) as f64;
            base * (1.0 + (std::f64::consts::PI * epoch / epochs).cos()) / 2.0
        }
        Schedule::Step { milestones, gamma } => {
            let epoch = t / per_epoch.max(1);
            let passed = milestones.iter().filter(|&&m| epoch >= m as u64).count();
            base * gamma.powi(passed as i32)
        }
    }
}

/// DESIGN §1.2's cosine coefficient `(1 + cos(π t / T)) / 2`.
pub fn cosine(t: u64, total: u64) -> f64 {
    (1.0 + (std::f64::consts::PI * t as f64 / total.max(1) as f64).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_epochs_is_constant_within_an_epoch_as_cosine_annealing_lr() {
        // CosineAnnealingLR(T_max = 4) stepped per epoch: 0.1, 0.0854, 0.05, 0.0146.
        let want = [0.1, 0.085_355_339, 0.05, 0.014_644_661];
        for t in 0..40 {
            let r = rate(&Schedule::CosineEpochs, 0.1, t, 40, 0, 10);
            assert!((r - want[(t / 10) as usize]).abs() < 1e-9, "step {t}: {r}");
        }
    }

    #[test]
    fn cosine_warmup_and_step() {
        let c = Schedule::Cosine;
        assert_eq!(rate(&c, 0.1, 0, 100, 0, 10), 0.1);
        assert!((rate(&c, 0.1, 50, 100, 0, 10) - 0.05).abs() < 1e-12);
        assert!(rate(&c, 0.1, 99, 100, 0, 10) < 1e-4);
        assert!((rate(&c, 0.1, 4, 100, 10, 10) - 0.05).abs() < 1e-12);
        assert_eq!(rate(&c, 0.1, 10, 100, 10, 10), 0.1);
        let s = Schedule::Step {
            milestones: vec![2, 4],
            gamma: 0.5,
        };
        assert_eq!(rate(&s, 1.0, 19, 100, 0, 10), 1.0);
        assert_eq!(rate(&s, 1.0, 20, 100, 0, 10), 0.5);
        assert_eq!(rate(&s, 1.0, 45, 100, 0, 10), 0.25);
        // The fast CIFAR-10 ResNet-9 recipe's triangle: up over the warm-up, down to 0.
        let l = Schedule::Linear;
        assert_eq!(rate(&l, 0.4, 10, 100, 10, 10), 0.4);
        assert!((rate(&l, 0.4, 55, 100, 10, 10) - 0.2).abs() < 1e-12);
        assert!((rate(&l, 0.4, 99, 100, 10, 10) - 0.4 / 90.0).abs() < 1e-12);
        assert_eq!(cosine(0, 10), 1.0);
        assert!(cosine(10, 10).abs() < 1e-12);
    }
}
