//! Optimizers with PyTorch's update rules, their state held as tensors so a
//! checkpoint can save it and a resume can restore it exactly.
//!
//! Gradients come in as separate tensors (views into the reduced flat buffer),
//! never from `.grad()`, so a step applies exactly what every rank agreed on.

use std::collections::BTreeMap;

use std::ffi::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::config::OptimizerPlan;

/// One optimizer over a fixed, ordered list of parameters.
#[derive(Debug)]
pub struct Optimizer {
    plan: OptimizerPlan,
    /// Per parameter: SGD's momentum buffer, or Adam's (exp_avg, exp_avg_sq).
    slots: Vec<Option<(Tensor, Option<Tensor>)>>,
    /// Steps applied (Adam's bias correction counts them).
    steps: u64,
}

impl Optimizer {
    pub fn new(plan: OptimizerPlan, params: usize) -> Self {
        Optimizer {
            plan,
            slots: (0..params).map(|_| None).collect(),
            steps: 0,
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
    ///   `p -= lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`, by libtorch's fused
    ///   kernel over every parameter at once (`torch.optim.AdamW(fused=True)`,
    ///   its numbers bit for bit: the unfused default rounds in another
    ///   order, in the last bit of a fraction of the entries).
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        assert_eq!(params.len(), self.slots.len(), "parameter count changed");
        self.steps += 1;
        let t = self.steps;
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
                let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
                // The fused kernel reads every tensor of a parameter as one
                // flat array: the moments are kept contiguous, and a
                // parameter in another layout (channels-last convolution
                // weights) is stepped on a contiguous copy, copied back.
                let mut work = Vec::with_capacity(params.len());
                let (mut ms, mut vs) = (Vec::new(), Vec::new());
                for (p, slot) in params.iter().zip(&mut self.slots) {
                    let zeros = || Tensor::zeros(p.size(), (p.kind(), p.device()));
                    let (m, v) = slot.get_or_insert_with(|| (zeros(), Some(zeros())));
                    let v = v.as_mut().expect("adam keeps two moments");
                    for moment in [&mut *m, &mut *v] {
                        if !moment.is_contiguous() {
                            *moment = moment.contiguous();
                        }
                    }
                    ms.push(m.shallow_clone());
                    vs.push(v.shallow_clone());
                    work.push(p.contiguous());
                }
                let grads: Vec<Tensor> = grads.iter().map(Tensor::contiguous).collect();
                let step = Tensor::from(t as f32).to_device(device);
                let hyper = AdamW {
                    lr,
                    beta1: b1,
                    beta2: b2,
                    weight_decay,
                    eps,
                };
                if let Err(e) = fused_adamw(&work, &grads, &ms, &vs, &step, &hyper) {
                    panic!("AdamW step: {e}");
                }
                for (p, w) in params.iter().zip(&work) {
                    if !p.is_contiguous() {
                        p.shallow_clone().copy_(w);
                    }
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

/// AdamW's hyperparameters for one step.
struct AdamW {
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
}

unsafe extern "C" {
    fn sfron_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// One AdamW step of every parameter through libtorch's fused kernel
/// (`at::_fused_adamw_`, src/engine/fused_adamw.cpp): `params`, `exp_avgs`
/// and `exp_avg_sqs` updated in place, all contiguous and of one device and
/// kind with `grads`; `step` the step count, already incremented.
fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    h: &AdamW,
) -> Result<(), String> {
    let n = params.len();
    assert!(grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n);
    let ptrs = |ts: &[Tensor]| {
        ts.iter()
            .map(|t| t.as_ptr() as *mut C_tensor)
            .collect::<Vec<_>>()
    };
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let mut err = [0 as c_char; 512];
    // SAFETY: live tensors for the duration of the call; the kernel writes
    // the parameters and moments in place (the same storages the callers hold).
    let rc = unsafe {
        sfron_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the C++ side wrote a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
    Err(msg.to_string_lossy().into_owned())
}
