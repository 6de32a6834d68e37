//! `sfron unlearn`: make a trained model forget the split's forget set.
//!
//! The harness here is shared by every method: it loads the original model
//! and the split, opens the forget, remain and (for RL, SalUn and Bad
//! Teacher) union streams (separate, resumable samplers), lets the method
//! prepare on the original weights (masks, teachers), resumes from the
//! newest checkpoint, and runs iterations of the method with one step
//! skeleton ([`Session::step`]: forward → per-sample losses → backward → one
//! reduction → mask and clip → optimizer step), logging, verifying,
//! checkpointing and stopping exactly as `train` does. A method says how
//! long it runs and what one iteration does ([`Method`]).

pub mod bad_teacher;
pub mod diffusion_rl;
pub mod epochs;
pub mod ft;
pub mod ga;
pub mod l1_sparse;
pub mod rl;
pub mod sa;
pub mod saliency;
pub mod salun;
pub mod scrub;
pub mod sfron;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tch::{Device, Kind, Reduction, Tensor};

use crate::cli::UnlearnArgs;
use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::UnlearnMethod;
use crate::data::{Batch, BatchStream, Cursor, Sampler, Stream};
use crate::diffusion::{self, draws::Purpose, loss::Denoising, loss::Rows as DenoiseRows};
pub use crate::engine::Edit;
use crate::engine::progress::Progress;
use crate::engine::signals::StopFlag;
use crate::engine::{Engine, Local, Optimizer, Outcome, Scale, Window, correct};
use crate::eval;
use crate::fsx::sha256_hex;
use crate::inputs::Inputs;
use crate::model::{Model, Task, weights};
use crate::rundir::{self, Faults, MODEL_FILE, RunState, STATE_FILE, Status};
use crate::task::TaskLoss;
pub use epochs::{Budget, Program};

/// One of the two data streams of an unlearning run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Forget,
    Remain,
    /// Remain ∪ forget, shuffled together.
    Union,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Forget => "forget",
            Which::Remain => "remain",
            Which::Union => "union",
        }
    }

    /// What keys a denoiser's draws on this stream.
    pub fn purpose(self) -> Purpose {
        match self {
            Which::Forget => Purpose::Forget,
            Which::Remain => Purpose::Remain,
            Which::Union => Purpose::Union,
        }
    }
}

/// What one iteration did (each step's outcome as every rank agreed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Iteration {
    pub forget: Option<Outcome>,
    pub remain: Option<Outcome>,
    pub union: Option<Outcome>,
}

impl Iteration {
    /// One step on `which`.
    pub fn one(which: Which, out: Outcome) -> Self {
        let mut it = Iteration::default();
        *match which {
            Which::Forget => &mut it.forget,
            Which::Remain => &mut it.remain,
            Which::Union => &mut it.union,
        } = Some(out);
        it
    }

    /// Some rank was asked to stop during this iteration.
    pub fn stop(&self) -> bool {
        [self.forget, self.remain, self.union]
            .iter()
            .any(|o| o.is_some_and(|o| o.stop))
    }
}

/// An unlearning rule: its budget, what happens before the loop and in
/// iteration `t`.
pub trait Method {
    /// How many iterations the method runs and its learning rate at each.
    fn budget(&mut self, s: &mut Session) -> Budget;
    /// Runs before the first iteration, and again on resume, always on the
    /// original weights (masks, teachers). `false`: a stop was requested
    /// meanwhile (SIGTERM/SIGUSR1), exit as resumable.
    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool>;
    /// Iteration `t` of `s.iterations()`.
    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration>;
    /// A diffusion model's EMA decay in this method's runs, when it is the
    /// method's own (default: `diffusion.unlearn_ema_decay`).
    fn ema_decay(&self) -> Option<f64> {
        None
    }
}

/// Rank 0's record of every global batch, for reference implementations.
struct Trace(BufWriter<File>);

/// Everything an iteration works with.
pub struct Session<'a> {
    pub comm: &'a Comm,
    pub plan: &'a RunPlan,
    pub device: Device,
    pub inputs: Inputs,
    pub model: Model,
    /// The model's loss (cross-entropy or denoising; [`crate::task`]).
    pub task: TaskLoss,
    pub engine: Engine<'a>,
    pub forget: BatchStream,
    pub remain: BatchStream,
    /// Opened on first use (the methods that train on remain ∪ forget).
    union: Option<BatchStream>,
    /// Set from the method before the loop.
    pub budget: Budget,
    /// Content digest of the original weights ([`weights::content_digest`]).
    pub from_hash: String,
    pub faults: Faults,
    trace: Option<Trace>,
}

