//! SFR-on (Huang et al., NeurIPS 2024; DESIGN §1.1-1.2): saliency-masked,
//! adaptively weighted gradient ascent on the forget set, interleaved with
//! descent on the remain set, with one shared optimizer.
//!
//! Iteration `t` of `T`, as [`Sfron::iteration`] reads:
//! 1. every `K`-th iteration a forget step: per-sample cross-entropy `ℓ_i` of
//!    the global forget batch (train mode), weights `c_i = 1/(ℓ_i^λ + 1e-15)`
//!    normalised over the *global* batch (the sum all-reduced), loss
//!    `−α_t Σ_i ε_i ℓ_i`; the reduced gradient is multiplied by the mask,
//!    its global L2 norm clipped to `c`, and the optimizer steps at `η_t`;
//! 2. a remain step: mean cross-entropy of the global remain batch, reduced,
//!    optimizer step at `η_t` (no mask, no clipping);
//! 3. slow weights `θ ← θ_prev + β(θ − θ_prev)` (skipped at β = 1, where it is
//!    the identity: the released code copies the model every step for it).
//!
//! `η_t = η(1 + cos(πt/T))/2` and `α_t = α(1 + cos(πt/T))/2`.
//!
//! Released behaviour kept: forget steps run in train mode and update the
//! BatchNorm running statistics with forget data; weight decay and momentum
//! move masked parameters too. `sfron.freeze_bn_on_forget = true` restores
//! the running statistics after each forget forward pass.

use anyhow::Result;
use serde_json::json;
use tch::{Kind, Reduction, Tensor};

use super::saliency::{self, Fisher};
use super::{Budget, Edit, Iteration, Method, Session, Which};
use crate::config::{Saliency, SfronPlan};
use crate::engine::progress::Progress;
use crate::engine::{Local, Outcome, Scale, correct, schedule};

/// Added to `ℓ_i^λ` before the reciprocal (DESIGN §1.2).
const WEIGHT_EPS: f64 = 1e-15;

pub struct Sfron {
    plan: SfronPlan,
    /// Flat mask (or soft weights) over every parameter; `None`: no mask.
    mask: Option<Tensor>,
}

impl Sfron {
    pub fn new(plan: SfronPlan) -> Self {
        Sfron { plan, mask: None }
    }

    /// The forget step of iteration `t` at learning rate `lr`.
    fn forget_step(&mut self, s: &mut Session, t: u64, lr: f64) -> Result<Outcome> {
        let alpha = self.plan.alpha * schedule::cosine(t, s.iterations());
        let batch = s.next(Which::Forget, t)?;
        s.engine.zero_grad();
        // Autograd keeps the running statistics for the backward pass: they
        // are put back after it.
        let frozen = self
            .plan
            .freeze_bn_on_forget
            .then(|| s.engine.buffer_copies());
        let rows = (!batch.is_empty()).then(|| {
            (
                batch.images.to_device(s.device),
                batch.labels.to_device(s.device),
            )
        });
        let local = forget_backward(
            &s.model,
            &mut s.engine,
            rows.as_ref().map(|(x, y)| (x, y)),
            self.plan.lambda,
            alpha,
        );
        if let Some(saved) = frozen {
            s.engine.restore_buffers(&saved);
        }
        let mut out = s.reduce(local, Scale::Sum, t)?;
        let edit = Edit {
            mask: self.mask.as_ref(),
            clip: self.plan.clip,
            freeze_masked: false,
        };
        s.finish(&mut out, &edit, lr, &format!("iteration {t} (forget step)"))?;
        Ok(out)
    }
}

