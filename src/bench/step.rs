//! `sfron bench step`: the SFR-on iteration against bare libtorch.
//!
//! One SFR-on iteration is a forget step and a remain step (`forget_every =
//! 1`), each through sfron's real machinery: the forget loss and backward
//! pass of [`crate::unlearn::sfron::forget_backward`], the engine's bucketed
//! reduction, the mask, the clip and the optimizer of
//! [`crate::engine::Engine::finish`], and the BatchNorm broadcast. Bare
//! libtorch is what a hand-written tch loop would do on the same two batches:
//! forward, mean cross-entropy, backward and tch's own SGD, twice, with no
//! reduction. Both run on the same model, device, precision, layout and
//! threads, from the same weights; iterations alternate between the two so
//! that a noisy neighbour slows both. The fastest iteration is reported
//! (the one a shared machine disturbed least; medians moved by ±10% between
//! runs here), the median beside it.
//!
//! The batches are fixed random images (`--batch` per rank): data loading is
//! timed by `bench data`, not here.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

use crate::comm::Comm;
use crate::config::{OptimizerPlan, RunPlan};
use crate::data::Batch;
use crate::engine::signals::StopFlag;
use crate::engine::{Edit, Engine, Optimizer, Scale, backward_ce_sum, broadcast_all};
use crate::model::Model;
use crate::unlearn::sfron::{ce_losses, forget_backward};

/// What to time.
#[derive(Clone, Debug)]
pub struct StepOptions {
    /// Images per rank in each of the forget and remain batches.
    pub batch: usize,
    /// Image side (square) and channels.
    pub image: i64,
    pub channels: i64,
    pub classes: i64,
    /// Timed iterations, after `warmup` untimed ones.
    pub iterations: usize,
    pub warmup: usize,
    /// Also time bare libtorch.
    pub bare: bool,
}

/// The measurement, one JSON line.
#[derive(Debug, serde::Serialize)]
pub struct StepReport {
    pub bench: &'static str,
    pub arch: String,
    pub ranks: usize,
    pub threads: usize,
    pub device: String,
    pub precision: &'static str,
    pub channels_last: bool,
    pub batch_per_rank: usize,
    pub image: i64,
    pub data_plane: &'static str,
    pub bucket_mib: f64,
    /// Milliseconds of the fastest SFR-on iteration (forget + remain step).
    pub sfron_iteration_ms: f64,
    pub sfron_iteration_median_ms: f64,
    /// Of which filling and reducing gradients and broadcasting BatchNorm.
    pub sfron_comm_ms: f64,
    /// Milliseconds of bare libtorch's fastest two steps.
    pub bare_iteration_ms: Option<f64>,
    /// sfron / bare (goal ≤ 1.02 on one rank).
    pub ratio_to_bare: Option<f64>,
    /// Images through forward and backward per second, all ranks.
    pub images_per_second: f64,
    pub bare_images_per_second: Option<f64>,
    /// `model.batchnorm`, and with global BatchNorm on more than one rank
    /// the sums it adds per iteration: count and bytes (per rank).
    pub batchnorm: &'static str,
    pub batchnorm_sums_per_iteration: Option<f64>,
    pub batchnorm_bytes_per_iteration: Option<f64>,
}

/// Waits for the device's queued work (timing GPU kernels).
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The fastest and the median of `xs`.
fn fastest_and_median(xs: &mut [f64]) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    (xs[0], median)
}

/// A fixed batch of random images and labels for this rank.
fn batch(o: &StepOptions, device: Device) -> Batch {
    let images = Tensor::randn(
        [o.batch as i64, o.channels, o.image, o.image],
        (Kind::Float, Device::Cpu),
    );
    let labels = Tensor::randint(o.classes, [o.batch as i64], (Kind::Int64, Device::Cpu));
    Batch {
        images: images.to_device(device),
        labels: labels.to_device(device),
        indices: (0..o.batch).collect(),
        skipped: 0,
    }
}

/// A model of the plan's architecture with rank 0's fresh weights.
fn fresh_model(comm: &Comm, plan: &RunPlan, o: &StepOptions, device: Device) -> Result<Model> {
    let mut m = Model::new(plan.model.arch.clone(), o.channels, o.classes, device);
    m.set_compute(plan.compute()).map_err(anyhow::Error::msg)?;
    let state: Vec<Tensor> = m.state().into_iter().map(|(_, t)| t).collect();
    broadcast_all(comm, &state)?;
    Ok(m)
}

