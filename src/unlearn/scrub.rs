//! SCRUB (Kurmanji et al., NeurIPS 2023; DESIGN §1.3): the student (the
//! original) is distilled from the frozen original. Epoch `e` starts, for
//! `e < scrub.max_epochs`, with a max-pass over the forget set (minimise
//! `−T² KL(p_t ‖ p_s)`), then a min-pass over the remain set (minimise
//! `γ CE + α T² KL`), one optimizer throughout, the student in train mode and
//! the teacher in eval mode, softmax at temperature T (released CIFAR-10:
//! γ 0.99, α 0.001, T 4, 2 max-epochs of 6, SGD 8e-5, cosine per epoch).
//! The released smoothing term and weight averaging are off in those
//! settings (smoothing 0, averaging from epoch 10 of 6) and are not built.

use anyhow::{Context, Result};
use tch::Kind;

use super::{
    Budget, Edit, Iteration, Method, Program, Session, Which, batches, ce, frozen_copy, kl_rows,
    teacher_logits,
};
use crate::config::ScrubPlan;
use crate::engine::progress::Progress;
use crate::model::Model;

pub struct Scrub {
    plan: ScrubPlan,
    program: Option<Program>,
    teacher: Option<Model>,
}

impl Scrub {
    pub fn new(plan: ScrubPlan) -> Self {
        Scrub {
            plan,
            program: None,
            teacher: None,
        }
    }
}

impl Method for Scrub {
    fn budget(&mut self, s: &mut Session) -> Budget {
        let (forget, remain) = (batches(s, Which::Forget), batches(s, Which::Remain));
        let max_epochs = self.plan.max_epochs;
        let program = Program::new(&self.plan.budget, |e| {
            let mut passes = Vec::new();
            if e < max_epochs {
                passes.push((Which::Forget, forget));
            }
            passes.push((Which::Remain, remain));
            passes
        });
        let budget = program.budget();
        self.program = Some(program);
        budget
    }

    fn prepare(&mut self, s: &mut Session, _: &mut Progress) -> Result<bool> {
        self.teacher = Some(frozen_copy(s)?);
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let program = self.program.as_ref().context("SCRUB: no budget")?;
        let teacher = self.teacher.as_ref().context("SCRUB: not prepared")?;
        let (which, _) = program.at(t);
        let p = self.plan;
        let t2 = p.temperature * p.temperature;
        let out = s.step(
            which,
            t,
            s.lr(t),
            true,
            &Edit::default(),
            &mut |logits, rows| {
                let target =
                    (teacher_logits(teacher, &rows.x) / p.temperature).softmax(-1, Kind::Float);
                let kl = kl_rows(logits, &target, p.temperature) * t2;
                match which {
                    Which::Forget => (-kl, rows.labels.shallow_clone()),
                    _ => {
                        let (losses, labels) = ce(logits, rows);
                        (losses * p.gamma + kl * p.alpha, labels)
                    }
                }
            },
        )?;
        Ok(Iteration::one(which, out))
    }
}
