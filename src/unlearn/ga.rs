//! GA (DESIGN §1.3): minimise −CE on the forget set in eval mode (BatchNorm
//! uses and keeps its running statistics), the gradient's global L2 norm
//! clipped to `ga.clip` (released: 0.1, SGD 1e-4 constant, 9 epochs).
//! On a diffusion model: minimise the negated denoising loss of the forget
//! class in train mode, as the DDPM release's `--unlearn_loss ga` does.

use anyhow::Result;

use super::{Budget, Edit, Iteration, Method, Program, Session, Which, batches, ce};
use crate::config::GaPlan;
use crate::diffusion::loss::per_sample;
use crate::engine::progress::Progress;
use crate::model::Task;

pub struct Ga {
    plan: GaPlan,
}

impl Ga {
    pub fn new(plan: GaPlan) -> Self {
        Ga { plan }
    }
}

impl Method for Ga {
    fn budget(&mut self, s: &mut Session) -> Budget {
        let forget = batches(s, Which::Forget);
        Program::new(&self.plan.budget, |_| vec![(Which::Forget, forget)]).budget()
    }

    fn prepare(&mut self, _: &mut Session, _: &mut Progress) -> Result<bool> {
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let edit = Edit {
            clip: self.plan.clip,
            ..Edit::default()
        };
        let lr = s.lr(t);
        let out = match s.task.task() {
            Task::Classify => s.step(Which::Forget, t, lr, false, &edit, &mut |logits, rows| {
                let (losses, labels) = ce(logits, rows);
                (-losses, labels)
            })?,
            Task::Denoise => {
                let mut out = s.denoise_backward(Which::Forget, t, true, &mut |m, den, rows| {
                    -per_sample(m, den, rows, true)
                })?;
                s.finish(&mut out, &edit, lr, &format!("iteration {t} (forget step)"))?;
                out
            }
        };
        Ok(Iteration::one(Which::Forget, out))
    }
}