impl Session<'_> {
    pub fn iterations(&self) -> u64 {
        self.budget.total
    }

    /// The method's learning rate at iteration `t`.
    pub fn lr(&self, t: u64) -> f64 {
        self.budget.lr(t)
    }

    /// This rank's share of the next global batch of `which`.
    pub fn next(&mut self, which: Which, t: u64) -> Result<Batch> {
        if self.trace.is_some() {
            let indices = self.stream(which).next_global();
            self.trace(which.name(), t, &indices)?;
        }
        Ok(self.stream(which).next_batch()?)
    }

    /// The stream of `which` (the union stream opens at its start).
    pub fn stream(&mut self, which: Which) -> &mut BatchStream {
        match which {
            Which::Forget => &mut self.forget,
            Which::Remain => &mut self.remain,
            Which::Union => self.union.get_or_insert_with(|| {
                stream(
                    self.plan,
                    &self.inputs,
                    Which::Union,
                    Cursor::default(),
                    self.comm,
                )
            }),
        }
    }

    /// Records a global batch read outside the two streams (e.g. a Fisher pass).
    pub fn trace(&mut self, phase: &str, k: u64, indices: &[usize]) -> Result<()> {
        if let Some(trace) = &mut self.trace {
            writeln!(
                trace.0,
                "{}",
                json!({"phase": phase, "t": k, "indices": indices})
            )?;
        }
        Ok(())
    }

    /// The end of a pass that each rank ran over its share (a mask or
    /// Fisher pass accumulating into `sum`): the ranks agree on whether a
    /// stop was requested meanwhile (`false`: exit as resumable) and
    /// otherwise sum `sum` across them.
    pub fn end_pass(&mut self, sum: &mut Tensor) -> Result<bool> {
        self.engine.zero_grad();
        let stop = self
            .comm
            .sum_scalar(f64::from(u8::from(self.engine.stop_requested())));
        if stop > 0.0 {
            return Ok(false);
        }
        self.comm.sum_tensor(sum)?;
        Ok(true)
    }

    /// The engine's reduction, with the test-only faults of step `t` first.
    pub fn reduce(&mut self, local: Local, scale: Scale, t: u64) -> Result<Outcome> {
        self.faults.before_reduce(self.comm.rank(), t, &self.engine);
        self.engine.reduce(local, scale)
    }

    /// The step skeleton on the next global batch of `which`: this rank's
    /// share is forwarded (train or eval mode); `loss(logits, share)` gives
    /// each row's loss and the labels its accuracy counts against; the sum
    /// of the losses is back-propagated and reduced into the global batch's
    /// mean gradient, which [`Session::finish`] edits and steps with at `lr`.
    pub fn step(
        &mut self,
        which: Which,
        t: u64,
        lr: f64,
        train: bool,
        edit: &Edit,
        loss: &mut dyn FnMut(&Tensor, &Rows) -> (Tensor, Tensor),
    ) -> Result<Outcome> {
        let mut out = self.backward(which, t, train, loss)?;
        self.finish(
            &mut out,
            edit,
            lr,
            &format!("iteration {t} ({} step)", which.name()),
        )?;
        Ok(out)
    }

    /// The first half of [`Session::step`]: forward, backward and the
    /// reduction (the mean gradient is in `engine.flat_grad()`).
    pub fn backward(
        &mut self,
        which: Which,
        t: u64,
        train: bool,
        loss: &mut dyn FnMut(&Tensor, &Rows) -> (Tensor, Tensor),
    ) -> Result<Outcome> {
        self.backward_with(which, t, &mut |s, batch, global| {
            if !s.model.must_forward(batch.is_empty(), train) {
                return None;
            }
            let rows = Rows {
                x: batch.images.to_device(s.device),
                labels: batch.labels.to_device(s.device),
                indices: batch.indices.clone(),
            };
            let keys = s
                .task
                .row_keys(&s.engine, batch, global, which.purpose(), t);
            let logits = s.model.forward_keyed(&rows.x, train, &keys);
            let (losses, targets) = loss(&logits, &rows);
            Some((losses.sum(Kind::Float), correct(&logits, &targets)))
        })
    }

    /// [`Session::backward`] of a denoiser: `loss(model, denoising, rows)`
    /// gives each of this rank's rows its loss, the rows carrying the
    /// draws of `(which, t)` ([`crate::diffusion::draws`]); `train` turns on
    /// condition dropout and dropout.
    pub fn denoise_backward(
        &mut self,
        which: Which,
        t: u64,
        train: bool,
        loss: &mut dyn FnMut(&Model, &Denoising, &DenoiseRows) -> Tensor,
    ) -> Result<Outcome> {
        self.backward_with(which, t, &mut |s, batch, global| {
            if batch.is_empty() {
                return None;
            }
            let rows = s
                .task
                .rows(&s.engine, batch, global, which.purpose(), t, train)?;
            let den = s.task.denoising(train)?;
            Some((loss(&s.model, &den, &rows).sum(Kind::Float), 0.0))
        })
    }

    /// The task-independent part of a step's first half: reads the next
    /// global batch of `which` (this rank's share, and the global indices),
    /// lets `forward` give this rank's loss sum (a graph) and correct count
    /// (`None`: nothing to back-propagate), back-propagates it and reduces.
    fn backward_with(&mut self, which: Which, t: u64, forward: &mut ShareLoss) -> Result<Outcome> {
        let global = self.stream(which).next_global();
        let batch = self.next(which, t)?;
        self.engine.zero_grad();
        let mut local = Local::default();
        if let Some((sum, correct)) = forward(self, &batch, &global) {
            self.engine.backward(&sum);
            local = Local {
                loss_sum: sum.double_value(&[]),
                correct,
                count: batch.len() as f64,
            };
        }
        self.reduce(local, Scale::MeanOverCount, t)
    }

    /// The second half of a step: [`Engine::finish`].
    pub fn finish(&mut self, out: &mut Outcome, edit: &Edit, lr: f64, what: &str) -> Result<()> {
        self.engine.finish(out, edit, lr, what)
    }

    /// A plain step of the task's loss on `which` in train mode:
    /// cross-entropy (FT's step, SFR-on's remain step) or the denoising loss.
    pub fn task_step(&mut self, which: Which, t: u64, lr: f64, edit: &Edit) -> Result<Outcome> {
        let mut out = self.task_backward(which, t)?;
        let what = format!("iteration {t} ({} step)", which.name());
        self.finish(&mut out, edit, lr, &what)?;
        Ok(out)
    }

    /// The first half of [`Session::task_step`]: forward, backward and the
    /// reduction of the task's loss (the mean gradient is in
    /// `engine.flat_grad()`).
    pub fn task_backward(&mut self, which: Which, t: u64) -> Result<Outcome> {
        match self.task.task() {
            Task::Classify => self.backward(which, t, true, &mut ce),
            Task::Denoise => self.denoise_backward(which, t, true, &mut |m, den, rows| {
                diffusion::loss::per_sample(m, den, rows, true)
            }),
        }
    }

    /// [`Session::task_step`] without edits.
    pub fn ce_step(&mut self, which: Which, t: u64, lr: f64) -> Result<Outcome> {
        self.task_step(which, t, lr, &Edit::default())
    }
}

