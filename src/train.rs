//! `sfron train`: the original model on the whole training set, or Retrain on
//! the remain set of a split; data-parallel, resumable, exact.
//!
//! Every rank runs the same loop; the sampler gives each its share of the
//! global batch, the engine reduces and steps (see [`crate::engine`]), rank 0
//! records metrics and writes checkpoints in the background. A stop request
//! (SIGTERM/SIGUSR1) is agreed in the step's reduction, so every rank stops
//! after the same step; rank 0 checkpoints and all exit with the resumable code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Tensor};

use crate::cli::FaultArgs;
use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::Select;
use crate::data::{BatchStream, Cursor, Sampler, Stream};
use crate::engine::checkpoint::{self, Checkpointer, Restored};
use crate::engine::progress::Progress;
use crate::engine::signals::StopFlag;
use crate::engine::{Edit, Engine, Optimizer, Scale, Window, backward_ce_sum, schedule};
use crate::eval;
use crate::fsx::sha256_hex;
use crate::inputs::Inputs;
use crate::model::{Model, weights};
use crate::rng::{Rng, tag};

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Done,
    /// Stopped by a signal after writing a checkpoint: run the same command again.
    Preempted,
}

/// The metadata key of the run state in `state.safetensors`.
pub const STATE_KEY: &str = "sfron.run";
pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.safetensors";

/// The run state a checkpoint holds besides tensors. Randomness needs no
/// saved generator state: every draw is keyed by (seed, stream, epoch, sample).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunState {
    pub command: String,
    /// Steps completed.
    pub step: u64,
    /// Sampler positions by stream name.
    pub cursors: BTreeMap<String, Cursor>,
    pub optimizer_steps: u64,
    pub skips_total: u64,
    pub skips_in_row: u32,
    /// Hash of everything that determines the result.
    pub recipe: String,
    pub split: String,
    /// Best validation accuracy and its step (model selection).
    pub best: Option<(f64, u64)>,
    pub world_size: usize,
    /// Seconds of work so far, over every resumed part (the run's wall time).
    #[serde(default)]
    pub elapsed_s: f64,
    /// Scores of the starting model (unlearning: the original's FA/RA/TA).
    #[serde(default)]
    pub before: Option<serde_json::Value>,
}

/// Test-only faults, to prove the guards work.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Put a NaN into this rank's gradient at this step.
    pub nan_at: Option<u64>,
    /// Send SIGTERM to this rank before this step's reduction.
    pub signal_at: Option<u64>,
    /// Perturb this rank's weights after this step (the verify check must catch it).
    pub perturb_at: Option<u64>,
    /// Send SIGTERM to this rank during the remain Fisher pass (unlearn).
    pub signal_in_fisher: bool,
    pub rank: usize,
}

impl Faults {
    pub fn from_args(args: &FaultArgs) -> Self {
        Faults {
            nan_at: args.fault_nan_at,
            signal_at: args.fault_signal_at,
            perturb_at: args.fault_perturb_at,
            signal_in_fisher: args.fault_signal_in_fisher,
            rank: args.fault_rank,
        }
    }

