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
//! The component ablations of the paper's Table 4 ([`Ablation`]) run the
//! same loop with parts left out.
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
use crate::config::raw::{DecaySchedule, LossPrecision, UnlearnMethod};
use crate::config::{Saliency, SfronPlan};
use crate::diffusion::{self, draws::Purpose};
use crate::engine::progress::Progress;
use crate::engine::{Local, Outcome, Scale, correct, schedule};

/// SFR-on's components, as the paper names them (Huang et al., NeurIPS
/// 2024, §4 and the ablation of Table 4): **S** the saliency mask, **F** the
/// adaptive forget weights `c_i = 1/(ℓ_i^λ + eps)` (the forget-remain
/// balance of the weighted ascent), **R** the descent on the remain set
/// (the remain-geometry term), **on** the online fast-slow update (a forget
/// step followed by remain steps, which approximates the inverse remain
/// Hessian, against one joint step on both losses). The released code has
/// the switches behind three of them: `self.mask` (S), `unlearn_loss =
/// "adaga" | "ga"` (F: "ga" is the plain ascent, λ = 0 here), and
/// `forget_freq` with separate forget and remain steps (on);
/// `Classification/unlearn/sfron.py`. The joint update is the Euclidean
/// form of the paper's unified direction (its Eq. for the steepest
/// descent): one step along `M ⊙ clip(−α ∇Σ ε_i ℓ_i) + ∇L_r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ablation {
    /// S + F + R + on: SFR-on.
    Full,
    /// R: the remain steps alone (no forget step, no Fisher pass).
    R,
    /// R + on: remain steps interleaved with plain gradient ascent (λ = 0:
    /// every forget row weighs `1/B`), no mask.
    ROn,
    /// F + R + on: the adaptive weights, no mask.
    FROn,
    /// S + F + R, joint: every `K`-th iteration the masked, clipped forget
    /// gradient is added to the remain gradient and one step is taken
    /// (`sfron.remain_clip` then clips the sum); otherwise a remain step.
    Joint,
}

impl Ablation {
    /// The variant a method names (`None`: not SFR-on).
    pub fn of(method: UnlearnMethod) -> Option<Self> {
        Some(match method {
            UnlearnMethod::Sfron => Ablation::Full,
            UnlearnMethod::SfronR => Ablation::R,
            UnlearnMethod::SfronROn => Ablation::ROn,
            UnlearnMethod::SfronFROn => Ablation::FROn,
            UnlearnMethod::SfronJoint => Ablation::Joint,
            _ => return None,
        })
    }

    /// `plan` with this variant's components left out.
    fn apply(self, mut plan: SfronPlan) -> SfronPlan {
        if matches!(self, Ablation::R | Ablation::ROn | Ablation::FROn) {
            plan.saliency = Saliency::None;
        }
        if self == Ablation::ROn {
            plan.lambda = 0.0;
        }
        plan
    }
}

pub struct Sfron {
    plan: SfronPlan,
    ablation: Ablation,
    /// Flat mask (or soft weights) over every parameter; `None`: no mask.
    mask: Option<Tensor>,
}

impl Sfron {
    /// SFR-on under `plan`, or one of its ablations.
    pub fn new(plan: SfronPlan, ablation: Ablation) -> Self {
        Sfron {
            plan: ablation.apply(plan),
            ablation,
            mask: None,
        }
    }

