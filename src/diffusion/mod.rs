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