    /// Before the reduction of `step`: a NaN gradient or a SIGTERM on the faulty rank.
    pub fn before_reduce(&self, rank: usize, step: u64, engine: &Engine) {
        if rank != self.rank {
            return;
        }
        if self.nan_at == Some(step)
            && let Some(g) = engine.local_grad(0)
        {
            let _ = g.view([-1]).narrow(0, 0, 1).fill_(f64::NAN);
        }
        if self.signal_at == Some(step) {
            // SAFETY: raising a signal we handle with an atomic store.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }

    /// Inside a Fisher pass: SIGTERM on the faulty rank if asked.
    pub fn in_fisher(&self, rank: usize) {
        if rank == self.rank && self.signal_in_fisher {
            // SAFETY: raising a signal we handle with an atomic store.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }

    /// After `step`: the faulty rank's weights drift (verification must catch it).
    pub fn after_step(&self, rank: usize, step: u64, params: &[Tensor]) {
        if rank == self.rank && self.perturb_at == Some(step) {
            tch::no_grad(|| {
                let _ = params[0].view([-1]).narrow(0, 0, 1).g_add_scalar_(1e-3);
            });
        }
    }
}

/// The hash of what determines a run's result: a resume under another recipe
/// or split is refused. Keys that only change logging or the stopping step
/// are left out.
pub fn recipe_hash(plan: &RunPlan, inputs: &Inputs, command: &str) -> String {
    let raw = &plan.config.raw;
    let mut train = raw.train.clone();
    train.max_steps = 0;
    train.log_every = 0;
    train.eval_every = 0;
    train.verify_every = 0;
    let init = plan.model.init.as_ref().map(|p| {
        std::fs::read(p)
            .ok()
            .and_then(|b| weights::content_digest(&b).ok())
            .unwrap_or_default()
    });
    let mut recipe = json!({
        "command": command,
        "seed": plan.seed,
        "model": { "arch": plan.model.arch.name(), "init": init },
        "train": train,
        "data": inputs.identity(plan),
        "split": inputs.split_hash(),
    });
    crate::model::layout::add_precision(&mut recipe, plan.precision);
    crate::model::norm::add_to_recipe(&mut recipe, &plan.model.arch, plan.model.batchnorm.mode);
    format!("sha256:{}", sha256_hex(recipe.to_string().as_bytes()))
}

/// Reads the newest complete checkpoint on rank 0 and gives every rank its
/// bytes (run folders need not be shared between nodes). Every rank gets the
/// same error when it cannot be read.
pub fn restore_everywhere(comm: &Comm, plan: &RunPlan) -> Result<Option<Restored>> {
    if !plan.checkpoint.resume {
        return Ok(None);
    }
    let dir = checkpoint::folder(&plan.run_dir);
    let found = if comm.is_root() {
        checkpoint::newest(&dir).map_err(|e| format!("{e:#}"))
    } else {
        Ok(None)
    };
    let mut head = match &found {
        Err(e) => format!("E{e}"),
        Ok(None) => "N".to_string(),
        Ok(Some(r)) => format!(
            "C{}",
            json!({"dir": r.dir, "step": r.step, "files": r.files.keys().collect::<Vec<_>>()})
        ),
    }
    .into_bytes();
    comm.broadcast_bytes(&mut head, 0);
    let head = String::from_utf8_lossy(&head).into_owned();
    match head.split_at(1) {
        ("E", e) => bail!("{e}"),
        ("N", _) => Ok(None),
        (_, body) => {
            let v: serde_json::Value = serde_json::from_str(body)?;
            let names: Vec<String> = serde_json::from_value(v["files"].clone())?;
            let mut files = BTreeMap::new();
            for name in names {
                let mut bytes = match &found {
                    Ok(Some(r)) => r.files[&name].clone(),
                    _ => Vec::new(),
                };
                comm.broadcast_bytes(&mut bytes, 0);
                files.insert(name, bytes);
            }
            Ok(Some(Restored {
                dir: PathBuf::from(v["dir"].as_str().unwrap_or_default()),
                step: v["step"].as_u64().unwrap_or_default(),
                files,
            }))
        }
    }
}

/// Loads a checkpoint's model and run state, refusing another recipe.
pub fn load_checkpoint(
    restored: &Restored,
    model: &Model,
    recipe: &str,
    split: &str,
    command: &str,
) -> Result<(RunState, BTreeMap<String, Tensor>)> {
    let where_ = restored.dir.display();
    let (model_tensors, meta) = weights::from_bytes(restored.file(MODEL_FILE)?)
        .map_err(|e| anyhow::anyhow!("{where_}/{MODEL_FILE}: {e}"))?;
    if let Some(arch) = meta.get("sfron.arch")
        && *arch != model.arch.name()
    {
        bail!(
            "checkpoint {where_} holds a {arch} model, this run builds {}",
            model.arch.name()
        );
    }
    let (state_tensors, state_meta) = weights::from_bytes(restored.file(STATE_FILE)?)
        .map_err(|e| anyhow::anyhow!("{where_}/{STATE_FILE}: {e}"))?;
    let state: RunState = serde_json::from_str(
        state_meta
            .get(STATE_KEY)
            .with_context(|| format!("{where_}/{STATE_FILE} has no run state"))?,
    )
    .with_context(|| format!("{where_}/{STATE_FILE}: unreadable run state"))?;
    if state.command != command {
        bail!(
            "checkpoint {where_} belongs to a `{}` run, not `{command}`: use another run.name",
            state.command
        );
    }
    if state.split != split {
        bail!(
            "checkpoint {where_} was made with split {}, this run uses {split}: use another \
             run.name, or set checkpoint.resume = false to start over",
            state.split
        );
    }
    if state.recipe != recipe {
        bail!(
            "checkpoint {where_} was made with another configuration (recipe {} vs {recipe}): \
             compare its config.toml, use another run.name, or set checkpoint.resume = false",
            state.recipe
        );
    }
    weights::copy_into(&model.vs, &model_tensors, &restored.dir.join(MODEL_FILE))?;
    Ok((state, state_tensors.into_iter().collect()))
}

/// The bytes of a checkpoint: the model and the run state with optimizer buffers.
pub fn checkpoint_files(
    model: &Model,
    engine: &Engine,
    state: &RunState,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut meta = BTreeMap::new();
    meta.insert("sfron.arch".to_string(), model.arch.name());
    meta.insert("sfron.step".to_string(), state.step.to_string());
    let model_bytes = weights::to_bytes(&model.state(), &meta).map_err(anyhow::Error::msg)?;
    let (tensors, _) = engine.optimizer.state(&engine.names);
    let mut smeta = BTreeMap::new();
    smeta.insert(STATE_KEY.to_string(), serde_json::to_string(state)?);
    let state_bytes = weights::to_bytes(&tensors, &smeta).map_err(anyhow::Error::msg)?;
    Ok(vec![
        (MODEL_FILE.to_string(), model_bytes),
        (STATE_FILE.to_string(), state_bytes),
    ])
}

/// Splits `members` into (train, validation) by a seeded draw of `fraction`.
fn hold_out(members: Vec<usize>, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 {
        return (members, Vec::new());
    }
    let mut order = members;
    Rng::keyed(&[seed, tag::VALIDATION]).shuffle(&mut order);
    let n_val = ((order.len() as f64) * fraction).round() as usize;
    let mut val = order[..n_val].to_vec();
    let mut train = order[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// Runs `sfron train`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, faults: Faults) -> Result<Status> {
    let t = &plan.train;
    let command = if t.on_remain { "retrain" } else { "train" };
    let inputs = Inputs::open(plan)?;
    let members = if t.on_remain {
        inputs.remain()
    } else {
        (0..inputs.train.len()).collect()
    };
    let (members, val) = hold_out(members, t.val_fraction, plan.seed);
    if members.is_empty() {
        bail!("no training samples left (the split forgets all of them?)");
    }
    tch::manual_seed(plan.seed as i64);
    let mut model = Model::new(
        plan.model.arch.clone(),
        inputs.in_channels,
        inputs.classes,
        device,
    );
    if let Some(init) = &plan.model.init {
        model.load(init)?;
    }
    model
        .set_compute(plan.compute())
        .map_err(anyhow::Error::msg)?;
    let recipe = recipe_hash(plan, &inputs, command);
    let split = inputs.split_hash();
    let optimizer = Optimizer::new(t.optimizer.clone(), model.parameters().len());
    let stop = StopFlag::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let mut engine = Engine::new(
        comm,
        &model,
        optimizer,
        t.max_skips,
        stop,
        &plan.comm,
        plan.model.batchnorm,
    )?;

    let mut state = RunState {
        command: command.into(),
        recipe: recipe.clone(),
        split: split.clone(),
        world_size: comm.size(),
        ..RunState::default()
    };
    if let Some(restored) = restore_everywhere(comm, plan)? {
        let (saved, tensors) = load_checkpoint(&restored, &model, &recipe, &split, command)?;
        let params: Vec<Tensor> = engine.params.iter().map(Tensor::shallow_clone).collect();
        engine
            .optimizer
            .restore(&engine.names, &params, &tensors, saved.optimizer_steps)
            .map_err(|e| anyhow::anyhow!("{}/{STATE_FILE}: {e}", restored.dir.display()))?;
        engine.skips_total = saved.skips_total;
        engine.skips_in_row = saved.skips_in_row;
        if saved.world_size != comm.size() {
            tracing::warn!(
                was = saved.world_size,
                now = comm.size(),
                "resuming with another rank count: the same global batches, BatchNorm statistics may differ"
            );
        }
        tracing::info!(step = saved.step, dir = %restored.dir.display(), "resuming");
        state = RunState {
            world_size: comm.size(),
            ..saved
        };
    }
    // Rank 0 is the authority: every rank starts from its state.
    let _ = engine.broadcast_state()?;

    let mut sampler = Sampler::new(
        members.clone(),
        plan.seed,
        Stream::Train,
        t.batch,
        true,
        t.drop_last,
    );
    let per_epoch = sampler.batches_per_epoch() as u64;
    if per_epoch == 0 {
        bail!(
            "train.batch = {} with drop_last leaves no batch of {} samples",
            t.batch,
            members.len()
        );
    }
    let total = per_epoch * t.epochs as u64;
    let end = t.max_steps.map_or(total, |m| m.min(total));
    let start = state.step;
    let cursor = Cursor {
        epoch: start / per_epoch,
        batch: (start % per_epoch) as usize,
    };
    let _ = sampler.permutation(cursor.epoch);
    let train_loader = Inputs::loader(plan, &inputs.train, &plan.data.train_transform);
    let mut stream = BatchStream::new(sampler, train_loader, cursor, comm.rank(), comm.size());
    let mut test_loader = Inputs::loader(plan, &inputs.test, &plan.data.test_transform);
    let mut val_loader = Inputs::loader(plan, &inputs.train, &plan.data.test_transform);
    let test_indices: Vec<usize> = (0..inputs.test.len()).collect();

    let mut checkpoints = open_run_dir(comm, plan, &inputs)?;
    let mut progress = Progress::new(&plan.run_dir, comm.is_root(), command, end, start)?;
    tracing::info!(
        samples = members.len(),
        validation = val.len(),
        steps_per_epoch = per_epoch,
        steps = end,
        from = start,
        global_batch = t.batch,
        "{command}: {}",
        model.arch.name()
    );

    // Wall time of the training (a resume continues the clock of the earlier parts).
    let base_seconds = state.elapsed_s;
    let started = Instant::now();
    let mut step = start;
    // Since the last record: its start and the steps' sums.
    let mut window = (Instant::now(), Window::default());
    while step < end {
        let t0 = Instant::now();
        let batch = stream.next_batch()?;
        engine.zero_grad();
        let local = backward_ce_sum(&mut engine, &model, &batch, device, true);
        faults.before_reduce(comm.rank(), step, &engine);
        let lr = schedule::rate(&t.schedule, t.lr, step, total, t.warmup_steps, per_epoch);
        let mut out = engine.reduce(local, Scale::MeanOverCount)?;
        let what = format!("step {step}");
        if let Err(e) = engine.finish(&mut out, &Edit::default(), lr, &what) {
            // Weights and optimizer are the last good step's: keep them.
            state.step = step;
            finish_checkpoint(
                comm,
                &model,
                &engine,
                &mut state,
                stream.cursor(),
                checkpoints.as_mut(),
            )?;
            return Err(e);
        }
        step += 1;
        faults.after_step(comm.rank(), step - 1, &engine.params);
        let dt = t0.elapsed().as_secs_f64();
        window.1.add(&out);
        if step.is_multiple_of(t.log_every) || step == end {
            let secs = window.0.elapsed().as_secs_f64();
            let w = &window.1;
            let (loss, acc) = (w.loss().unwrap_or(0.0), w.acc().unwrap_or(0.0));
            let images_per_s = w.count / secs.max(1e-9);
            let rec = json!({
                "event": "step", "step": step, "epoch": (step - 1) / per_epoch, "lr": lr,
                "loss": loss, "acc": acc, "images_per_s": images_per_s, "step_ms": 1e3 * dt,
                "grad_norm": w.grad_norm().unwrap_or(0.0),
                "skipped": engine.skips_total,
            });
            progress.show(
                step,
                &format!("loss {loss:.4} acc {acc:.2}% lr {lr:.4} {images_per_s:.0} img/s"),
            );
            progress.record(rec)?;
            window = (Instant::now(), Window::default());
        }
        if t.verify_every > 0 && step.is_multiple_of(t.verify_every) {
            engine.verify_identical(&what)?;
        }
        let epoch_end = step.is_multiple_of(per_epoch);
        let epoch = step.div_ceil(per_epoch);
        // Choosing an epoch (train.select) needs every epoch's score.
        let eval_now = step == end
            || (epoch_end
                && (t.select != Select::Last
                    || (t.eval_every > 0 && epoch.is_multiple_of(t.eval_every as u64))));
        if eval_now {
            let test = eval::score(
                comm,
                &model,
                &mut test_loader,
                &test_indices,
                t.batch,
                device,
            )?;
            let mut rec = json!({
                "event": "eval", "step": step, "epoch": epoch,
                "test_acc": test.accuracy(), "test_loss": test.mean_loss(),
            });
            let mut line = format!("epoch {epoch}: test accuracy {:.2}%", test.accuracy());
            // The score that chooses the kept epoch (train.select).
            let mut chooser = (t.select == Select::Test).then(|| test.accuracy());
            if !val.is_empty() {
                let v = eval::score(comm, &model, &mut val_loader, &val, t.batch, device)?;
                rec["val_acc"] = json!(v.accuracy());
                line.push_str(&format!(", validation {:.2}%", v.accuracy()));
                if t.select == Select::Val {
                    chooser = Some(v.accuracy());
                }
            }
            if let Some(acc) = chooser
                && state.best.is_none_or(|(best, _)| acc > best)
            {
                state.best = Some((acc, step));
                if comm.is_root() {
                    model.save(
                        &plan.run_dir.join("best.safetensors"),
                        selected_meta(&state, &model, step, t.select),
                    )?;
                }
            }
            progress.say(&line);
            progress.record(rec)?;
        }
        let ck = &plan.checkpoint;
        let due = out.stop
            || step == end
            || (ck.every_steps > 0 && step.is_multiple_of(ck.every_steps))
            || (epoch_end && ck.every_epochs > 0 && epoch.is_multiple_of(ck.every_epochs as u64));
        if due {
            engine.verify_identical(&what)?;
            state.step = step;
            state.elapsed_s = base_seconds + started.elapsed().as_secs_f64();
            if out.stop {
                finish_checkpoint(
                    comm,
                    &model,
                    &engine,
                    &mut state,
                    stream.cursor(),
                    checkpoints.as_mut(),
                )?;
                progress.finish();
                tracing::warn!(
                    step,
                    "stop requested: checkpoint written, exiting as resumable"
                );
                return Ok(Status::Preempted);
            }
            if let Some(c) = checkpoints.as_mut() {
                fill_state(&engine, &mut state, stream.cursor());
                c.save(step, checkpoint_files(&model, &engine, &state)?)?;
            }
        }
    }
    progress.finish();
    if let Some(c) = checkpoints.as_mut() {
        c.wait()?;
    }
    if comm.is_root() {
        let out = plan.run_dir.join(MODEL_FILE);
        let selected = match (t.select, state.best) {
            (Select::Val | Select::Test, Some((acc, at))) => {
                std::fs::copy(plan.run_dir.join("best.safetensors"), &out)
                    .with_context(|| format!("writing {}", out.display()))?;
                if t.select == Select::Test {
                    tracing::warn!(
                        test_acc = acc,
                        step = at,
                        "kept the epoch of the best TEST accuracy (train.select = \"test\", \
                         as the released code does): its test accuracy is biased upward"
                    );
                } else {
                    tracing::info!(
                        validation_acc = acc,
                        step = at,
                        "kept the best validation epoch"
                    );
                }
                json!({"by": t.select.as_str(), "step": at, "accuracy": acc})
            }
            _ => {
                model.save(&out, selected_meta(&state, &model, step, Select::Last))?;
                json!({"by": "last", "step": step})
            }
        };
        let summary = json!({
            "command": command, "steps": end, "ranks": comm.size(),
            "seconds": base_seconds + started.elapsed().as_secs_f64(),
            "split": split, "selected": selected,
        });
        let path = plan.run_dir.join("train.json");
        crate::fsx::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %out.display(), "{command} done");
    }
    comm.barrier();
    Ok(Status::Done)
}

/// Rank 0 creates the run folder, saves the resolved configuration and the
/// split there, and opens the checkpointer (other ranks get `None`).
pub fn open_run_dir(comm: &Comm, plan: &RunPlan, inputs: &Inputs) -> Result<Option<Checkpointer>> {
    if !comm.is_root() {
        return Ok(None);
    }
    std::fs::create_dir_all(&plan.run_dir)
        .with_context(|| format!("creating {}", plan.run_dir.display()))?;
    crate::app::save_config(plan)?;
    if let Some((m, _)) = &inputs.split {
        m.save(&plan.run_dir.join("split.json"))?;
    }
    Ok(Some(Checkpointer::new(
        checkpoint::folder(&plan.run_dir),
        plan.checkpoint.keep_last as usize,
        plan.checkpoint.milestones.clone(),
    )?))
}

/// [`final_meta`] and how the epoch was chosen (`sfron.selected_by`: last,
/// val or test; a study's report names a model that the test set chose).
fn selected_meta(
    state: &RunState,
    model: &Model,
    step: u64,
    select: Select,
) -> BTreeMap<String, String> {
    let mut m = final_meta(state, model, step);
    m.insert(SELECTED_BY.into(), select.as_str().into());
    m
}

/// Metadata key of how `train` chose the kept epoch.
pub const SELECTED_BY: &str = "sfron.selected_by";

pub fn final_meta(state: &RunState, model: &Model, step: u64) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("sfron.arch".into(), model.arch.name());
    m.insert("sfron.command".into(), state.command.clone());
    m.insert("sfron.step".into(), step.to_string());
    m.insert("sfron.recipe".into(), state.recipe.clone());
    m.insert("sfron.split".into(), state.split.clone());
    m
}

fn fill_state(engine: &Engine, state: &mut RunState, cursor: Cursor) {
    state.cursors.insert("train".into(), cursor);
    state.optimizer_steps = engine.optimizer.steps();
    state.skips_total = engine.skips_total;
    state.skips_in_row = engine.skips_in_row;
}

/// Writes a checkpoint now and waits until it is complete on every rank.
fn finish_checkpoint(
    comm: &Comm,
    model: &Model,
    engine: &Engine,
    state: &mut RunState,
    cursor: Cursor,
    checkpoints: Option<&mut Checkpointer>,
) -> Result<()> {
    fill_state(engine, state, cursor);
    if let Some(c) = checkpoints {
        c.save(state.step, checkpoint_files(model, engine, state)?)?;
        if let Some(dir) = c.wait()? {
            tracing::info!(dir = %dir.display(), "checkpoint written");
        }
    }
    comm.barrier();
    Ok(())
}