/// The forget step's loss and backward pass on this rank's share `rows`
/// (images, labels; `None`: an empty share, which still joins the
/// normaliser's sum): per-sample cross-entropy `ℓ_i` in train mode,
/// `c_i = 1/(ℓ_i^λ + 1e-15)` normalised over the global batch, and the
/// backward pass of `−α Σ_i ε_i ℓ_i`. The gradient is left in `.grad` for
/// [`crate::engine::Engine::reduce`] (with [`Scale::Sum`]).
pub fn forget_backward(
    model: &crate::model::Model,
    engine: &mut crate::engine::Engine,
    rows: Option<(&Tensor, &Tensor)>,
    lambda: f64,
    alpha: f64,
) -> Local {
    let mut local = Local::default();
    // This rank's Σ c_i ℓ_i (a graph) and Σ c_i, before the global normaliser.
    let mut weighted = None;
    let mut c_sum = 0.0;
    if let Some((x, y)) = rows {
        let logits = model.forward_t(x, true);
        let losses = logits.cross_entropy_loss::<Tensor>(y, None, Reduction::None, -100, 0.0);
        let c = (losses.detach().pow_tensor_scalar(lambda) + WEIGHT_EPS).reciprocal();
        c_sum = c.sum(Kind::Float).double_value(&[]);
        weighted = Some((&c * &losses).sum(Kind::Float));
        local = Local {
            loss_sum: losses.sum(Kind::Float).double_value(&[]),
            correct: correct(&logits, y),
            count: y.size()[0] as f64,
        };
    }
    // ε_i = c_i / Σ_j c_j over the global batch.
    let t0 = std::time::Instant::now();
    let c_total = engine.comm().sum_scalar(c_sum);
    engine.comm_seconds += t0.elapsed().as_secs_f64();
    if let Some(w) = weighted {
        engine.backward(&(w * (-alpha / c_total)));
    }
    local
}

impl Method for Sfron {
    fn budget(&mut self, _: &mut Session) -> Budget {
        Budget::iterations(self.plan.iterations, self.plan.lr)
    }

    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool> {
        if self.plan.saliency == Saliency::None {
            return Ok(true);
        }
        let Some(fisher): Option<Fisher> = saliency::fisher_pair(s)? else {
            return Ok(false);
        };
        let mask = saliency::mask(&fisher, self.plan.saliency).expect("a masking rule");
        let kept = saliency::kept(s, &mask);
        let total: f64 = mask.ne(0.0).sum(Kind::Float).double_value(&[]) / mask.numel() as f64;
        tracing::info!(
            kept = format!("{:.2}%", 100.0 * total),
            reused = fisher.reused,
            forget_batches = fisher.batches.0,
            remain_batches = fisher.batches.1,
            seconds = format!("{:.1}", fisher.seconds),
            "saliency mask"
        );
        for (name, frac) in &kept {
            tracing::debug!(param = %name, kept = format!("{:.2}%", 100.0 * frac), "mask");
        }
        progress.record(json!({
            "event": "saliency", "step": 0, "reused": fisher.reused,
            "seconds": fisher.seconds, "kept": total,
            "batches": {"forget": fisher.batches.0, "remain": fisher.batches.1},
            "kept_per_param": kept.iter().map(|(n, f)| (n.clone(), json!(f))).collect::<serde_json::Map<_, _>>(),
        }))?;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("sfron.saliency".into(), format!("{:?}", self.plan.saliency));
        meta.insert("sfron.kept".into(), format!("{total}"));
        saliency::save_mask(s, &mask, meta)?;
        self.mask = Some(mask);
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let lr = s.lr(t);
        let before = (self.plan.beta < 1.0).then(|| s.engine.param_copies());
        let forget = if t.is_multiple_of(self.plan.forget_every) {
            Some(self.forget_step(s, t, lr)?)
        } else {
            None
        };
        let remain = Some(s.ce_step(Which::Remain, t, lr)?);
        if let Some(prev) = before {
            // θ ← θ_prev + β(θ − θ_prev)
            tch::no_grad(|| {
                for (p, q) in s.engine.params.iter().zip(&prev) {
                    let mixed = q + (p - q) * self.plan.beta;
                    p.shallow_clone().copy_(&mixed);
                }
            });
        }
        Ok(Iteration {
            forget,
            remain,
            union: None,
        })
    }
}
