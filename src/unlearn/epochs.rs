//! How long a method runs and at what learning rate.
//!
//! SFR-on counts iterations and steps its cosine every iteration. The
//! baselines count epochs, as their authors' code does: each epoch is a list
//! of passes over one stream (SCRUB's first epochs: the forget set, then the
//! remain set), and PyTorch's `CosineAnnealingLR(T_max = epochs)` stepped once
//! per epoch gives epoch `e` (0-based) the rate `η (1 + cos(π e / E)) / 2`.
//! An iteration is one optimizer step either way.

use super::Which;
use crate::config::EpochPlan;
use crate::config::raw::{DecaySchedule, EpochSchedule};
use crate::engine::schedule;

/// The iterations of a run and the learning rate of each.
#[derive(Clone, Debug)]
pub struct Budget {
    pub total: u64,
    lr: f64,
    schedule: EpochSchedule,
    /// First iteration of every epoch, ascending, starting at 0.
    epoch_starts: Vec<u64>,
}

impl Budget {
    /// `total` iterations with the cosine stepped every iteration (SFR-on).
    pub fn iterations(total: u64, lr: f64) -> Self {
        Budget::iterations_with(total, lr, DecaySchedule::Cosine)
    }

    /// `total` iterations at `lr` moved by `schedule` every iteration.
    pub fn iterations_with(total: u64, lr: f64, schedule: DecaySchedule) -> Self {
        Budget {
            total,
            lr,
            schedule: match schedule {
                DecaySchedule::Cosine => EpochSchedule::Cosine,
                DecaySchedule::Constant => EpochSchedule::Constant,
            },
            epoch_starts: vec![0],
        }
    }

    /// The epoch (0-based) iteration `t` belongs to.
    pub fn epoch(&self, t: u64) -> u32 {
        (self.epoch_starts.partition_point(|&s| s <= t).max(1) - 1) as u32
    }

    /// The learning rate of iteration `t`.
    pub fn lr(&self, t: u64) -> f64 {
        self.lr
            * match self.schedule {
                EpochSchedule::Constant => 1.0,
                EpochSchedule::Cosine => schedule::cosine(t, self.total),
                EpochSchedule::CosineEpochs => {
                    schedule::cosine(u64::from(self.epoch(t)), self.epoch_starts.len() as u64)
                }
            }
    }
}

/// An epoch-based method's sequence of passes: which stream iteration `t`
/// reads, and in which epoch.
#[derive(Clone, Debug)]
pub struct Program {
    /// (first iteration, stream, epoch) of every pass, ascending.
    passes: Vec<(u64, Which, u32)>,
    budget: Budget,
}

impl Program {
    /// `plan.epochs` epochs; epoch `e` makes the passes `epoch(e)` lists as
    /// (stream, batches).
    pub fn new(plan: &EpochPlan, epoch: impl Fn(u32) -> Vec<(Which, u64)>) -> Self {
        let mut passes = Vec::new();
        let mut starts = Vec::new();
        let mut t = 0;
        for e in 0..plan.epochs {
            starts.push(t);
            for (which, batches) in epoch(e) {
                passes.push((t, which, e));
                t += batches;
            }
        }
        Program {
            passes,
            budget: Budget {
                total: t,
                lr: plan.lr,
                schedule: plan.schedule,
                epoch_starts: starts,
            },
        }
    }

    /// The stream iteration `t` reads and its epoch.
    pub fn at(&self, t: u64) -> (Which, u32) {
        let i = self.passes.partition_point(|p| p.0 <= t).max(1) - 1;
        let (_, which, epoch) = self.passes[i];
        (which, epoch)
    }

    pub fn budget(&self) -> Budget {
        self.budget.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(epochs: u32, schedule: EpochSchedule) -> EpochPlan {
        EpochPlan {
            lr: 0.1,
            epochs,
            schedule,
        }
    }

    #[test]
    fn cosine_epochs_match_pytorch_stepped_per_epoch() {
        // CosineAnnealingLR(T_max=4) with scheduler.step(epoch) after each
        // epoch of 3 steps: 0.1, 0.0853553, 0.05, 0.0146447.
        let p = Program::new(&plan(4, EpochSchedule::CosineEpochs), |_| {
            vec![(Which::Remain, 3)]
        });
        let b = p.budget();
        assert_eq!(b.total, 12);
        let want = [0.1, 0.085_355_339, 0.05, 0.014_644_661];
        for t in 0..12 {
            assert!((b.lr(t) - want[(t / 3) as usize]).abs() < 1e-8, "t {t}");
        }
        let constant = Program::new(&plan(2, EpochSchedule::Constant), |_| {
            vec![(Which::Forget, 5)]
        });
        assert!((0..10).all(|t| constant.budget().lr(t) == 0.1));
    }

    #[test]
    fn scrub_like_passes_are_found() {
        let p = Program::new(&plan(3, EpochSchedule::CosineEpochs), |e| {
            let mut v = Vec::new();
            if e < 2 {
                v.push((Which::Forget, 2));
            }
            v.push((Which::Remain, 4));
            v
        });
        let seq: Vec<_> = (0..p.budget().total).map(|t| p.at(t)).collect();
        let f = (Which::Forget, 0);
        let r = (Which::Remain, 0);
        assert_eq!(&seq[..6], &[f, f, r, r, r, r]);
        assert_eq!(seq[6], (Which::Forget, 1));
        assert_eq!(seq[8], (Which::Remain, 1));
        assert_eq!(&seq[12..], &[(Which::Remain, 2); 4]);
        assert_eq!(p.budget().epoch(11), 1);
        assert_eq!(p.budget().epoch(12), 2);
    }
}