/// This rank's loss sum over its share of a batch (a graph) and the rows
/// it gets right, from the session, the share and the global batch's
/// dataset indices; `None`: nothing to back-propagate.
type ShareLoss<'f> = dyn FnMut(&Session, &Batch, &[usize]) -> Option<(Tensor, f64)> + 'f;

/// This rank's share of a batch, on the device.
pub struct Rows {
    pub x: Tensor,
    pub labels: Tensor,
    /// Dataset indices of the rows.
    pub indices: Vec<usize>,
}

/// Per-row cross-entropy against the true labels.
pub fn ce(logits: &Tensor, rows: &Rows) -> (Tensor, Tensor) {
    let losses =
        logits.cross_entropy_loss::<Tensor>(&rows.labels, None, Reduction::None, -100, 0.0);
    (losses, rows.labels.shallow_clone())
}

/// Per-row `KL(p_teacher ‖ p_student)` of softmax(z/T), as
/// `F.kl_div(log_softmax(s/T), softmax(t/T))` summed over classes
/// (`0 · log 0 = 0`).
pub fn kl_rows(student: &Tensor, teacher_probs: &Tensor, temperature: f64) -> Tensor {
    (student / temperature)
        .log_softmax(-1, Kind::Float)
        .kl_div(teacher_probs, Reduction::None, false)
        .sum_dim_intlist(-1, false, Kind::Float)
}

/// A frozen copy of the model's current weights (a teacher), in eval use only.
pub fn frozen_copy(s: &Session) -> Result<Model> {
    let mut copy = Model::new(
        s.model.arch.clone(),
        s.model.in_channels,
        s.model.classes,
        s.device,
    );
    copy.set_compute(s.model.compute())
        .map_err(anyhow::Error::msg)?;
    tch::no_grad(|| {
        for ((_, dst), (_, src)) in copy.state().iter().zip(s.model.state()) {
            dst.shallow_clone().copy_(&src);
        }
    });
    copy.vs.freeze();
    Ok(copy)
}

/// Global batches in one pass over `which`.
pub fn batches(s: &mut Session, which: Which) -> u64 {
    s.stream(which).batches_per_epoch() as u64
}

/// Eval-mode logits of a teacher, without a graph.
pub fn teacher_logits(teacher: &Model, x: &Tensor) -> Tensor {
    tch::no_grad(|| teacher.forward_t(x, false))
}

