//! `sfron unlearn`: make a trained model forget the split's forget set.
//!
//! The harness here is shared by every method: it loads the original model
//! and the split, opens the forget and remain streams (separate, resumable
//! samplers), resumes from the newest checkpoint, and runs iterations of the
//! method with the engine's step skeleton (backward → one reduction → edit →
//! optimizer step), logging, verifying, checkpointing and stopping exactly as
//! `train` does. A method only says what one iteration does ([`Method`]).

pub mod saliency;
pub mod sfron;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tch::{Device, Tensor};

use crate::cli::UnlearnArgs;
use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::UnlearnMethod;
use crate::data::{Batch, BatchStream, Cursor, Sampler, Stream};
use crate::engine::progress::Progress;
use crate::engine::signals::StopFlag;
use crate::engine::{Engine, Local, Optimizer, Outcome, Scale, backward_ce_sum, schedule};
use crate::eval;
use crate::fsx::sha256_hex;
use crate::inputs::Inputs;
use crate::model::{Model, weights};
use crate::train::{self, Faults, MODEL_FILE, RunState, STATE_FILE, Status};

/// One of the two data streams of an unlearning run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Forget,
    Remain,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Forget => "forget",
            Which::Remain => "remain",
        }
    }
}

/// What one iteration did (each step's outcome as every rank agreed).
#[derive(Clone, Copy, Debug, Default)]
pub struct Iteration {
    pub forget: Option<Outcome>,
    pub remain: Option<Outcome>,
}

impl Iteration {
    /// Some rank was asked to stop during this iteration.
    pub fn stop(&self) -> bool {
        self.forget.is_some_and(|o| o.stop) || self.remain.is_some_and(|o| o.stop)
    }
}

/// An unlearning rule: what happens before the loop and in iteration `t`.
pub trait Method {
    /// Runs before the first iteration, and again on resume (e.g. the
    /// saliency mask, which a cache makes cheap the second time). `false`:
    /// a stop was requested meanwhile (SIGTERM/SIGUSR1), exit as resumable.
    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool>;
    /// Iteration `t` of `s.iterations()`.
    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration>;
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
    pub engine: Engine<'a>,
    pub forget: BatchStream,
    pub remain: BatchStream,
    /// Content digest of the original weights ([`weights::content_digest`]).
    pub from_hash: String,
    pub faults: Faults,
    trace: Option<Trace>,
}