    /// The forget step's edit: the mask, then the clipping.
    fn forget_edit(&self) -> Edit<'_> {
        Edit {
            mask: self.mask.as_ref(),
            clip: self.plan.clip,
            freeze_masked: false,
            clip_first: false,
        }
    }

    /// The forget step of iteration `t` at learning rate `lr`.
    fn forget_step(&mut self, s: &mut Session, t: u64, lr: f64) -> Result<Outcome> {
        let mut out = self.forget_gradient(s, t)?;
        s.finish(
            &mut out,
            &self.forget_edit(),
            lr,
            &format!("iteration {t} (forget step)"),
        )?;
        Ok(out)
    }

    /// The joint update of iteration `t` ([`Ablation::Joint`]): the forget
    /// gradient, edited, added to the remain gradient; one step. The forget
    /// outcome reports its batch (it took no step of its own).
    fn joint_step(&mut self, s: &mut Session, t: u64, lr: f64) -> Result<(Outcome, Outcome)> {
        let mut forget = self.forget_gradient(s, t)?;
        s.engine.edit(&mut forget, &self.forget_edit());
        let pushed = forget.applied.then(|| s.engine.flat_grad().copy());
        let mut remain = s.task_backward(Which::Remain, t)?;
        if let Some(g) = pushed
            && remain.applied
        {
            let _ = s.engine.flat_grad().g_add_(&g);
        }
        let edit = Edit {
            clip: self.plan.remain_clip,
            ..Edit::default()
        };
        s.finish(
            &mut remain,
            &edit,
            lr,
            &format!("iteration {t} (joint step)"),
        )?;
        Ok((forget, remain))
    }

    /// The forget half of iteration `t`: forward, backward and reduction
    /// of `−α_t Σ ε_i ℓ_i` (the mean gradient in `engine.flat_grad()`).
    fn forget_gradient(&mut self, s: &mut Session, t: u64) -> Result<Outcome> {
        let alpha = self.plan.alpha
            * match self.plan.alpha_schedule {
                DecaySchedule::Cosine => schedule::cosine(t, s.iterations()),
                DecaySchedule::Constant => 1.0,
            };
        let global = s.stream(Which::Forget).next_global();
        let batch = s.next(Which::Forget, t)?;
        s.engine.zero_grad();
        // Autograd keeps the running statistics for the backward pass: they
        // are put back after it.
        let frozen = self
            .plan
            .freeze_bn_on_forget
            .then(|| s.engine.buffer_copies());
        // Forget steps run in train mode: this rank's per-row losses ℓ_i and
        // their correct count (none for a denoiser).
        let losses = if !s.model.must_forward(batch.is_empty(), true) {
            None
        } else if let Some(rows) = s
            .task
            .rows(&s.engine, &batch, &global, Purpose::Forget, t, true)
        {
            let den = s.task.denoising(true).expect("a denoiser");
            Some((
                diffusion::loss::per_sample(&s.model, &den, &rows, true),
                0.0,
            ))
        } else {
            let (x, y) = (
                batch.images.to_device(s.device),
                batch.labels.to_device(s.device),
            );
            let keys = s
                .task
                .row_keys(&s.engine, &batch, &global, Purpose::Forget, t);
            Some(ce_losses(
                &s.model,
                (&x, &y, Some(&keys)),
                self.plan.loss_precision,
            ))
        };
        let local = forget_backward(&mut s.engine, losses, &self.plan, alpha);
        if let Some(saved) = frozen {
            s.engine.restore_buffers(&saved);
        }
        s.reduce(local, Scale::Sum, t)
    }
}

/// Per-sample cross-entropy of `logits` `[N, C]` against `labels` `[N]`,
/// differentiable, as `precision` says.
///
/// `Released` is PyTorch's float32 `cross_entropy(reduction="none")`:
/// `logsumexp(z) − z_y` rounds to exactly 0 once `1 + Σ_{j≠y} e^{z_j−z_y}`
/// rounds to 1, i.e. at margins above about 16.6 (`−ln 2^-24`), and its
/// gradient then loses the `z_y` component. `Exact` computes the same
/// function as `ℓ = softplus(logsumexp_{j≠y}(z_j − z_y)) = log(1 + Σ_{j≠y}
/// e^{z_j−z_y})` in float64 (logits are float32, so every difference is
/// exact): relative error a few float64 ulps at any margin up to ~745, where
/// the float64 exponential itself underflows; `≈ Σ_{j≠y} e^{z_j−z_y}` when
/// tiny. Its gradient is `softmax(z) − onehot(y)` without cancellation.
pub fn per_sample_loss(logits: &Tensor, labels: &Tensor, precision: LossPrecision) -> Tensor {
    match precision {
        LossPrecision::Released => {
            logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::None, -100, 0.0)
        }
        LossPrecision::Exact => {
            let z = logits.to_kind(Kind::Double);
            let y = labels.unsqueeze(1);
            let others = (&z - z.gather(1, &y, false)).scatter_value(1, &y, f64::NEG_INFINITY);
            others.logsumexp([1], false).softplus()
        }
    }
}