/// The hash of what determines an unlearning run's result.
pub fn recipe_hash(plan: &RunPlan, inputs: &Inputs, command: &str, from_hash: &str) -> String {
    let raw = &plan.config.raw;
    let mut unlearn = raw.unlearn.clone();
    unlearn.from = String::new();
    unlearn.log_every = 0;
    unlearn.eval_every = 0;
    unlearn.verify_every = 0;
    unlearn.snapshot_every = 0;
    unlearn.eval_before = false;
    unlearn.eval_after = false;
    let mut recipe = json!({
        "command": command,
        "seed": plan.seed,
        "model": { "arch": plan.model.arch.name(), "from": from_hash },
        "unlearn": unlearn,
        "method": method_section(plan),
        "data": inputs.identity(plan),
        "split": inputs.split_hash(),
    });
    if plan.model.arch.task() == Task::Denoise {
        recipe["diffusion"] = json!(plan.diffusion);
    }
    crate::model::layout::add_precision(&mut recipe, plan.precision);
    crate::model::norm::add_to_recipe(&mut recipe, &plan.model.arch, plan.model.batchnorm.mode);
    format!("sha256:{}", sha256_hex(recipe.to_string().as_bytes()))
}

/// The configuration section of the run's method, as it decides the result.
fn method_section(plan: &RunPlan) -> serde_json::Value {
    let raw = &plan.config.raw;
    let denoiser = plan.model.arch.task() == Task::Denoise;
    let v = match plan.unlearn.method {
        UnlearnMethod::Sfron
        | UnlearnMethod::SfronR
        | UnlearnMethod::SfronROn
        | UnlearnMethod::SfronFROn
        | UnlearnMethod::SfronJoint => {
            let mut sfron = raw.sfron.clone();
            sfron.fisher_cache = String::new();
            serde_json::to_value(&sfron)
        }
        UnlearnMethod::Ft => serde_json::to_value(&raw.ft),
        UnlearnMethod::Ga => serde_json::to_value(&raw.ga),
        UnlearnMethod::Rl | UnlearnMethod::Salun if denoiser => {
            serde_json::to_value(&raw.diffusion_rl)
        }
        UnlearnMethod::Rl => serde_json::to_value(&raw.rl),
        UnlearnMethod::Salun => serde_json::to_value(&raw.salun),
        UnlearnMethod::BadTeacher => serde_json::to_value(&raw.bad_teacher),
        UnlearnMethod::Scrub => serde_json::to_value(&raw.scrub),
        UnlearnMethod::L1Sparse => serde_json::to_value(&raw.l1_sparse),
        UnlearnMethod::Sa => serde_json::to_value(&raw.sa),
    };
    v.unwrap_or_default()
}

/// The methods that run on a diffusion model (their losses are the task's).
pub const DENOISER_METHODS: [UnlearnMethod; 6] = [
    UnlearnMethod::Sfron,
    UnlearnMethod::Ft,
    UnlearnMethod::Ga,
    UnlearnMethod::Rl,
    UnlearnMethod::Salun,
    UnlearnMethod::Sa,
];

fn takes_denoisers(method: UnlearnMethod) -> bool {
    DENOISER_METHODS.contains(&method)
}

/// The method of the plan.
fn method(plan: &RunPlan) -> Box<dyn Method> {
    let b = &plan.baselines;
    let denoiser = plan.model.arch.task() == Task::Denoise;
    match plan.unlearn.method {
        m @ (UnlearnMethod::Sfron
        | UnlearnMethod::SfronR
        | UnlearnMethod::SfronROn
        | UnlearnMethod::SfronFROn
        | UnlearnMethod::SfronJoint) => Box::new(sfron::Sfron::new(
            plan.sfron.clone(),
            sfron::Ablation::of(m).expect("an SFR-on method"),
        )),
        UnlearnMethod::Ft => Box::new(ft::Ft::new(b.ft)),
        UnlearnMethod::Ga => Box::new(ga::Ga::new(b.ga)),
        // On a diffusion model: the DDPM release's relabelling (module docs).
        UnlearnMethod::Rl | UnlearnMethod::Salun if denoiser => {
            Box::new(diffusion_rl::DiffusionRl::new(
                plan.config.raw.diffusion_rl.clone(),
                plan.unlearn.method == UnlearnMethod::Salun,
            ))
        }
        UnlearnMethod::Rl => Box::new(rl::Rl::new(b.rl)),
        UnlearnMethod::Salun => Box::new(salun::Salun::new(b.salun)),
        UnlearnMethod::BadTeacher => Box::new(bad_teacher::BadTeacher::new(b.bad_teacher)),
        UnlearnMethod::Scrub => Box::new(scrub::Scrub::new(b.scrub)),
        UnlearnMethod::L1Sparse => Box::new(l1_sparse::L1Sparse::new(b.l1_sparse)),
        UnlearnMethod::Sa => Box::new(sa::Sa::new(plan.config.raw.sa.clone())),
    }
}

