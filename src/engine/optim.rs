//! Optimizers with PyTorch's update rules, their state held as tensors so a
//! checkpoint can save it and a resume can restore it exactly.
//!
//! Gradients come in as separate tensors (views into the reduced flat buffer),
//! never from `.grad()`, so a step applies exactly what every rank agreed on.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::config::OptimizerPlan;

/// One optimizer over a fixed, ordered list of parameters.
#[derive(Debug)]
pub struct Optimizer {
    plan: OptimizerPlan,
    /// Per parameter: SGD's momentum buffer, or Adam's (exp_avg, exp_avg_sq).
    slots: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// Steps applied (Adam's bias correction counts them).
    steps: u64,
    /// AdamW's two temporaries, as long as the largest parameter, reused
    /// for every parameter (not state: never saved).
    scratch: Option<[Tensor; 2]>,
}

impl Optimizer {
    pub fn new(plan: OptimizerPlan, params: usize) -> Self {
        Optimizer {
            plan,
            slots: (0..params).map(|_| None).collect(),
            steps: 0,
            scratch: None,
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one step with learning rate `lr` to `params` given `grads`
    /// (same order and shapes). PyTorch's rules:
    /// - SGD: `d = g + wd·p`; `b = d` on the first step, else `b = μ·b + d`;
    ///   `d = d + μ·b` (Nesterov) or `d = b`; `p -= lr·d`.
    /// - AdamW: `p *= 1 − lr·wd`; `m = β₁m + (1−β₁)g`; `v = β₂v + (1−β₂)g²`;
    ///   `p -= lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        assert_eq!(params.len(), self.slots.len(), "parameter count changed");
        self.steps += 1;
        let t = self.steps as i32;
        tch::no_grad(|| match self.plan {
            OptimizerPlan::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                // One fused kernel per update, as PyTorch's `add(…, alpha=)`:
                // `x.addcmul(y, s)` is x + y·s with s a 0-dim tensor.
                let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
                let scalar = |v: f64| Tensor::from(v as f32).to_device(device);
                let (wd, neg_lr, mom) = (scalar(weight_decay), scalar(-lr), scalar(momentum));
                for ((p, g), slot) in params.iter().zip(grads).zip(&mut self.slots) {
                    let mut d = if weight_decay != 0.0 {
                        g.addcmul(p, &wd)
                    } else {
                        g.shallow_clone()
                    };
                    if momentum != 0.0 {
                        let buf = match slot {
                            Some((buf, _)) => {
                                let _ = buf.g_mul_scalar_(momentum).g_add_(&d);
                                buf.shallow_clone()
                            }
                            None => {
                                let buf = d.copy();
                                *slot = Some((buf.shallow_clone(), None));
                                buf
                            }
                        };
                        d = if nesterov { d.addcmul(&buf, &mom) } else { buf };
                    }
                    let _ = p.shallow_clone().addcmul_(&d, &neg_lr);
                }
            }
            OptimizerPlan::AdamW {
                betas: [b1, b2],
                eps,
                weight_decay,
            } => {
                // PyTorch's single-tensor AdamW (its CPU default), kernel
                // for kernel: `m.lerp_(g, 1−β₁)`,
                // `v.mul_(β₂).addcmul_(g, g, value=1−β₂)`,
                // `denom = (v.sqrt() / √bc₂).add_(ε)`,
                // `p.addcdiv_(m, denom, value=−lr/bc₁)`. tch's addcmul_ and
                // addcdiv_ take no `value`; PyTorch's kernels apply it
                // first (`v + (value·g)·g`, `p + (value·m)/denom`), so it is
                // folded into the first factor here, written into reused
                // scratch: the same roundings (torch.optim.AdamW's weights,
                // bit for bit) and no allocation per parameter.
                let bc1 = 1.0 - b1.powi(t);
                let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
                let scratch = self.scratch.get_or_insert_with(|| {
                    let largest = params.iter().map(Tensor::numel).max().unwrap_or(0) as i64;
                    let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
                    [0, 1].map(|_| Tensor::empty([largest], (tch::Kind::Float, device)))
                });
                for ((p, g), slot) in params.iter().zip(grads).zip(&mut self.slots) {
                    let (m, v) = slot.get_or_insert_with(|| (p.zeros_like(), Some(p.zeros_like())));
                    let v = v.as_mut().expect("adam keeps two moments");
                    let mut p = p.shallow_clone();
                    let [a, b] = scratch
                        .each_ref()
                        .map(|s| s.narrow(0, 0, p.numel() as i64).view(p.size().as_slice()));
                    if weight_decay != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                    }
                    let _ = m.lerp_(g, 1.0 - b1);
                    let _ = g.mul_scalar_out(&a, 1.0 - b2);
                    let _ = v.g_mul_scalar_(b2).addcmul_(&a, g);
                    let mut denom = v.sqrt_out(&a);
                    let _ = denom.g_div_scalar_(bc2_sqrt).g_add_scalar_(eps);
                    let _ = m.mul_scalar_out(&b, -lr / bc1);
                    let _ = p.addcdiv_(&b, &denom);
                }
            }
        });
    }

    /// The state as named tensors (`<prefix><param name>`) plus the step count.
    pub fn state(&self, names: &[String]) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::new();
        for (name, slot) in names.iter().zip(&self.slots) {
            if let Some((a, b)) = slot {
                let first = match self.plan {
                    OptimizerPlan::Sgd { .. } => "momentum_buffer",
                    OptimizerPlan::AdamW { .. } => "exp_avg",
                };
                out.push((format!("{first}.{name}"), a.shallow_clone()));
                if let Some(b) = b {
                    out.push((format!("exp_avg_sq.{name}"), b.shallow_clone()));
                }
            }
        }
        (out, self.steps)
    }

    /// Restores what [`Optimizer::state`] saved; `tensors` maps saved names to
    /// tensors. Every parameter must have all of its slots or none.
    pub fn restore(
        &mut self,
        names: &[String],
        params: &[Tensor],
        tensors: &BTreeMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let (first, second) = match self.plan {
            OptimizerPlan::Sgd { .. } => ("momentum_buffer", None),
            OptimizerPlan::AdamW { .. } => ("exp_avg", Some("exp_avg_sq")),
        };
        for ((name, p), slot) in names.iter().zip(params).zip(&mut self.slots) {
            let fetch = |prefix: &str| -> Result<Option<Tensor>, String> {
                match tensors.get(&format!("{prefix}.{name}")) {
                    None => Ok(None),
                    Some(t) if t.size() != p.size() => Err(format!(
                        "{prefix}.{name} has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.size()
                    )),
                    Some(t) => Ok(Some(t.to_kind(p.kind()).to_device(p.device()))),
                }
            };
            *slot = match (fetch(first)?, second.map(fetch).transpose()?.flatten()) {
                (None, None) => None,
                (Some(a), b) if second.is_some() == b.is_some() => Some((a, b)),
                _ => return Err(format!("optimizer state of {name} is incomplete")),
            };
        }
        self.steps = steps;
        Ok(())
    }
}
