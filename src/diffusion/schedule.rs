//! The noise schedule: β_t for t = 0..T, and ᾱ_t = Π_{s≤t} (1 − β_s).
//!
//! As the release (`get_beta_schedule`): β is laid out in float64
//! (`np.linspace`), then held in float32, and ᾱ is the float32 cumulative
//! product of `1 − β` (the order PyTorch's `cumprod` takes).

use tch::{Device, Kind, Tensor};

use crate::config::raw::{BetaSchedule, DiffusionSection};

#[derive(Debug)]
pub struct Schedule {
    /// β_t, float32, `[T]`.
    pub betas: Tensor,
    /// ᾱ_t, float32, `[T]`.
    pub alphas_cumprod: Tensor,
}

impl Schedule {
    /// `kind` from `start` to `end` over `steps` timesteps, on `device`.
    pub fn new(kind: BetaSchedule, start: f64, end: f64, steps: i64, device: Device) -> Self {
        let n = steps as usize;
        let at = |i: usize| {
            if n == 1 {
                0.0
            } else {
                i as f64 / (n - 1) as f64
            }
        };
        let betas: Vec<f64> = (0..n)
            .map(|i| match kind {
                BetaSchedule::Linear => start + (end - start) * at(i),
                BetaSchedule::Quad => {
                    let s = start.sqrt() + (end.sqrt() - start.sqrt()) * at(i);
                    s * s
                }
            })
            .collect();
        let betas = Tensor::from_slice(&betas)
            .to_kind(Kind::Float)
            .to_device(device);
        let alphas_cumprod = betas.neg().g_add_scalar(1.0).cumprod(0, Kind::Float);
        Schedule {
            betas,
            alphas_cumprod,
        }
    }

    /// The schedule `[diffusion]` describes, on `device`.
    pub fn of(d: &DiffusionSection, device: Device) -> Self {
        Schedule::new(
            d.beta_schedule,
            d.beta_start,
            d.beta_end,
            d.timesteps,
            device,
        )
    }

    /// T.
    pub fn steps(&self) -> i64 {
        self.betas.size()[0]
    }

    /// `x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε` for integer timesteps `t` `[N]`.
    pub fn noised(&self, x0: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
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
    }
}
