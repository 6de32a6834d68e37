//! The Gaussian diffusion of guided-diffusion (ADM, Dhariwal & Nichol
//! 2021; improved-diffusion, Nichol & Dhariwal 2021) as DiT trains and
//! samples with it (`DiT/diffusion/gaussian_diffusion.py`, `respace.py`,
//! `diffusion_utils.py`; `create_diffusion`'s defaults: linear β from 1e-4
//! to 0.02 over T = 1000, ε prediction, the learned-range variance with
//! `learn_sigma`, else fixed-large; `LossType.MSE`).
//!
//! It differs from the DDPM release's process ([`super::schedule`],
//! [`super::loss`], [`super::sample`]) in four ways, each kept as ADM has it:
//! - every coefficient is computed in float64 and rounded to float32 when
//!   applied (`_extract_into_tensor`), the release's are float32 throughout;
//! - the per-sample loss is the *mean* over elements of `(ε − ε̂)²`
//!   (`mean_flat`), plus, with a learned variance, the variational bound
//!   term `L_vb` in bits (with the mean's output detached, so that it trains
//!   the variance only): `KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t))` for
//!   `t > 0`, the discretised-Gaussian decoder NLL at `t = 0`, each
//!   `mean_flat` and divided by `ln 2`;
//! - the variance of a step is `exp(f log β_t + (1 − f) log β̃_t)`,
//!   `f = (v + 1) / 2` for the model's variance channels `v` (learned
//!   range), or `β_t` with `β̃_1` at `t = 0` (fixed large);
//! - a sampler with fewer steps runs a *respaced* process
//!   ([`space_timesteps`]: evenly spaced with a fractional stride, rounded,
//!   so "250" visits 0, 4, 8, …, 992, 996, 999; "ddimN" an integer
//!   stride), whose β are `1 − ᾱ_{s_k} / ᾱ_{s_{k−1}}` over the kept
//!   timesteps `s_k`, and whose model sees the original timestep `s_k`.
//!
//! The functions take the model's output as a tensor, so the same process
//! serves any ε-predicting network; the caller evaluates the network at
//! [`Process::model_timesteps`].

use tch::{Kind, Tensor};

/// How a step's variance is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variance {
    /// The model's extra channels interpolate log β̃_t and log β_t.
    LearnedRange,
    /// β_t (β̃_1 at t = 0).
    FixedLarge,
}

/// A (possibly respaced) ADM process; see the module docs.
#[derive(Clone, Debug)]
pub struct Process {
    variance: Variance,
    /// The original timestep of each step of this process.
    timestep_map: Vec<i64>,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_prev: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
    /// `√ᾱ`, `√(1 − ᾱ)`, `√(1/ᾱ)`, `√(1/ᾱ − 1)` (`q_sample`, `x̂₀` from ε).
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    sqrt_recip_alphas_cumprod: Vec<f64>,
    sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// `log β` (the learned range's upper end) and the fixed-large
    /// log-variance (`log β`, `log β̃_1` at step 0).
    log_betas: Vec<f64>,
    log_variance_large: Vec<f64>,
}

/// ADM's `get_named_beta_schedule("linear", T)`: β evenly spaced from
/// `1e-4 · 1000/T` to `0.02 · 1000/T`, float64.
pub fn linear_betas(steps: i64) -> Vec<f64> {
    let scale = 1000.0 / steps as f64;
    super::schedule::linspace(scale * 1e-4, scale * 0.02, steps)
}

/// ADM's `space_timesteps(T, spec)`: `spec` is comma-separated step counts,
/// one per equal section of `0..T` (each section's count taken evenly with
/// a fractional stride, `round` half to even as Python's), or `ddimN` (the
/// integer stride that gives exactly N steps). The kept timesteps,
/// ascending. Errors name the spec.
pub fn space_timesteps(total: i64, spec: &str) -> Result<Vec<i64>, String> {
    let spec = spec.trim();
    if let Some(count) = spec.strip_prefix("ddim") {
        let want: i64 = count
            .parse()
            .map_err(|_| format!("respacing {spec:?}: {count:?} is not a step count"))?;
        return (1..total)
            .find(|&stride| (total + stride - 1) / stride == want)
            .map(|stride| (0..total).step_by(stride as usize).collect())
            .ok_or_else(|| {
                format!("respacing {spec:?}: no integer stride gives {want} of {total} steps")
            });
    }
    let counts = spec
        .split(',')
        .map(|c| c.trim().parse::<i64>())
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| {
            format!("respacing {spec:?}: expected step counts like \"250\" or \"ddim50\"")
        })?;
    let sections = counts.len() as i64;
    let (size_per, extra) = (total / sections, total % sections);
    let mut start = 0;
    let mut steps = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + i64::from((i as i64) < extra);
        if count < 1 || size < count {
            return Err(format!(
                "respacing {spec:?}: cannot divide a section of {size} steps into {count}"
            ));
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.push(start + cur.round_ties_even() as i64);
            cur += stride;
        }
        start += size;
    }
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

