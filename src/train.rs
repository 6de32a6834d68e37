//! `sfron train`: the original model on the whole training set, or Retrain on
//! the remain set of a split; data-parallel, resumable, exact.
//!
//! Every rank runs the same loop; the sampler gives each its share of the
//! global batch, the engine reduces and steps (see [`crate::engine`]), rank 0
//! records metrics and writes checkpoints in the background. A stop request
//! (SIGTERM/SIGUSR1) is agreed in the step's reduction, so every rank stops
//! after the same step; rank 0 checkpoints and all exit with the resumable code.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tch::{Device, Tensor};

use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::Select;
use crate::data::{BatchStream, Cursor, Sampler, Stream};
use crate::diffusion::draws::Purpose;
use crate::engine::checkpoint::Checkpointer;
use crate::engine::ema::{EMA_FILE, Ema};
use crate::engine::progress::Progress;
use crate::engine::signals::StopFlag;
use crate::engine::{Edit, Engine, Optimizer, Scale, Window, schedule};
use crate::eval;
use crate::inputs::Inputs;
use crate::model::{Model, Task, weights};
use crate::rng::{Rng, tag};
use crate::rundir::{
    EMA_DECAY, Faults, MODEL_FILE, RunState, SELECTED_BY, STATE_FILE, Status, checkpoint_ema,
    checkpoint_files, ema_for, final_meta, load_checkpoint, open_run_dir, recipe_hash,
    restore_everywhere,
};
use crate::task::TaskLoss;

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
        inputs.trainable()
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
    match &plan.model.init {
        Some(init) if plan.model.replace_head => model.load_replacing_head(init)?,
        Some(init) => model.load(init)?,
        None => {}
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
    let restored = restore_everywhere(comm, plan)?;
    if let Some(restored) = &restored {
        let (saved, tensors) = load_checkpoint(restored, &model, &recipe, &split, command)?;
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
    let decay = plan.diffusion.ema_decay;
    let keeps_ema = model.task() == Task::Denoise && decay > 0.0;
    let start = match &restored {
        Some(r) if keeps_ema => Some(checkpoint_ema(r)?),
        _ => None,
    };
    let start = start.as_ref().map(|(p, b)| (p.as_path(), *b));
    let mut ema = ema_for(&model, decay, start)?;
    drop(restored);
    let task_loss = TaskLoss::new(plan, &model, device);
    let task = task_loss.task();

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
        let global = stream.next_global();
        let batch = stream.next_batch()?;
        engine.zero_grad();
        let key = (Purpose::Train, step);
        let local = task_loss.backward_sum(&mut engine, &model, &batch, &global, key, true);
        faults.before_reduce(comm.rank(), step, &engine);
        let lr = schedule::rate(&t.schedule, t.lr, step, total, t.warmup_steps, per_epoch);
        let mut out = engine.reduce(local, Scale::MeanOverCount)?;
        let what = format!("step {step}");
        let edit = Edit {
            clip: t.clip,
            ..Edit::default()
        };
        if let Err(e) = engine.finish(&mut out, &edit, lr, &what) {
            // Weights and optimizer are the last good step's: keep them.
            state.step = step;
            finish_checkpoint(
                comm,
                (&model, &engine, ema.as_ref()),
                &mut state,
                stream.cursor(),
                checkpoints.as_mut(),
            )?;
            return Err(e);
        }
        step += 1;
        faults.after_step(comm.rank(), step - 1, &engine.params);
        if let Some(ema) = ema.as_mut()
            && out.applied
        {
            ema.update(&engine.params);
        }
        let dt = t0.elapsed().as_secs_f64();
        window.1.add(&out);
        if step.is_multiple_of(t.log_every) || step == end {
            let secs = window.0.elapsed().as_secs_f64();
            let w = &window.1;
            let (loss, acc) = (w.loss().unwrap_or(0.0), w.acc().unwrap_or(0.0));
            let images_per_s = w.count / secs.max(1e-9);
            let mut rec = json!({
                "event": "step", "step": step, "epoch": (step - 1) / per_epoch, "lr": lr,
                "loss": loss, "images_per_s": images_per_s, "step_ms": 1e3 * dt,
                "grad_norm": w.grad_norm().unwrap_or(0.0),
                "skipped": engine.skips_total,
            });
            let shown = match task {
                Task::Classify => {
                    rec["acc"] = json!(acc);
                    format!("loss {loss:.4} acc {acc:.2}% lr {lr:.4} {images_per_s:.0} img/s")
                }
                Task::Denoise => format!("loss {loss:.4} lr {lr:.6} {images_per_s:.0} img/s"),
            };
            progress.show(step, &shown);
            progress.record(rec)?;
            window = (Instant::now(), Window::default());
        }
        if t.verify_every > 0 && step.is_multiple_of(t.verify_every) {
            engine.verify_identical(&what)?;
        }
        let epoch_end = step.is_multiple_of(per_epoch);
        let epoch = step.div_ceil(per_epoch);
        // Choosing an epoch (train.select) needs every epoch's score.
        // A denoiser has no accuracy: its loss is logged above.
        let eval_now = task == Task::Classify
            && (step == end
                || (epoch_end
                    && (t.select != Select::Last
                        || (t.eval_every > 0 && epoch.is_multiple_of(t.eval_every as u64)))));
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
                    (&model, &engine, ema.as_ref()),
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
                c.save(
                    step,
                    checkpoint_files(&model, &engine, &state, ema.as_ref())?,
                )?;
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
        if let Some(ema) = &ema {
            let mut meta = final_meta(&state, &model, step);
            meta.insert(EMA_DECAY.into(), ema.decay().to_string());
            weights::save(&plan.run_dir.join(EMA_FILE), &ema.state(&model), &meta)?;
        }
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

fn fill_state(engine: &Engine, state: &mut RunState, cursor: Cursor) {
    state.cursors.insert("train".into(), cursor);
    state.optimizer_steps = engine.optimizer.steps();
    state.skips_total = engine.skips_total;
    state.skips_in_row = engine.skips_in_row;
}

/// Writes a checkpoint now and waits until it is complete on every rank.
fn finish_checkpoint(
    comm: &Comm,
    (model, engine, ema): (&Model, &Engine, Option<&Ema>),
    state: &mut RunState,
    cursor: Cursor,
    checkpoints: Option<&mut Checkpointer>,
) -> Result<()> {
    fill_state(engine, state, cursor);
    if let Some(c) = checkpoints {
        c.save(state.step, checkpoint_files(model, engine, state, ema)?)?;
        if let Some(dir) = c.wait()? {
            tracing::info!(dir = %dir.display(), "checkpoint written");
        }
    }
    comm.barrier();
    Ok(())
}
