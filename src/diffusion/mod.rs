//! The denoising task: Gaussian diffusion over images (DESIGN §6), the
//! second task beside classification. A denoiser ([`crate::model::unet`])
//! predicts the noise ε in `x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`; its per-sample
//! loss is `‖ε − ε_θ(x_t, t, c)‖²` summed over pixels (the release's
//! `noise_estimation_loss_conditional`), and it generates by ancestral
//! (DDPM) or DDIM sampling with classifier-free guidance.
//!
//! - [`schedule`]: β and ᾱ.
//! - [`draws`]: the noise, timesteps, dropped conditions and dropout keys
//!   of a step, each a function of (seed, step, sample): N ranks draw what
//!   one rank draws.
//! - [`loss`]: the per-sample denoising loss, and its backward pass into
//!   the engine.
//! - [`sample`]: the samplers.

pub mod adm;
pub mod draws;
pub mod loss;
pub mod sample;
pub mod schedule;

use tch::{Kind, Tensor};

use crate::model::Model;
use crate::model::unet::{Cond, Dropout};

/// The guided noise prediction of the release's `_forward_with_cond_scale`:
/// `(1 + w) ε(x, t, c) − w ε(x, t, ∅)`, both halves in one forward pass of
/// `2N` rows; `w = 0` is the conditional prediction alone.
pub fn guided_eps(model: &Model, x: &Tensor, t: &Tensor, c: &Tensor, w: f64) -> Tensor {
    if w == 0.0 {
        let cond = Cond { t, c, keep: None };
        return model.denoise(x, &cond, &Dropout::Off);
    }
    let n = x.size()[0];
    let xx = Tensor::cat(&[x, x], 0);
    let tt = Tensor::cat(&[t, t], 0);
    let cc = Tensor::cat(&[c, c], 0);
    let keep = Tensor::cat(
        &[
            Tensor::ones([n], (Kind::Bool, x.device())),
            Tensor::zeros([n], (Kind::Bool, x.device())),
        ],
        0,
    );
    let cond = Cond {
        t: &tt,
        c: &cc,
        keep: Some(&keep),
    };
    let eps = model.denoise(&xx, &cond, &Dropout::Off);
    let (with, without) = (eps.narrow(0, 0, n), eps.narrow(0, n, n));
    with * (1.0 + w) - without * w
}