/// A classifier's forget-step losses: per-row cross-entropy of the
/// train-mode logits of `x` ([`per_sample_loss`]) against `y`, its rows'
/// random choices from `keys` when given, and the rows it gets right.
pub fn ce_losses(
    model: &crate::model::Model,
    (x, y, keys): (&Tensor, &Tensor, Option<&[u64]>),
    precision: LossPrecision,
) -> (Tensor, f64) {
    let logits = match keys {
        Some(keys) => model.forward_keyed(x, true, keys),
        None => model.forward_t(x, true),
    };
    (per_sample_loss(&logits, y, precision), correct(&logits, y))
}

/// The adaptive weights `c_i = 1/(ℓ_i^λ + eps)` of detached losses, in
/// the losses' precision (float64 for `Exact`: finite, positive and
/// non-increasing in `ℓ_i`; float32 for `Released`, where every `ℓ_i = 0`
/// weighs `1/eps`).
pub fn adaptive_weights(losses: &Tensor, lambda: f64, eps: f64) -> Tensor {
    (losses.detach().pow_tensor_scalar(lambda) + eps).reciprocal()
}

/// The forget step's backward pass from this rank's per-row losses `ℓ_i`
/// (a graph, with the rows' correct count; `None`: an empty share, which
/// still joins the normaliser's sum): `c_i = 1/(ℓ_i^λ + eps)` normalised
/// over the global batch, and the backward pass of `−α Σ_i ε_i ℓ_i`. The
/// gradient is left in `.grad` for [`crate::engine::Engine::reduce`] (with
/// [`Scale::Sum`]). The losses are the task's: cross-entropy
/// ([`per_sample_loss`]) or the denoising loss (the release's
/// `adaptive_loss`, the same weights with eps 1e-8).
pub fn forget_backward(
    engine: &mut crate::engine::Engine,
    losses: Option<(Tensor, f64)>,
    plan: &SfronPlan,
    alpha: f64,
) -> Local {
    let mut local = Local::default();
    // This rank's Σ c_i ℓ_i (a graph) and Σ c_i, before the global normaliser.
    let mut weighted = None;
    let mut c_sum = 0.0;
    if let Some((losses, correct)) = losses {
        let kind = losses.kind();
        let c = adaptive_weights(&losses, plan.lambda, plan.weight_eps);
        c_sum = c.sum(kind).double_value(&[]);
        weighted = Some((&c * &losses).sum(kind));
        local = Local {
            loss_sum: losses.sum(kind).double_value(&[]),
            correct,
            count: losses.size()[0] as f64,
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
        Budget::iterations_with(self.plan.iterations, self.plan.lr, self.plan.lr_schedule)
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
        let due = t.is_multiple_of(self.plan.forget_every);
        let before = (self.plan.beta < 1.0).then(|| s.engine.param_copies());
        let (forget, remain) = if self.ablation == Ablation::Joint && due {
            let (forget, remain) = self.joint_step(s, t, lr)?;
            (Some(forget), remain)
        } else {
            let forget = if due && self.ablation != Ablation::R {
                Some(self.forget_step(s, t, lr)?)
            } else {
                None
            };
            let edit = Edit {
                clip: self.plan.remain_clip,
                ..Edit::default()
            };
            (forget, s.task_step(Which::Remain, t, lr, &edit)?)
        };
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
            remain: Some(remain),
            union: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten classes; row `k` has the true class 3 at margin `margins[k]` over
    /// nine other logits at 0: `ℓ = log(1 + 9 e^{−m})` exactly.
    fn rows(margins: &[f64]) -> (Tensor, Tensor, Vec<f64>) {
        let n = margins.len() as i64;
        let mut z = vec![0f32; margins.len() * 10];
        for (k, &m) in margins.iter().enumerate() {
            z[k * 10 + 3] = m as f32;
        }
        let exact = margins
            .iter()
            .map(|&m| (9.0 * (-m).exp()).ln_1p())
            .collect();
        let logits = Tensor::from_slice(&z).view([n, 10]);
        (
            logits,
            Tensor::full([n], 3, (Kind::Int64, tch::Device::Cpu)),
            exact,
        )
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
    }

    #[test]
    fn exact_losses_stay_positive_and_accurate_where_float32_cross_entropy_is_zero() {
        let margins = [0.0, 5.0, 10.0, 17.0, 20.0, 40.0, 60.0, 100.0];
        let (logits, labels, truth) = rows(&margins);
        let released = values(&per_sample_loss(&logits, &labels, LossPrecision::Released));
        let exact = values(&per_sample_loss(&logits, &labels, LossPrecision::Exact));
        // float32: 1 + 9e^-m rounds to 1 from m ≈ 18.8 on (ln 9 + 16.6).
        assert!(released[..3].iter().all(|&l| l > 0.0), "{released:?}");
        assert!(released[4..].iter().all(|&l| l == 0.0), "{released:?}");
        for (k, (&e, &t)) in exact.iter().zip(&truth).enumerate() {
            // A handful of float64 operations on exact differences: a few ulps.
            assert!(
                (e - t).abs() <= 1e-14 * t,
                "margin {}: {e:e} vs {t:e}",
                margins[k]
            );
        }
    }

    #[test]
    fn exact_weights_are_finite_positive_and_ordered_by_loss_where_released_ones_tie() {
        let margins: Vec<f64> = (0..=20).map(|k| 5.0 * k as f64).collect();
        let (logits, labels, _) = rows(&margins);
        for lambda in [0.5, 1.0] {
            let losses = values(&per_sample_loss(&logits, &labels, LossPrecision::Exact));
            let exact = values(&adaptive_weights(
                &per_sample_loss(&logits, &labels, LossPrecision::Exact),
                lambda,
                1e-15,
            ));
            assert!(exact.iter().all(|c| c.is_finite() && *c > 0.0), "{exact:?}");
            // Losses fall as the margin grows, so weights must rise: strictly
            // while float64 still resolves ℓ^λ next to the 1e-15 of the
            // formula (ℓ^λ > 1e-15 · 2^-52 ≈ 2e-31; 1e-29 here), and never
            // fall beyond (the formula's own cap of 1e15).
            for (k, w) in exact.windows(2).enumerate() {
                let strict = losses[k + 1].powf(lambda) > 1e-29;
                assert!(
                    w[0] < w[1] || (!strict && w[0] <= w[1]),
                    "λ {lambda}, margins {} and {}: {exact:?}",
                    margins[k],
                    margins[k + 1]
                );
            }
            let released = values(&adaptive_weights(
                &per_sample_loss(&logits, &labels, LossPrecision::Released),
                lambda,
                1e-15,
            ));
            // Every margin past float32's cut-off weighs the same 1e15.
            let tied = released.iter().filter(|&&c| c == released[20]).count();
            assert!(tied >= 16, "λ {lambda}: {released:?}");
        }
    }

    #[test]
    fn exact_loss_gradient_keeps_the_true_class_component() {
        // ∂ℓ/∂z = softmax(z) − onehot(y); at margin 20 float32 loses the
        // true class's −(1 − p_y) entirely.
        let (logits, labels, _) = rows(&[20.0]);
        for (precision, lost) in [
            (LossPrecision::Released, true),
            (LossPrecision::Exact, false),
        ] {
            let z = logits.set_requires_grad(true);
            let loss = per_sample_loss(&z, &labels, precision).sum(Kind::Double);
            let g = values(&Tensor::run_backward(&[loss], &[&z], false, false)[0]);
            let p_other = (-20f64).exp() / (1.0 + 9.0 * (-20f64).exp());
            assert!((g[0] - p_other).abs() <= 1e-6 * p_other, "{g:?}");
            if lost {
                assert_eq!(g[3], 0.0);
            } else {
                assert!(
                    (g[3] + 9.0 * p_other).abs() <= 1e-6 * 9.0 * p_other,
                    "{g:?}"
                );
            }
        }
    }
}
