//! RL and SalUn on a diffusion model, as the DDPM release's
//! `saliency_unlearn` mode (`DDPM/runners/diffusion.py`) runs them with
//! `--unlearn_loss rl` (`[diffusion_rl]`; SalUn adds the mask).
//!
//! Iteration `t`: one joint step on a remain batch `R` and a forget batch
//! `F` (train mode: condition dropout and dropout as in training), with
//! noise `ε` and timesteps `t_i` drawn per row:
//!
//! `L = α_f · mean_{i∈F, pixels} (ε_θ(x_{t_i}, c_i) − sg ε_θ(x_{t_i}, c'_i))²
//!    + α_r · mean_{i∈R} ‖ε_i − ε_θ(x_{t_i}, c_i)‖²`,
//!
//! `c' = (c + 1) mod K` (the release's `(label_to_forget + 1) % 10`): the
//! forget class is taught to denoise as the next class does.
//!
//! With `target = "loss"` (the DiT release's `forget.py --unlearn-loss rl
//! --method joint`, `c' = (c + 100) mod 1000` with `label_offset = 100`)
//! the forget half is instead the denoiser's own training loss under `c'`:
//! `α_f · mean_{i∈F} ℓ(x_i, t_i, c'_i)`, the per-row loss of the model's
//! process (ADM's MSE + VB for a DiT). The gradient's
//! L2 norm is clipped to `clip`, then (SalUn) multiplied by the mask, and
//! the optimizer steps at a constant rate. Both means are over the *global*
//! batches, so the step does not depend on the rank count.
//!
//! SalUn's mask keeps the `mask_fraction` of weights with the largest
//! `|Σ_b clip(∇ mean_{i∈b} ℓ_i)|` over the forget set, `ℓ_i` the loss of the
//! guided prediction (w = `mask_guidance`) in eval mode
//! ([`saliency::top_gradient_mask_with`]).

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{Budget, Edit, Iteration, Method, Session, Which, saliency};
use crate::config::raw::{DecaySchedule, DiffusionRlSection, RelabelTarget};
use crate::diffusion::draws::Purpose;
use crate::diffusion::loss::{Rows, per_sample};
use crate::engine::progress::Progress;
use crate::engine::{Local, Scale};
use crate::model::unet::{Cond, Dropout};

pub struct DiffusionRl {
    plan: DiffusionRlSection,
    /// SalUn: mask the gradient.
    masked: bool,
    mask: Option<Tensor>,
}

impl DiffusionRl {
    pub fn new(plan: DiffusionRlSection, masked: bool) -> Self {
        DiffusionRl {
            plan,
            masked,
            mask: None,
        }
    }
}

/// `c' = (c + label_offset) mod classes`.
fn pseudo_labels(c: &Tensor, offset: i64, classes: i64) -> Tensor {
    (c + offset).remainder(classes)
}

/// Per-row `Σ_pixels (ε_θ(x_t, c) − sg ε_θ(x_t, c'))²` of the forget rows
/// (the predicted noise: a learned variance's channels are left out).
/// The target pass uses its own condition-dropout and dropout draws
/// (`Purpose::Target`), as the release's second forward pass draws anew.
fn relabel_losses(s: &Session, rows: &Rows, target: &Rows, offset: i64) -> Tensor {
    let den = s.task.denoising(true).expect("a denoiser");
    let d = &rows.draws;
    let xt = den.schedule.noised(&rows.x0, &d.t, &d.noise);
    let pseudo = pseudo_labels(&rows.c, offset, s.model.classes);
    let target_eps = tch::no_grad(|| {
        let cond = Cond {
            t: &d.t,
            c: &pseudo,
            keep: (den.cond_drop > 0.0).then_some(&target.draws.keep),
        };
        s.model
            .denoise(&xt, &cond, &Dropout::Keyed(&target.draws.dropout))
    });
    let cond = Cond {
        t: &d.t,
        c: &rows.c,
        keep: (den.cond_drop > 0.0).then_some(&d.keep),
    };
    let eps = s.model.denoise(&xt, &cond, &Dropout::Keyed(&d.dropout));
    // The noise channels (a DiT with learn_sigma has its variance after them).
    let c = rows.x0.size()[1];
    (eps.narrow(1, 0, c) - target_eps.narrow(1, 0, c))
        .square()
        .sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float)
}

