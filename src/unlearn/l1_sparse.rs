//! ℓ1-sparse (Jia et al., NeurIPS 2023; DESIGN §1.3): FT with the penalty
//! `α_e ‖θ‖₁` over every parameter, its coefficient decaying linearly by
//! epoch: `α_e = α (1 − e / (E − E₀))` for `e < E − E₀` and 0 after (`E₀ =
//! l1_sparse.no_l1_epochs`; `α` throughout when `E = E₀`), as released. The
//! penalty's gradient `α_e sign(θ)` is the same on every rank, so it is added
//! once to the reduced gradient.

use anyhow::Result;

use super::{Budget, Edit, Iteration, Method, Program, Session, Which, batches, ce};
use crate::config::L1SparsePlan;
use crate::engine::progress::Progress;

pub struct L1Sparse {
    plan: L1SparsePlan,
}

impl L1Sparse {
    pub fn new(plan: L1SparsePlan) -> Self {
        L1Sparse { plan }
    }

    /// The penalty's coefficient in epoch `e`.
    fn alpha(&self, e: u32) -> f64 {
        let decaying = self.plan.budget.epochs - self.plan.no_l1_epochs;
        if e < decaying {
            self.plan.alpha * (1.0 - f64::from(e) / f64::from(decaying))
        } else if decaying == 0 {
            self.plan.alpha
        } else {
            0.0
        }
    }
}

impl Method for L1Sparse {
    fn budget(&mut self, s: &mut Session) -> Budget {
        let remain = batches(s, Which::Remain);
        Program::new(&self.plan.budget, |_| vec![(Which::Remain, remain)]).budget()
    }

    fn prepare(&mut self, _: &mut Session, _: &mut Progress) -> Result<bool> {
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let mut out = s.backward(Which::Remain, t, true, &mut ce)?;
        let alpha = self.alpha(s.budget.epoch(t));
        if out.applied && alpha > 0.0 {
            tch::no_grad(|| {
                for (p, g) in s.engine.params.iter().zip(s.engine.grads()) {
                    let _ = g.shallow_clone().g_add_(&(p.sign() * alpha));
                }
            });
        }
        s.finish(
            &mut out,
            &Edit::default(),
            s.lr(t),
            &format!("iteration {t} (remain step)"),
        )?;
        Ok(Iteration::one(Which::Remain, out))
    }
}