/// Forget, remain and test accuracy (eval mode, test transforms).
fn evaluate(s: &Session, batch: usize) -> Result<[eval::Score; 3]> {
    let forget = s.inputs.forget();
    let remain = s.inputs.remain();
    let test: Vec<usize> = (0..s.inputs.test.len()).collect();
    let mut train_loader = Inputs::loader(s.plan, &s.inputs.train, &s.plan.data.test_transform);
    let mut test_loader = Inputs::loader(s.plan, &s.inputs.test, &s.plan.data.test_transform);
    Ok([
        eval::score(
            s.comm,
            &s.model,
            &mut train_loader,
            &forget,
            batch,
            s.device,
        )?,
        eval::score(
            s.comm,
            &s.model,
            &mut train_loader,
            &remain,
            batch,
            s.device,
        )?,
        eval::score(s.comm, &s.model, &mut test_loader, &test, batch, s.device)?,
    ])
}

fn fill_state(s: &Session, state: &mut RunState) {
    state.cursors.insert("forget".into(), s.forget.cursor());
    state.cursors.insert("remain".into(), s.remain.cursor());
    if let Some(union) = &s.union {
        state.cursors.insert("union".into(), union.cursor());
    }
    state.optimizer_steps = s.engine.optimizer.steps();
    state.skips_total = s.engine.skips_total;
    state.skips_in_row = s.engine.skips_in_row;
}