impl Process {
    /// The process over `base_betas` (the full schedule) keeping the
    /// timesteps `keep` (ascending; all of `0..T` for no respacing).
    pub fn new(base_betas: &[f64], keep: &[i64], variance: Variance) -> Self {
        assert!(!keep.is_empty() && keep.windows(2).all(|w| w[0] < w[1]));
        let mut cumprod = 1.0;
        let base: Vec<f64> = base_betas
            .iter()
            .map(|b| {
                cumprod *= 1.0 - b;
                cumprod
            })
            .collect();
        let mut last = 1.0;
        let betas: Vec<f64> = keep
            .iter()
            .map(|&t| {
                let a = base[t as usize];
                let beta = 1.0 - a / last;
                last = a;
                beta
            })
            .collect();
        let mut cumprod = 1.0;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                cumprod *= 1.0 - b;
                cumprod
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..alphas_cumprod.len() - 1].iter().copied())
            .collect();
        let n = betas.len();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - alphas_cumprod_prev[i]) / (1.0 - alphas_cumprod[i]))
            .collect();
        let posterior_log_variance_clipped = if n > 1 {
            (0..n).map(|i| posterior_variance[i.max(1)].ln()).collect()
        } else {
            Vec::new()
        };
        let posterior_mean_coef1 = (0..n)
            .map(|i| betas[i] * alphas_cumprod_prev[i].sqrt() / (1.0 - alphas_cumprod[i]))
            .collect();
        let posterior_mean_coef2 = (0..n)
            .map(|i| {
                (1.0 - alphas_cumprod_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - alphas_cumprod[i])
            })
            .collect();
        let of = |f: &dyn Fn(f64) -> f64| alphas_cumprod.iter().map(|&a| f(a)).collect();
        let sqrt_alphas_cumprod = of(&|a| a.sqrt());
        let sqrt_one_minus_alphas_cumprod = of(&|a| (1.0 - a).sqrt());
        let sqrt_recip_alphas_cumprod = of(&|a| (1.0 / a).sqrt());
        let sqrt_recipm1_alphas_cumprod = of(&|a| (1.0 / a - 1.0).sqrt());
        let log_betas: Vec<f64> = betas.iter().map(|b| b.ln()).collect();
        let log_variance_large = (0..n)
            .map(|i| {
                if i == 0 {
                    posterior_variance[1.min(n - 1)].ln()
                } else {
                    log_betas[i]
                }
            })
            .collect();
        Process {
            variance,
            timestep_map: keep.to_vec(),
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod,
            log_betas,
            log_variance_large,
        }
    }

    /// DiT's `create_diffusion(respacing)` over `betas`: `respacing` ""
    /// keeps every step.
    pub fn spaced(betas: &[f64], respacing: &str, variance: Variance) -> Result<Self, String> {
        let total = betas.len() as i64;
        let keep = if respacing.trim().is_empty() {
            (0..total).collect()
        } else {
            space_timesteps(total, respacing)?
        };
        Ok(Process::new(betas, &keep, variance))
    }

    /// Steps of this process.
    pub fn steps(&self) -> i64 {
        self.betas.len() as i64
    }

    pub fn variance(&self) -> Variance {
        self.variance
    }

    /// The original timesteps the model sees for steps `t` `[N]` (int64)
    /// of this process, float32 `[N]`.
    pub fn model_timesteps(&self, t: &Tensor) -> Tensor {
        let map = Tensor::from_slice(&self.timestep_map).to_device(t.device());
        map.index_select(0, &t.to_kind(Kind::Int64))
            .to_kind(Kind::Float)
    }

    /// `table[t]` rounded to float32, `[N, 1, 1, 1]` (as
    /// `_extract_into_tensor`, for 4-D data).
    fn extract(table: &[f64], t: &Tensor, like: &Tensor) -> Tensor {
        let values = Tensor::from_slice(table).to_device(like.device());
        let mut v = values
            .index_select(0, &t.to_kind(Kind::Int64))
            .to_kind(Kind::Float);
        for _ in 1..like.dim() {
            v = v.unsqueeze(-1);
        }
        v
    }

    /// `q_sample`: `√ᾱ_t x_0 + √(1 − ᾱ_t) ε`.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        Self::extract(&self.sqrt_alphas_cumprod, t, x0) * x0
            + Self::extract(&self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    }

    /// `q_posterior_mean_variance`: the mean and clipped log-variance of
    /// `q(x_{t−1} | x_t, x_0)`.
    fn q_posterior(&self, x0: &Tensor, xt: &Tensor, t: &Tensor) -> (Tensor, Tensor) {
        let mean = Self::extract(&self.posterior_mean_coef1, t, xt) * x0
            + Self::extract(&self.posterior_mean_coef2, t, xt) * xt;
        (
            mean,
            Self::extract(&self.posterior_log_variance_clipped, t, xt),
        )
    }

    /// `_predict_xstart_from_eps`.
    fn predict_xstart(&self, xt: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
        Self::extract(&self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - Self::extract(&self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
    }

    /// Splits a model output into ε and the variance channels (`None` for
    /// a fixed variance): a learned variance has twice `x`'s channels.
    fn split(&self, out: &Tensor, x: &Tensor) -> (Tensor, Option<Tensor>) {
        let c = x.size()[1];
        match self.variance {
            Variance::LearnedRange => {
                assert_eq!(
                    out.size()[1],
                    2 * c,
                    "a learned variance needs 2C output channels"
                );
                (out.narrow(1, 0, c), Some(out.narrow(1, c, c)))
            }
            Variance::FixedLarge => (out.narrow(1, 0, c), None),
        }
    }

    /// `p_mean_variance` for a model output `out` at `x_t`: the mean and
    /// log-variance of `p(x_{t−1} | x_t)` and the predicted `x_0` (clamped
    /// to [−1, 1] when `clip`).
    pub fn p_mean_variance(
        &self,
        out: &Tensor,
        x: &Tensor,
        t: &Tensor,
        clip: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let (eps, v) = self.split(out, x);
        let log_variance = match v {
            Some(v) => {
                let min_log = Self::extract(&self.posterior_log_variance_clipped, t, x);
                let max_log = Self::extract(&self.log_betas, t, x);
                let frac = (v + 1.0) / 2.0;
                &frac * max_log + (frac.neg() + 1.0) * min_log
            }
            None => Self::extract(&self.log_variance_large, t, x) + x.zeros_like(),
        };
        let x0 = self.predict_xstart(x, t, &eps);
        let x0 = if clip { x0.clamp(-1.0, 1.0) } else { x0 };
        let (mean, _) = self.q_posterior(&x0, x, t);
        (mean, log_variance, x0)
    }

    /// `training_losses` with `LossType.MSE` for ε-prediction: per row
    /// `mean_flat((ε − ε̂)²)`, plus `L_vb` (module docs) with a learned
    /// variance, `[N]`. `out` is the model's output at `x_t =
    /// q_sample(x0, t, noise)` and the model timesteps of `t`.
    pub fn training_losses(
        &self,
        out: &Tensor,
        x0: &Tensor,
        xt: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Tensor {
        let (eps, v) = self.split(out, xt);
        let mse = mean_flat(&(noise - &eps).square());
        match v {
            None => mse,
            Some(v) => {
                let frozen = Tensor::cat(&[eps.detach(), v], 1);
                mse + self.vb_terms_bpd(&frozen, x0, xt, t)
            }
        }
    }

    /// `_vb_terms_bpd` without clipping: the KL for `t > 0`, the decoder
    /// NLL at `t = 0`, in bits per element.
    fn vb_terms_bpd(&self, out: &Tensor, x0: &Tensor, xt: &Tensor, t: &Tensor) -> Tensor {
        let (true_mean, true_log_var) = self.q_posterior(x0, xt, t);
        let (mean, log_var, _) = self.p_mean_variance(out, xt, t, false);
        let kl = mean_flat(&normal_kl(&true_mean, &true_log_var, &mean, &log_var))
            / std::f64::consts::LN_2;
        let nll =
            mean_flat(&discretized_gaussian_log_likelihood(x0, &mean, &(&log_var * 0.5)).neg())
                / std::f64::consts::LN_2;
        nll.where_self(&t.eq(0), &kl)
    }

    /// `p_sample`: `mean + exp(log_var / 2) z`, no noise at step 0.
    pub fn p_sample(&self, out: &Tensor, x: &Tensor, t: &Tensor, z: &Tensor, clip: bool) -> Tensor {
        let (mean, log_var, _) = self.p_mean_variance(out, x, t, clip);
        let nonzero = t.ne(0).to_kind(Kind::Float).view([-1, 1, 1, 1]);
        mean + nonzero * (log_var * 0.5).exp() * z
    }

    /// `ddim_sample` with stochasticity `eta` (ε re-derived from the
    /// possibly clipped `x_0`), no noise at step 0.
    pub fn ddim_sample(
        &self,
        out: &Tensor,
        x: &Tensor,
        t: &Tensor,
        z: &Tensor,
        eta: f64,
        clip: bool,
    ) -> Tensor {
        let (_, _, x0) = self.p_mean_variance(out, x, t, clip);
        let eps = (Self::extract(&self.sqrt_recip_alphas_cumprod, t, x) * x - &x0)
            / Self::extract(&self.sqrt_recipm1_alphas_cumprod, t, x);
        let abar = Self::extract(&self.alphas_cumprod, t, x);
        let abar_prev = Self::extract(&self.alphas_cumprod_prev, t, x);
        let sigma = ((abar_prev.neg() + 1.0) / (abar.neg() + 1.0)).sqrt()
            * ((&abar / &abar_prev).neg() + 1.0).sqrt()
            * eta;
        let mean = x0 * abar_prev.sqrt() + (abar_prev.neg() + 1.0 - sigma.square()).sqrt() * eps;
        let nonzero = t.ne(0).to_kind(Kind::Float).view([-1, 1, 1, 1]);
        mean + nonzero * sigma * z
    }
}

/// The mean over every dimension but the first.
fn mean_flat(t: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..t.dim() as i64).collect();
    t.mean_dim(dims.as_slice(), false, Kind::Float)
}

/// `normal_kl`: KL between two Gaussians given means and log-variances.
fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1) - 1.0
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2).square() * logvar2.neg().exp())
        * 0.5
}

