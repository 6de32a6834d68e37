//! FT (DESIGN §1.3): fine-tune on the remain set, cross-entropy in train
//! mode, `ft.epochs` passes (released: SGD 0.01, 10 epochs, cosine per epoch).

use anyhow::Result;

use super::{Budget, Iteration, Method, Program, Session, Which, batches};
use crate::config::EpochPlan;
use crate::engine::progress::Progress;

pub struct Ft {
    plan: EpochPlan,
}

impl Ft {
    pub fn new(plan: EpochPlan) -> Self {
        Ft { plan }
    }
}

impl Method for Ft {
    fn budget(&mut self, s: &mut Session) -> Budget {
        let remain = batches(s, Which::Remain);
        Program::new(&self.plan, |_| vec![(Which::Remain, remain)]).budget()
    }

    fn prepare(&mut self, _: &mut Session, _: &mut Progress) -> Result<bool> {
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let out = s.ce_step(Which::Remain, t, s.lr(t))?;
        Ok(Iteration::one(Which::Remain, out))
    }
}