impl Session<'_> {
    pub fn iterations(&self) -> u64 {
        self.plan.unlearn.iterations
    }

    /// `η_t = η (1 + cos(π t / T)) / 2`, stepped every iteration.
    pub fn lr(&self, t: u64) -> f64 {
        self.plan.unlearn.lr * schedule::cosine(t, self.iterations())
    }

    /// This rank's share of the next global batch of `which`.
    pub fn next(&mut self, which: Which, t: u64) -> Result<Batch> {
        if self.trace.is_some() {
            let indices = self.stream(which).next_global();
            self.trace(which.name(), t, &indices)?;
        }
        Ok(self.stream(which).next_batch()?)
    }

    fn stream(&mut self, which: Which) -> &mut BatchStream {
        match which {
            Which::Forget => &mut self.forget,
            Which::Remain => &mut self.remain,
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

    /// The engine's reduction, with the test-only faults of step `t` first.
    pub fn reduce(&mut self, local: Local, scale: Scale, t: u64) -> Result<Outcome> {
        self.faults
            .before_reduce(self.comm.rank(), t, &self.engine.params);
        self.engine.reduce(local, scale)
    }

    /// A plain remain step: the mean cross-entropy of the next global remain
    /// batch (train mode), reduced, then the optimizer step at `lr`.
    pub fn remain_step(&mut self, t: u64, lr: f64) -> Result<Outcome> {
        let batch = self.next(Which::Remain, t)?;
        self.engine.zero_grad();
        let local = backward_ce_sum(&self.model, &batch, self.device, true);
        let mut out = self.reduce(local, Scale::MeanOverCount, t)?;
        self.engine
            .step(&mut out, lr, &format!("iteration {t} (remain step)"))?;
        Ok(out)
    }
}

/// The hash of what determines an unlearning run's result.
fn recipe_hash(plan: &RunPlan, inputs: &Inputs, command: &str, from_hash: &str) -> String {
    let raw = &plan.config.raw;
    let mut unlearn = raw.unlearn.clone();
    unlearn.from = String::new();
    unlearn.log_every = 0;
    unlearn.eval_every = 0;
    unlearn.verify_every = 0;
    let mut sfron = raw.sfron.clone();
    sfron.fisher_cache = String::new();
    let recipe = json!({
        "command": command,
        "seed": plan.seed,
        "model": { "arch": plan.model.arch.name(), "from": from_hash },
        "unlearn": unlearn,
        "method": match plan.unlearn.method {
            UnlearnMethod::Sfron => serde_json::to_value(&sfron).unwrap_or_default(),
        },
        "data": inputs.identity(plan),
        "split": inputs.split_hash(),
    });
    format!("sha256:{}", sha256_hex(recipe.to_string().as_bytes()))
}

/// Running sums of one stream's statistics between two metrics lines.
#[derive(Default)]
struct Window {
    loss: f64,
    correct: f64,
    count: f64,
}

impl Window {
    fn add(&mut self, o: Option<Outcome>) {
        if let Some(o) = o {
            self.loss += o.loss_sum;
            self.correct += o.correct;
            self.count += o.count;
        }
    }

    fn loss(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.loss / self.count)
    }

    fn acc(&self) -> Option<f64> {
        (self.count > 0.0).then(|| 100.0 * self.correct / self.count)
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
    state.optimizer_steps = s.engine.optimizer.steps();
    state.skips_total = s.engine.skips_total;
    state.skips_in_row = s.engine.skips_in_row;
}

/// Runs `sfron unlearn`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, args: &UnlearnArgs) -> Result<Status> {
    let u = &plan.unlearn;
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
    let mut model = Model::new(plan.model.arch, inputs.in_channels, inputs.classes, device);
    model.load_bytes(&from_bytes, &from)?;
    let command = format!("unlearn:{}", u.method.as_str());
    let recipe = recipe_hash(plan, &inputs, &command, &from_hash);
    let split = inputs.split_hash();
    let optimizer = Optimizer::new(u.optimizer.clone(), model.parameters().len());
    let stop = StopFlag::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let engine = Engine::new(comm, &model, optimizer, u.max_skips, stop);

    // Wall time of earlier parts of this run (a resume continues the clock).
    let mut base_seconds = 0.0;
    let mut state = RunState {
        command: command.clone(),
        recipe: recipe.clone(),
        split: split.clone(),
        world_size: comm.size(),
        ..RunState::default()
    };
    let mut s = Session {
        comm,
        plan,
        device,
        forget: stream(plan, &inputs, Which::Forget, Cursor::default(), comm),
        remain: stream(plan, &inputs, Which::Remain, Cursor::default(), comm),
        inputs,
        model,
        engine,
        from_hash,
        faults: Faults::from_args(&args.faults),
        trace: None,
    };
    if let Some(restored) = train::restore_everywhere(comm, plan)? {
        let (saved, tensors) =
            train::load_checkpoint(&restored, &s.model, &recipe, &split, &command)?;
        let params: Vec<Tensor> = s.engine.params.iter().map(Tensor::shallow_clone).collect();
        s.engine
            .optimizer
            .restore(&s.engine.names, &params, &tensors, saved.optimizer_steps)
            .map_err(|e| anyhow::anyhow!("{}/{STATE_FILE}: {e}", restored.dir.display()))?;
        s.engine.skips_total = saved.skips_total;
        s.engine.skips_in_row = saved.skips_in_row;
        let at = |name: &str| saved.cursors.get(name).copied().unwrap_or_default();
        s.forget = stream(plan, &s.inputs, Which::Forget, at("forget"), comm);
        s.remain = stream(plan, &s.inputs, Which::Remain, at("remain"), comm);
        tracing::info!(iteration = saved.step, dir = %restored.dir.display(), "resuming");
        base_seconds = saved.elapsed_s;
        state = RunState {
            world_size: comm.size(),
            ..saved
        };
    }
    let broadcast_s = s.engine.broadcast_state()?;

    let mut checkpoints = train::open_run_dir(comm, plan, &s.inputs)?;
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
    let end = u.iterations;
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
    if start == 0 && u.eval_before {
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
    let mut method: Box<dyn Method> = match u.method {
        UnlearnMethod::Sfron => Box::new(sfron::Sfron::new(plan.sfron.clone())),
    };
    if !method.prepare(&mut s, &mut progress)? {
        // Nothing of the loop has happened since the last checkpoint (if any).
        comm.barrier();
        progress.finish();
        tracing::warn!("stop requested while preparing: exiting as resumable");
        return Ok(Status::Preempted);
    }

    let mut windows = (Window::default(), Window::default(), Instant::now(), 0u64);
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
        t += 1;
        windows.0.add(it.forget);
        windows.1.add(it.remain);
        windows.3 += 1;
        if t.is_multiple_of(u.log_every) || t == end {
            let secs = windows.2.elapsed().as_secs_f64();
            let rec = json!({
                "event": "step", "step": t, "lr": s.lr(t - 1),
                "forget_loss": windows.0.loss(), "forget_acc": windows.0.acc(),
                "remain_loss": windows.1.loss(), "remain_acc": windows.1.acc(),
                "iteration_ms": 1e3 * secs / windows.3.max(1) as f64,
                "comm_ms": 1e3 * (s.engine.comm_seconds - comm_mark) / windows.3.max(1) as f64,
                "skipped": s.engine.skips_total,
            });
            comm_mark = s.engine.comm_seconds;
            progress.show(
                t,
                &format!(
                    "forget loss {:.3} acc {:.1}% | remain loss {:.3} acc {:.1}% | {:.0} ms/it",
                    windows.0.loss().unwrap_or(f64::NAN),
                    windows.0.acc().unwrap_or(f64::NAN),
                    windows.1.loss().unwrap_or(f64::NAN),
                    windows.1.acc().unwrap_or(f64::NAN),
                    1e3 * secs / windows.3.max(1) as f64
                ),
            );
            progress.record(rec)?;
            windows = (Window::default(), Window::default(), Instant::now(), 0);
        }
        let what = format!("iteration {t}");
        if u.verify_every > 0 && t.is_multiple_of(u.verify_every) {
            s.engine.verify_identical(&what)?;
        }
        if u.eval_every > 0 && t.is_multiple_of(u.eval_every) && t < end {
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
                c.save(t, train::checkpoint_files(&s.model, &s.engine, &state)?)?;
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
    // Wall time of the unlearning itself (every resumed part, Fisher included).
    let elapsed = base_seconds + started.elapsed().as_secs_f64();
    progress.finish();
    let [f, r, te] = evaluate(&s, u.batch)?;
    progress.record(
        json!({"event": "final", "step": end, "forget_acc": f.accuracy(),
        "remain_acc": r.accuracy(), "test_acc": te.accuracy(), "forget_loss": f.mean_loss(),
        "remain_loss": r.mean_loss(), "test_loss": te.mean_loss(), "seconds": elapsed}),
    )?;
    if comm.is_root() {
        let out = plan.run_dir.join(MODEL_FILE);
        let mut meta = train::final_meta(&state, &s.model, end);
        meta.insert("sfron.from".into(), s.from_hash.clone());
        s.model.save(&out, meta)?;
        let summary = json!({
            "method": u.method.as_str(), "from": from.display().to_string(),
            "split": split, "iterations": end, "seconds": elapsed, "ranks": comm.size(),
            "forget_acc": f.accuracy(), "remain_acc": r.accuracy(), "test_acc": te.accuracy(),
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
        println!(
            "{command}: forget acc {:.2}%  remain acc {:.2}%  test acc {:.2}%  in {elapsed:.1} s \
             ({end} iterations, {} rank(s)) → {}",
            f.accuracy(),
            r.accuracy(),
            te.accuracy(),
            comm.size(),
            out.display()
        );
    }
    comm.barrier();
    Ok(Status::Done)
}

impl Session<'_> {
    pub fn forget_len(&self) -> usize {
        self.inputs.forget().len()
    }

    pub fn remain_len(&self) -> usize {
        self.inputs.remain().len()
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
        Which::Remain => (inputs.remain(), Stream::Remain, plan.unlearn.batch),
    };
    let sampler = Sampler::new(members, plan.seed, tag, batch, true, false);
    let loader = Inputs::loader(plan, &inputs.train, &plan.data.train_transform);
    BatchStream::new(sampler, loader, cursor, comm.rank(), comm.size())
}