/// `approx_standard_normal_cdf`: `(1 + tanh(√(2/π)(x + 0.044715 x³))) / 2`.
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    ((x + x.pow_tensor_scalar(3) * 0.044715) * c)
        .tanh()
        .g_add_scalar(1.0)
        * 0.5
}

/// `discretized_gaussian_log_likelihood` of data `x` in [−1, 1] (uint8
/// levels, bins of width 2/255), in nats.
fn discretized_gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Tensor {
    let centered = x - means;
    let inv_stdv = log_scales.neg().exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (cdf_min.neg() + 1.0).clamp_min(1e-12).log();
    let log_delta = (&cdf_plus - &cdf_min).clamp_min(1e-12).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_delta);
    log_cdf_plus.where_self(&x.lt(-0.999), &upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dits_250_step_respacing_and_ddim_strides() {
        let s = space_timesteps(1000, "250").unwrap();
        assert_eq!(s.len(), 250);
        assert_eq!(&s[..3], &[0, 4, 8]);
        assert_eq!(*s.last().unwrap(), 999);
        assert_eq!(space_timesteps(1000, "ddim50").unwrap().len(), 50);
        assert_eq!(space_timesteps(1000, "ddim50").unwrap()[1], 20);
        assert_eq!(space_timesteps(10, "2,3").unwrap(), vec![0, 4, 5, 7, 9]);
        assert!(space_timesteps(10, "ddim7").is_err());
        assert!(space_timesteps(10, "x").unwrap_err().contains("\"x\""));
        assert!(space_timesteps(10, "11").is_err());
        let full = Process::spaced(&linear_betas(1000), "", Variance::LearnedRange).unwrap();
        assert_eq!(full.steps(), 1000);
        // The full process's β are the base β (1 − ᾱ_t/ᾱ_{t−1}) to rounding.
        let base = linear_betas(1000);
        assert!(
            full.betas
                .iter()
                .zip(&base)
                .all(|(a, b)| (a - b).abs() <= 1e-15)
        );
    }
}
