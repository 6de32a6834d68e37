//! Generation: DDPM ancestral sampling and DDIM, with classifier-free
//! guidance, as the release's `DDPM/functions/denoising.py`.
//!
//! The timesteps visited are `0, k, 2k, …` with `k = T / steps` (the
//! release's `skip_type = uniform`), from the last down. At each, with
//! `ᾱ = ᾱ_t` and `ᾱ' = ᾱ` of the next visited step (1 after the first):
//! - DDIM (`generalized_steps_conditional`): `x̂₀ = (x − √(1−ᾱ) ε)/√ᾱ`,
//!   `c₁ = η √((1 − ᾱ/ᾱ')(1 − ᾱ')/(1 − ᾱ))`, `c₂ = √(1 − ᾱ' − c₁²)`,
//!   `x' = √ᾱ' x̂₀ + c₁ z + c₂ ε`;
//! - DDPM (`ddpm_steps`, fixed-large variance): `β = 1 − ᾱ/ᾱ'`,
//!   `x̂₀ = clamp(√(1/ᾱ) x − √(1/ᾱ − 1) ε, −1, 1)`,
//!   `x' = (√ᾱ' β x̂₀ + √(1 − β)(1 − ᾱ') x)/(1 − ᾱ) + √β z`, no noise at t = 0.
//!
//! ε is the guided prediction ([`Model::denoise_guided`]).
//!
//! Under ADM's process ([`super::adm`], DiT's) the sampler runs the process
//! respaced to `steps` (`create_diffusion(str(steps))`): `p_sample` (the
//! model's learned-range or the fixed-large variance, as DiT's
//! `p_sample_loop`) or `ddim_sample`, the model fed each step's original
//! timestep; `x̂₀` is clamped to [−1, 1] when [`Plan::clip`] says so.
//!
//! Every image draws its start and its per-step noise z from its own key,
//! so an image is the same whichever rank and batch generate it.

use tch::{Device, Kind, Tensor};

use super::schedule::Schedule;
use crate::model::Model;
use crate::rng::Rng;

/// The sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Ancestral sampling with the fixed-large variance.
    Ddpm,
    /// DDIM with stochasticity η (0: deterministic).
    Ddim { eta: f64 },
}

/// How to generate.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub method: Method,
    /// Timesteps visited (T for full DDPM).
    pub steps: i64,
    /// Guidance scale w.
    pub guidance: f64,
    /// Clamp ADM's predicted `x̂₀` to [−1, 1] (pixel data; DiT's
    /// `sample.py` does not clamp its latents). The release's DDPM sampler
    /// always clamps, its DDIM never does.
    pub clip: bool,
}

/// How many steps the sampler takes under `schedule`'s process.
pub fn visits(schedule: &Schedule, steps: i64) -> usize {
    match schedule.adm_spaced(steps) {
        Some(p) => p.steps() as usize,
        None => timesteps(schedule.steps(), steps).len(),
    }
}

/// The visited timesteps of the release's process, ascending.
pub fn timesteps(total: i64, steps: i64) -> Vec<i64> {
    let skip = (total / steps.clamp(1, total)).max(1);
    (0..total).step_by(skip as usize).collect()
}

fn noise_of(keys: &[u64], step: u64, shape: &[i64]) -> Tensor {
    let rows: Vec<Tensor> = keys
        .iter()
        .map(|&k| {
            tch::manual_seed((Rng::keyed(&[k, step]).next_u64() >> 1) as i64);
            Tensor::randn(shape, (Kind::Float, Device::Cpu))
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Generates one image per `(class, key)` row, `[N, C, H, W]` in the
/// model's data range ([−1, 1]); `each_step` is called after every
/// visited timestep (a progress bar).
pub fn generate(
    model: &Model,
    schedule: &Schedule,
    plan: &Plan,
    classes: &[i64],
    keys: &[u64],
    mut each_step: impl FnMut(),
) -> Tensor {
    assert_eq!(classes.len(), keys.len());
    let shape = model.image_shape().expect("a denoiser");
    let device = model.vs.device();
    let seq = timesteps(schedule.steps(), plan.steps);
    let n = keys.len() as i64;
    let c = Tensor::from_slice(classes).to_device(device);
    let abar: Vec<f64> = Vec::<f32>::try_from(&schedule.alphas_cumprod)
        .expect("float32 schedule")
        .into_iter()
        .map(f64::from)
        .collect();
    let mut x = noise_of(keys, u64::MAX, &shape).to_device(device);
    if let Some(process) = schedule.adm_spaced(plan.steps) {
        tch::no_grad(|| {
            for i in (0..process.steps()).rev() {
                let step = Tensor::full([n], i, (Kind::Int64, device));
                let tt = process.model_timesteps(&step);
                let out = model.denoise_guided(&x, &tt, &c, plan.guidance);
                let z = noise_of(keys, i as u64, &shape).to_device(device);
                x = match plan.method {
                    Method::Ddpm => process.p_sample(&out, &x, &step, &z, plan.clip),
                    Method::Ddim { eta } => {
                        process.ddim_sample(&out, &x, &step, &z, eta, plan.clip)
                    }
                };
                each_step();
            }
        });
        return x;
    }
    tch::no_grad(|| {
        for (i, &t) in seq.iter().enumerate().rev() {
            let a = abar[t as usize];
            let a_next = if i == 0 {
                1.0
            } else {
                abar[seq[i - 1] as usize]
            };
            let tt = Tensor::full([n], t as f64, (Kind::Float, device));
            let eps = model.denoise_guided(&x, &tt, &c, plan.guidance);
            let z = || noise_of(keys, i as u64, &shape).to_device(device);
            x = match plan.method {
                Method::Ddim { eta } => {
                    let x0 = (&x - &eps * (1.0 - a).sqrt()) / a.sqrt();
                    let c1 = eta * ((1.0 - a / a_next) * (1.0 - a_next) / (1.0 - a)).sqrt();
                    let c2 = (1.0 - a_next - c1 * c1).max(0.0).sqrt();
                    let mut next = x0 * a_next.sqrt() + &eps * c2;
                    if c1 > 0.0 {
                        next += z() * c1;
                    }
                    next
                }
                Method::Ddpm => {
                    let beta = 1.0 - a / a_next;
                    let x0 =
                        (&x * (1.0 / a).sqrt() - &eps * (1.0 / a - 1.0).sqrt()).clamp(-1.0, 1.0);
                    let mean = (x0 * (a_next.sqrt() * beta)
                        + &x * ((1.0 - beta).sqrt() * (1.0 - a_next)))
                        / (1.0 - a);
                    if t == 0 {
                        mean
                    } else {
                        mean + z() * beta.sqrt()
                    }
                }
            };
            each_step();
        }
    });
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_skips_visit_the_release_timesteps() {
        assert_eq!(timesteps(1000, 1000).len(), 1000);
        let t = timesteps(1000, 100);
        assert_eq!((t[0], t[1], t.len(), *t.last().unwrap()), (0, 10, 100, 990));
        assert_eq!(timesteps(10, 3), vec![0, 3, 6, 9]);
    }
}