/// Times SFR-on iterations (and bare libtorch) as the module docs say.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, o: &StepOptions) -> Result<StepReport> {
    tch::manual_seed(plan.seed as i64 + 1000 * comm.rank() as i64);
    let forget = batch(o, device);
    let remain = batch(o, device);
    tch::manual_seed(plan.seed as i64);
    let model = fresh_model(comm, plan, o, device)?;
    let sfron = &plan.sfron;
    let optimizer = Optimizer::new(plan.unlearn.optimizer.clone(), model.parameters().len());
    let stop = StopFlag::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let mut engine = Engine::new(
        comm,
        &model,
        optimizer,
        None,
        stop,
        &plan.comm,
        plan.model.batchnorm,
    )?;
    let numel: i64 = engine.params.iter().map(|p| p.numel() as i64).sum();
    // Half the entries kept, as SFR-on's saliency mask keeps about half.
    let mask = Tensor::rand([numel], (Kind::Float, device))
        .ge(0.5)
        .to_kind(Kind::Float);
    let edit = Edit {
        mask: Some(&mask),
        clip: sfron.clip,
        freeze_masked: false,
        clip_first: false,
    };
    let lr = sfron.lr;
    let iteration = |engine: &mut Engine| -> Result<()> {
        engine.zero_grad();
        let losses = ce_losses(
            &model,
            (&forget.images, &forget.labels, None),
            sfron.loss_precision,
        );
        let local = forget_backward(engine, Some(losses), sfron, sfron.alpha);
        let mut out = engine.reduce(local, Scale::Sum)?;
        engine.finish(&mut out, &edit, lr, "bench forget step")?;
        engine.zero_grad();
        let local = backward_ce_sum(engine, &model, &remain, device, true, None);
        let mut out = engine.reduce(local, Scale::MeanOverCount)?;
        engine.finish(&mut out, &Edit::default(), lr, "bench remain step")?;
        sync(device);
        Ok(())
    };

    let mut bare = if o.bare {
        tch::manual_seed(plan.seed as i64);
        let m = fresh_model(comm, plan, o, device)?;
        let opt = match plan.unlearn.optimizer {
            OptimizerPlan::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => tch::nn::Sgd {
                momentum,
                dampening: 0.0,
                wd: weight_decay,
                nesterov,
            }
            .build(&m.vs, lr)?,
            OptimizerPlan::AdamW {
                betas: [b1, b2],
                eps,
                weight_decay,
            } => tch::nn::AdamW {
                beta1: b1,
                beta2: b2,
                wd: weight_decay,
                eps,
                amsgrad: false,
            }
            .build(&m.vs, lr)?,
        };
        Some((m, opt))
    } else {
        None
    };
    let bare_iteration = |(m, opt): &mut (Model, tch::nn::Optimizer)| {
        for b in [&forget, &remain] {
            let loss = m
                .forward_t(&b.images, true)
                .cross_entropy_for_logits(&b.labels);
            opt.backward_step(&loss);
        }
        sync(device);
    };

    for _ in 0..o.warmup {
        iteration(&mut engine)?;
        if let Some(b) = &mut bare {
            bare_iteration(b);
        }
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut comm_s = Vec::new();
    let sums_before = engine.batchnorm_sums();
    for _ in 0..o.iterations {
        comm.barrier();
        let c0 = engine.comm_seconds;
        let t0 = Instant::now();
        iteration(&mut engine)?;
        ours.push(t0.elapsed().as_secs_f64());
        comm_s.push(engine.comm_seconds - c0);
        if let Some(b) = &mut bare {
            comm.barrier();
            let t0 = Instant::now();
            bare_iteration(b);
            theirs.push(t0.elapsed().as_secs_f64());
        }
    }
    let per_iteration = |(calls, bytes): (u64, u64), (c0, b0): (u64, u64)| {
        let n = o.iterations.max(1) as f64;
        ((calls - c0) as f64 / n, (bytes - b0) as f64 / n)
    };
    let sums = engine
        .batchnorm_sums()
        .zip(sums_before)
        .map(|(after, before)| per_iteration(after, before));
    // The slowest rank's figures: the job's pace.
    let (ours_s, ours_median) = fastest_and_median(&mut ours);
    let (comm_s, _) = fastest_and_median(&mut comm_s);
    let (bare_s, _) = if bare.is_some() {
        fastest_and_median(&mut theirs)
    } else {
        (0.0, 0.0)
    };
    let mut worst = [ours_s, comm_s, bare_s, ours_median];
    comm.reduce(&mut worst, crate::comm::ReduceOp::Max);
    let [ours_s, comm_s, bare_s, ours_median] = worst;
    let images = (2 * o.batch * comm.size()) as f64;
    Ok(StepReport {
        bench: "step",
        arch: plan.model.arch.name(),
        ranks: comm.size(),
        threads: plan.threads,
        device: crate::device::describe(device),
        precision: plan.precision.as_str(),
        channels_last: plan.channels_last,
        batch_per_rank: o.batch,
        image: o.image,
        data_plane: engine.data_plane(),
        bucket_mib: plan.comm.bucket_mib,
        sfron_iteration_ms: 1e3 * ours_s,
        sfron_iteration_median_ms: 1e3 * ours_median,
        sfron_comm_ms: 1e3 * comm_s,
        bare_iteration_ms: bare.is_some().then_some(1e3 * bare_s),
        ratio_to_bare: bare.is_some().then_some(ours_s / bare_s),
        images_per_second: images / ours_s,
        bare_images_per_second: bare.is_some().then_some(images / bare_s),
        batchnorm: plan.model.batchnorm.mode.as_str(),
        batchnorm_sums_per_iteration: sums.map(|s| s.0),
        batchnorm_bytes_per_iteration: sums.map(|s| s.1),
    })
}
