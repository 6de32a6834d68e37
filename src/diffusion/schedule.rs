//! The noise schedule: β_t for t = 0..T, and ᾱ_t = Π_{s≤t} (1 − β_s), and
//! whose process runs on it.
//!
//! The DDPM release's process (`get_beta_schedule`): β is laid out in
//! float64 (`np.linspace`), then held in float32, and ᾱ is the float32
//! cumulative product of `1 − β` (the order PyTorch's `cumprod` takes).
//! ADM's ([`super::adm`]) keeps every table in float64.

use tch::{Device, Kind, Tensor};

use super::adm;
use crate::config::raw::{BetaSchedule, DiffusionProcess, DiffusionSection};

#[derive(Debug)]
pub struct Schedule {
    /// β_t, float32, `[T]`.
    pub betas: Tensor,
    /// ᾱ_t, float32, `[T]`.
    pub alphas_cumprod: Tensor,
    /// β_t in float64, as laid out.
    betas64: Vec<f64>,
    /// ADM's process over every step (`None`: the DDPM release's process).
    pub adm: Option<adm::Process>,
}

/// numpy's `linspace(start, end, n)` in float64: `start + i · step`,
/// `step = (end − start)/(n − 1)`, the last value exactly `end`.
pub fn linspace(start: f64, end: f64, n: i64) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                end
            } else {
                start + i as f64 * step
            }
        })
        .collect()
}

impl Schedule {
    /// `kind` from `start` to `end` over `steps` timesteps, on `device`,
    /// for the DDPM release's process.
    pub fn new(kind: BetaSchedule, start: f64, end: f64, steps: i64, device: Device) -> Self {
        // np.linspace, as both releases lay β out (`get_beta_schedule`).
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear => linspace(start, end, steps),
            BetaSchedule::Quad => linspace(start.sqrt(), end.sqrt(), steps)
                .into_iter()
                .map(|s| s * s)
                .collect(),
        };
        let betas64 = betas;
        let betas = Tensor::from_slice(&betas64)
            .to_kind(Kind::Float)
            .to_device(device);
        let alphas_cumprod = betas.neg().g_add_scalar(1.0).cumprod(0, Kind::Float);
        Schedule {
            betas,
            alphas_cumprod,
            betas64,
            adm: None,
        }
    }

    /// The schedule and process `[diffusion]` describes (its `process`
    /// resolved: `auto` is taken as the release's), on `device`; ADM's
    /// process has the learned-range variance when the denoiser predicts
    /// it (`learn_sigma`).
    pub fn of(d: &DiffusionSection, learn_sigma: bool, device: Device) -> Self {
        let mut s = Schedule::new(
            d.beta_schedule,
            d.beta_start,
            d.beta_end,
            d.timesteps,
            device,
        );
        if d.process == DiffusionProcess::Adm {
            let variance = if learn_sigma {
                adm::Variance::LearnedRange
            } else {
                adm::Variance::FixedLarge
            };
            let all: Vec<i64> = (0..d.timesteps).collect();
            s.adm = Some(adm::Process::new(&s.betas64, &all, variance));
        }
        s
    }

    /// ADM's process respaced to `steps` sampling steps (DiT's
    /// `create_diffusion(str(steps))`), `None` for the release's process.
    pub fn adm_spaced(&self, steps: i64) -> Option<adm::Process> {
        let p = self.adm.as_ref()?;
        let keep = adm::space_timesteps(self.steps(), &steps.to_string())
            .expect("sample.steps is checked to be 1 to diffusion.timesteps");
        Some(adm::Process::new(&self.betas64, &keep, p.variance()))
    }

    /// Whether training draws timesteps in antithetic pairs (the release)
    /// rather than independently (ADM's `torch.randint`).
    pub fn antithetic(&self) -> bool {
        self.adm.is_none()
    }

    /// Per-row losses `[N]` of a denoiser's output `out` at `x_t`: the
    /// release's `‖ε − ε̂‖²` summed over pixels, or ADM's
    /// `training_losses` (mean squared error, plus the variational bound
    /// with a learned variance).
    pub fn row_losses(
        &self,
        out: &Tensor,
        x0: &Tensor,
        xt: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Tensor {
        match &self.adm {
            Some(p) => p.training_losses(out, x0, xt, t, noise),
            None => {
                (noise - out)
                    .square()
                    .sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float)
            }
        }
    }

    /// T.
    pub fn steps(&self) -> i64 {
        self.betas.size()[0]
    }

    /// `x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε` for integer timesteps `t` `[N]`
    /// (ADM's `q_sample` on its float64 tables under its process).
    pub fn noised(&self, x0: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
        if let Some(p) = &self.adm {
            return p.q_sample(x0, t, eps);
        }
        let a = self
            .alphas_cumprod
            .index_select(0, &t.to_kind(Kind::Int64))
            .view([-1, 1, 1, 1]);
        x0 * a.sqrt() + eps * a.neg().g_add_scalar(1.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_the_released_endpoints_and_products() {
        let s = Schedule::new(BetaSchedule::Linear, 1e-4, 0.02, 1000, Device::Cpu);
        let b: Vec<f32> = Vec::try_from(&s.betas).unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b[0], 1e-4_f32);
        assert_eq!(b[999], 0.02_f32);
        let a: Vec<f32> = Vec::try_from(&s.alphas_cumprod).unwrap();
        // ᾱ_T of the linear schedule is about 4.0e-5 (Ho et al. 2020).
        assert!((a[999] - 4.04e-5).abs() < 1e-6, "{}", a[999]);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
        // The float64 layout is np.linspace's, which ADM's tables start from.
        assert_eq!(s.betas64, super::super::adm::linear_betas(1000));
    }
}