/// Runs `sfron unlearn`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, args: &UnlearnArgs) -> Result<Status> {
    let u = &plan.unlearn;
    if plan.model.arch.task() == Task::Denoise && !takes_denoisers(u.method) {
        bail!(
            "unlearn.method = {:?} works on a classifier's logits; for a diffusion model ({}) use \
             one of {}",
            u.method.as_str(),
            plan.model.arch.name(),
            DENOISER_METHODS
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if u.method == UnlearnMethod::Sa && plan.data.format == crate::data::Format::Latents {
        bail!(
            "unlearn.method = \"sa\" replays generated images as training data; on a latent \
             dataset (data.format = \"latents\") they would have to stay latents, which SA does \
             not do yet: use sfron, ga, ft, rl or salun"
        );
    }
    if plan.model.arch.task() == Task::Classify && u.method == UnlearnMethod::Sa {
        bail!(
            "unlearn.method = \"sa\" (Selective Amnesia) replays images the model generates: \
             it needs a diffusion model, and {} is a classifier",
            plan.model.arch.name()
        );
    }
    let from = u
        .from
        .clone()
        .context("unlearn needs the original model: pass --from WEIGHTS (or set unlearn.from)")?;
    let inputs = Inputs::open(plan)?;
    let Some((_, split_path)) = &inputs.split else {
        bail!("unlearn needs a split: pass --split MANIFEST (or set data.split)");
    };
    if inputs.forget().is_empty() {
        bail!("{}: the split forgets no samples", split_path.display());
    }
    if inputs.remain().is_empty() {
        bail!(
            "{}: the split forgets every sample: nothing remains",
            split_path.display()
        );
    }
    let from_bytes = weights::read(&from)?;
    let from_hash = format!(
        "sha256:{}",
        weights::content_digest(&from_bytes)
            .map_err(|e| anyhow::anyhow!("{} (unlearn.from): {e}", from.display()))?
    );
    let mut model = Model::new(
        plan.model.arch.clone(),
        inputs.in_channels,
        inputs.classes,
        device,
    );
    model.load_bytes(&from_bytes, &from)?;
    model
        .set_compute(plan.compute())
        .map_err(anyhow::Error::msg)?;
    // A probe only: its stream restarts on resume and differs by rank.
    model.set_logit_noise(
        u.logit_noise,
        crate::rng::Rng::keyed(&[plan.seed, u.logit_noise_seed, comm.rank() as u64]).next_u64(),
    );
    let command = format!("unlearn:{}", u.method.as_str());
    let recipe = recipe_hash(plan, &inputs, &command, &from_hash);
    let split = inputs.split_hash();
    let optimizer = Optimizer::new(u.optimizer.clone(), model.parameters().len());
    let stop = StopFlag::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let mut engine = Engine::new(
        comm,
        &model,
        optimizer,
        u.max_skips,
        stop,
        &plan.comm,
        plan.model.batchnorm,
    )?;
    engine.section = "unlearn";

    let mut s = Session {
        comm,
        plan,
        device,
        forget: stream(plan, &inputs, Which::Forget, Cursor::default(), comm),
        remain: stream(plan, &inputs, Which::Remain, Cursor::default(), comm),
        union: None,
        budget: Budget::iterations(1, 1.0),
        inputs,
        task: TaskLoss::new(plan, &model, device),
        model,
        engine,
        from_hash,
        faults: Faults::from_args(&args.faults),
        trace: None,
    };
    let mut method = method(plan);
    s.budget = method.budget(&mut s);
    let end = s.budget.total;

    // A checkpoint is read and checked before any work; its weights are
    // put in place after the method has prepared on the original ones.
    let mut resumed = None;
    // Where the EMA starts: a checkpoint's, or the original's (read below).
    let mut ema_start: Option<(std::path::PathBuf, Vec<u8>)> = None;
    let decay = method
        .ema_decay()
        .unwrap_or(plan.diffusion.unlearn_ema_decay);
    let keeps_ema = s.task.task() == Task::Denoise && decay > 0.0;
    if let Some(restored) = rundir::restore_everywhere(comm, plan)? {
        if keeps_ema {
            let (path, bytes) = rundir::checkpoint_ema(&restored)?;
            ema_start = Some((path, bytes.to_vec()));
        }
        let original = (s.engine.param_copies(), s.engine.buffer_copies());
        let (saved, tensors) =
            rundir::load_checkpoint(&restored, &s.model, &recipe, &split, &command)?;
        let params: Vec<Tensor> = s.engine.params.iter().map(Tensor::shallow_clone).collect();
        s.engine
            .optimizer
            .restore(&s.engine.names, &params, &tensors, saved.optimizer_steps)
            .map_err(|e| anyhow::anyhow!("{}/{STATE_FILE}: {e}", restored.dir.display()))?;
        let checkpointed = (s.engine.param_copies(), s.engine.buffer_copies());
        s.engine.restore_params(&original.0);
        s.engine.restore_buffers(&original.1);
        tracing::info!(iteration = saved.step, dir = %restored.dir.display(), "resuming");
        resumed = Some((saved, checkpointed));
    }
    // Wall time of earlier parts of this run (a resume continues the clock).
    let base_seconds = resumed.as_ref().map_or(0.0, |r| r.0.elapsed_s);
    let mut state = match &resumed {
        Some((saved, _)) => RunState {
            world_size: comm.size(),
            ..saved.clone()
        },
        None => RunState {
            command: command.clone(),
            recipe: recipe.clone(),
            split: split.clone(),
            world_size: comm.size(),
            ..RunState::default()
        },
    };

    let mut checkpoints = rundir::open_run_dir(comm, plan, &s.inputs)?;
    if comm.is_root()
        && let Some(path) = &args.trace
    {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the trace {}", path.display()))?;
        s.trace = Some(Trace(BufWriter::new(file)));
    }
    let start = state.step;
    let mut progress = Progress::new(&plan.run_dir, comm.is_root(), &command, end, start)?;
    tracing::info!(
        forget = s.forget_len(),
        remain = s.remain_len(),
        iterations = end,
        from = start,
        original = %from.display(),
        "{command}: {}",
        s.model.arch.name()
    );
    // A diffusion model's scores are generation metrics (`sfron eval`,
    // `sfron study`); its runs log the forget and remain losses.
    let classifier = s.task.task() == Task::Classify;
    if start == 0 && u.eval_before && classifier {
        let [f, r, te] = evaluate(&s, u.batch)?;
        let scores = json!({"forget_acc": f.accuracy(), "remain_acc": r.accuracy(),
            "test_acc": te.accuracy(), "forget_loss": f.mean_loss(),
            "remain_loss": r.mean_loss(), "test_loss": te.mean_loss()});
        progress.say(&format!(
            "before: forget acc {:.2}%  remain acc {:.2}%  test acc {:.2}%",
            f.accuracy(),
            r.accuracy(),
            te.accuracy()
        ));
        let mut rec = scores.clone();
        rec["event"] = json!("eval");
        rec["step"] = json!(0);
        progress.record(rec)?;
        state.before = Some(scores);
    }
    // The clock of the unlearning itself starts here (after the "before" scores).
    let started = Instant::now();
    if !method.prepare(&mut s, &mut progress)? {
        // Nothing of the loop has happened since the last checkpoint (if any).
        comm.barrier();
        progress.finish();
        tracing::warn!("stop requested while preparing: exiting as resumable");
        return Ok(Status::Preempted);
    }
    if let Some((saved, (params, buffers))) = resumed {
        s.engine.restore_params(&params);
        s.engine.restore_buffers(&buffers);
        s.engine.skips_total = saved.skips_total;
        s.engine.skips_in_row = saved.skips_in_row;
        let at = |name: &str| saved.cursors.get(name).copied().unwrap_or_default();
        s.forget = stream(plan, &s.inputs, Which::Forget, at("forget"), comm);
        s.remain = stream(plan, &s.inputs, Which::Remain, at("remain"), comm);
        if saved.cursors.contains_key("union") {
            s.union = Some(stream(plan, &s.inputs, Which::Union, at("union"), comm));
        }
    }
    let broadcast_s = s.engine.broadcast_state()?;
    if ema_start.is_none() && keeps_ema {
        // The release starts the forgetting's EMA from the original's.
        let sibling = from.with_file_name(crate::engine::ema::EMA_FILE);
        if sibling.is_file() {
            ema_start = Some((sibling.clone(), weights::read(&sibling)?));
        }
    }
    let mut ema = rundir::ema_for(
        &s.model,
        decay,
        ema_start.as_ref().map(|(p, b)| (p.as_path(), b.as_slice())),
    )?;
    drop(ema_start);

    let mut windows = Windows::new();
    let mut comm_mark = s.engine.comm_seconds;
    let mut t = start;
    while t < end {
        let it = match method.iteration(&mut s, t) {
            Ok(it) => it,
            Err(e) => {
                // The last complete checkpoint stays the one to resume from.
                if let Some(c) = checkpoints.as_mut() {
                    c.wait()?;
                }
                return Err(e);
            }
        };
        s.faults.after_step(comm.rank(), t, &s.engine.params);
        if let Some(ema) = ema.as_mut() {
            ema.update(&s.engine.params);
        }
        t += 1;
        if u.snapshot_every > 0 && t.is_multiple_of(u.snapshot_every) && comm.is_root() {
            save_snapshot(&s, ema.as_ref(), &state, t)?;
        }
        windows.add(&it);
        if t.is_multiple_of(u.log_every) || t == end {
            let n = windows.iterations.max(1) as f64;
            let ms = 1e3 * windows.since.elapsed().as_secs_f64() / n;
            let mut rec = json!({
                "event": "step", "step": t, "lr": s.lr(t - 1), "iteration_ms": ms,
                "comm_ms": 1e3 * (s.engine.comm_seconds - comm_mark) / n,
                "skipped": s.engine.skips_total,
            });
            let mut line = Vec::new();
            for (which, w) in [Which::Forget, Which::Remain, Which::Union]
                .into_iter()
                .zip(&windows.streams)
            {
                if let (Some(loss), Some(acc)) = (w.loss(), w.acc()) {
                    rec[format!("{}_loss", which.name())] = json!(loss);
                    if classifier {
                        rec[format!("{}_acc", which.name())] = json!(acc);
                        line.push(format!("{} loss {loss:.3} acc {acc:.1}%", which.name()));
                    } else {
                        line.push(format!("{} loss {loss:.3}", which.name()));
                    }
                }
                if let Some(norm) = w.grad_norm() {
                    rec[format!("{}_grad_norm", which.name())] = json!(norm);
                }
            }
            comm_mark = s.engine.comm_seconds;
            progress.show(t, &format!("{} | {ms:.0} ms/it", line.join(" | ")));
            progress.record(rec)?;
            windows = Windows::new();
        }
        let what = format!("iteration {t}");
        if u.verify_every > 0 && t.is_multiple_of(u.verify_every) {
            s.engine.verify_identical(&what)?;
        }
        if classifier && u.eval_every > 0 && t.is_multiple_of(u.eval_every) && t < end {
            let [f, r, te] = evaluate(&s, u.batch)?;
            progress.record(json!({"event": "eval", "step": t, "forget_acc": f.accuracy(),
                "remain_acc": r.accuracy(), "test_acc": te.accuracy(),
                "forget_loss": f.mean_loss(), "remain_loss": r.mean_loss(), "test_loss": te.mean_loss()}))?;
        }
        let ck = &plan.checkpoint;
        let stop = it.stop();
        if stop || t == end || (ck.every_steps > 0 && t.is_multiple_of(ck.every_steps)) {
            s.engine.verify_identical(&what)?;
            state.step = t;
            state.elapsed_s = base_seconds + started.elapsed().as_secs_f64();
            fill_state(&s, &mut state);
            if let Some(c) = checkpoints.as_mut() {
                c.save(
                    t,
                    rundir::checkpoint_files(&s.model, &s.engine, &state, ema.as_ref())?,
                )?;
                if stop {
                    c.wait()?;
                }
            }
            if stop {
                comm.barrier();
                progress.finish();
                tracing::warn!(
                    iteration = t,
                    "stop requested: checkpoint written, exiting as resumable"
                );
                return Ok(Status::Preempted);
            }
        }
    }
    if let Some(c) = checkpoints.as_mut() {
        c.wait()?;
    }
    if let Some(trace) = &mut s.trace {
        trace.0.flush()?;
    }
    // Wall time of the unlearning itself (every resumed part, preparation included).
    let elapsed = base_seconds + started.elapsed().as_secs_f64();
    progress.finish();
    let after = if u.eval_after && classifier {
        let [f, r, te] = evaluate(&s, u.batch)?;
        progress.record(
            json!({"event": "final", "step": end, "forget_acc": f.accuracy(),
            "remain_acc": r.accuracy(), "test_acc": te.accuracy(), "forget_loss": f.mean_loss(),
            "remain_loss": r.mean_loss(), "test_loss": te.mean_loss(), "seconds": elapsed}),
        )?;
        Some([f.accuracy(), r.accuracy(), te.accuracy()])
    } else {
        progress.record(json!({"event": "final", "step": end, "seconds": elapsed}))?;
        None
    };
    if comm.is_root() {
        let out = plan.run_dir.join(MODEL_FILE);
        let mut meta = rundir::final_meta(&state, &s.model, end);
        meta.insert("sfron.from".into(), s.from_hash.clone());
        if let Some(ema) = &ema {
            let mut meta = meta.clone();
            meta.insert(rundir::EMA_DECAY.into(), ema.decay().to_string());
            weights::save(
                &plan.run_dir.join(crate::engine::ema::EMA_FILE),
                &ema.state(&s.model),
                &meta,
            )?;
        }
        s.model.save(&out, meta)?;
        let summary = json!({
            "method": u.method.as_str(), "from": from.display().to_string(),
            "split": split, "iterations": end, "seconds": elapsed, "ranks": comm.size(),
            // unlearn.remain_classes' draw (null: every remaining class).
            "remain_classes": s.inputs.drawn_remain_classes(plan),
            "forget_acc": after.map(|a| a[0]), "remain_acc": after.map(|a| a[1]),
            "test_acc": after.map(|a| a[2]),
            "before": state.before,
            // The distribution scheme's cost in this run (DESIGN §1.4): time in
            // the all-reduces and buffer broadcasts, and what one broadcast of
            // the whole state took (the rank-0-update alternative's extra cost
            // per step).
            "comm_seconds": s.engine.comm_seconds, "state_broadcast_seconds": broadcast_s,
        });
        crate::fsx::write_atomic(
            &plan.run_dir.join("unlearn.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        let scores = after.map_or_else(String::new, |[f, r, te]| {
            format!("forget acc {f:.2}%  remain acc {r:.2}%  test acc {te:.2}%  ")
        });
        println!(
            "{command}: {scores}in {elapsed:.1} s ({end} iterations, {} rank(s)) → {}",
            comm.size(),
            out.display()
        );
    }
    comm.barrier();
    Ok(Status::Done)
}

/// Rank 0 saves the weights after iteration `t` (and the EMA's) under
/// `<run folder>/snapshots/` (`unlearn.snapshot_every`).
fn save_snapshot(
    s: &Session,
    ema: Option<&crate::engine::ema::Ema>,
    state: &RunState,
    t: u64,
) -> Result<()> {
    let dir = s.plan.run_dir.join("snapshots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut meta = rundir::final_meta(state, &s.model, t);
    meta.insert("sfron.from".into(), s.from_hash.clone());
    s.model
        .save(&dir.join(format!("iter-{t:06}.safetensors")), meta.clone())?;
    if let Some(ema) = ema {
        meta.insert(rundir::EMA_DECAY.into(), ema.decay().to_string());
        weights::save(
            &dir.join(format!("iter-{t:06}.ema.safetensors")),
            &ema.state(&s.model),
            &meta,
        )?;
    }
    Ok(())
}

/// The metrics of each stream since the last metrics line.
struct Windows {
    streams: [Window; 3],
    since: Instant,
    iterations: u64,
}

impl Windows {
    fn new() -> Self {
        Windows {
            streams: Default::default(),
            since: Instant::now(),
            iterations: 0,
        }
    }

    fn add(&mut self, it: &Iteration) {
        for (w, o) in self
            .streams
            .iter_mut()
            .zip([it.forget, it.remain, it.union])
        {
            if let Some(o) = o {
                w.add(&o);
            }
        }
        self.iterations += 1;
    }
}

impl Session<'_> {
    pub fn forget_len(&self) -> usize {
        self.inputs.forget().len()
    }

    pub fn remain_len(&self) -> usize {
        self.inputs.unlearn_remain(self.plan).len()
    }
}

/// The stream of `which` (shuffled per epoch, cycling without end),
/// positioned at `cursor`.
fn stream(
    plan: &RunPlan,
    inputs: &Inputs,
    which: Which,
    cursor: Cursor,
    comm: &Comm,
) -> BatchStream {
    let (members, tag, batch) = match which {
        Which::Forget => (inputs.forget(), Stream::Forget, plan.unlearn.forget_batch),
        Which::Remain => (
            inputs.unlearn_remain(plan),
            Stream::Remain,
            plan.unlearn.batch,
        ),
        Which::Union => {
            let mut all = inputs.unlearn_remain(plan);
            all.extend(inputs.forget());
            all.sort_unstable();
            (all, Stream::Union, plan.unlearn.batch)
        }
    };
    let sampler = Sampler::new(members, plan.seed, tag, batch, true, false);
    let loader = Inputs::loader(plan, &inputs.train, &plan.data.train_transform);
    BatchStream::new(sampler, loader, cursor, comm.rank(), comm.size())
}