impl Method for DiffusionRl {
    fn budget(&mut self, _: &mut Session) -> Budget {
        Budget::iterations_with(self.plan.iterations, self.plan.lr, DecaySchedule::Constant)
    }

    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool> {
        if !self.masked {
            return Ok(true);
        }
        let started = std::time::Instant::now();
        let batch = match self.plan.mask_batch {
            0 => s.plan.unlearn.forget_batch,
            n => n as usize,
        };
        let clip = (self.plan.mask_clip > 0.0).then_some(self.plan.mask_clip);
        let Some(mask) = saliency::top_gradient_mask_with(
            s,
            self.plan.mask_fraction,
            batch,
            (self.plan.mask_guidance, clip),
        )?
        else {
            return Ok(false);
        };
        let mut meta = BTreeMap::new();
        meta.insert(
            "diffusion_rl.mask_fraction".into(),
            self.plan.mask_fraction.to_string(),
        );
        saliency::publish_mask(
            s,
            progress,
            (&mask, started, "SalUn mask (diffusion)"),
            meta,
        )?;
        self.mask = Some(mask);
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        s.engine.zero_grad();
        let mut local = Local::default();
        // The remain half: α_r / |R| · Σ_{i∈R} ℓ_i.
        let global = s.stream(Which::Remain).next_global();
        let batch = s.next(Which::Remain, t)?;
        // An empty share (more ranks than rows) adds nothing, and joins the
        // reduction.
        let rows = (!batch.is_empty())
            .then(|| {
                s.task
                    .rows(&s.engine, &batch, &global, Purpose::Remain, t, true)
            })
            .flatten();
        if let Some(rows) = rows {
            let den = s.task.denoising(true).expect("a denoiser");
            let sum = per_sample(&s.model, &den, &rows, true).sum(Kind::Float);
            let scaled = &sum * (self.plan.remain_alpha / global.len() as f64);
            local.loss_sum += scaled.double_value(&[]);
            s.engine.backward(&scaled);
        }
        // The forget half: α_f / (|F| · pixels) · Σ_{i∈F} Σ_pixels (ε − sg ε')².
        let global = s.stream(Which::Forget).next_global();
        let batch = s.next(Which::Forget, t)?;
        let rows = s
            .task
            .rows(&s.engine, &batch, &global, Purpose::Forget, t, true);
        let target = s
            .task
            .rows(&s.engine, &batch, &global, Purpose::Target, t, true);
        if let (Some(rows), Some(target), false) = (rows, target, batch.is_empty()) {
            let scaled = match self.plan.target {
                RelabelTarget::Prediction => {
                    let pixels = rows.x0.size()[1..].iter().product::<i64>() as f64;
                    let sum =
                        relabel_losses(s, &rows, &target, self.plan.label_offset).sum(Kind::Float);
                    sum * (self.plan.forget_alpha / (global.len() as f64 * pixels))
                }
                RelabelTarget::Loss => {
                    let den = s.task.denoising(true).expect("a denoiser");
                    let relabelled = Rows {
                        c: pseudo_labels(&rows.c, self.plan.label_offset, s.model.classes),
                        ..rows
                    };
                    let sum = per_sample(&s.model, &den, &relabelled, true).sum(Kind::Float);
                    sum * (self.plan.forget_alpha / global.len() as f64)
                }
            };
            local.loss_sum += scaled.double_value(&[]);
            s.engine.backward(&scaled);
        }
        // Rank 0 counts the step once: the reduced loss is the joint loss.
        local.count = f64::from(u8::from(s.comm.is_root()));
        let mut out = s.reduce(local, Scale::Sum, t)?;
        let edit = Edit {
            mask: self.mask.as_ref(),
            clip: (self.plan.clip > 0.0).then_some(self.plan.clip),
            freeze_masked: false,
            // The release clips, then masks.
            clip_first: true,
        };
        s.finish(
            &mut out,
            &edit,
            s.lr(t),
            &format!("iteration {t} (joint step)"),
        )?;
        Ok(Iteration::one(Which::Union, out))
    }
}
