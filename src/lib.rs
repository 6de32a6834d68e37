//! sfron: machine unlearning with SFR-on and its baselines, run as an MPI job.
//!
//! Map of the crate:
//! - [`cli`]: subcommands and flags only; [`app`]: from arguments to an exit
//!   code ([`exit`] lists the codes).
//! - [`config`]: layered TOML/env/`--set` → validated [`config::RunPlan`].
//! - [`comm`]: the only module that imports MPI; a one-rank world beside it.
//! - [`device`]: CUDA/CPU choice and libtorch threads per rank.
//! - [`telemetry`]: tracing setup, quiet by rank.
//! - [`doctor`]: installation and collective checks; [`split`]: `sfron split`;
//!   [`encode`]: `sfron encode` (images to a latent dataset through a VAE);
//!   [`bench`]: `sfron bench` measurements.
//! - [`data`]: formats, split manifests, sharded sampler, transforms, loader.
//! - [`rng`]: keyed random streams (every random choice is a function of its key).
//! - [`model`]: the zoo with PyTorch names; safetensors weights in and out.
//! - [`engine`]: the step skeleton (reduce, non-finite policy, optimizers,
//!   checkpoints, preemption); [`train`]: `sfron train`; [`unlearn`]: `sfron
//!   unlearn` (SFR-on in [`unlearn::sfron`]); [`eval`]: `sfron eval`
//!   (per-example outputs, metrics, MIAs); [`study`]: `sfron study` (the
//!   whole pipeline, stage reuse, the report).
//! - [`fsx`]: atomic file writes; [`rundir`]: what a run folder is (files,
//!   status, run state, recipe hash, checkpoints in and out, its lock),
//!   below every command.
//! - [`diffusion`]: the denoising task (schedule, draws, loss, samplers).
//!
//! Threading rule: MPI is initialised once, in [`app::run`], and only the main
//! thread calls [`comm::Comm`]. tokio tasks and worker threads never call MPI;
//! they hand results to the main thread, which does the collectives.

pub mod app;
pub mod bench;
pub mod cli;
pub mod comm;
pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod doctor;
pub mod encode;
pub mod engine;
pub mod eval;
pub mod exit;
pub mod fsx;
pub mod inputs;
pub mod model;
pub mod rng;
pub mod rundir;
pub mod sample;
pub mod split;
pub mod study;
pub mod task;
pub mod telemetry;
pub mod train;
pub mod unlearn;
