//! What a run folder is, below every command that writes one: its files
//! ([`MODEL_FILE`], [`STATE_FILE`], `config.toml`, `split.json`, the
//! checkpoints), how a run ended ([`Status`]), the state a checkpoint holds
//! besides tensors ([`RunState`]), the hash of what determines a run's
//! result ([`recipe_hash`]), restoring and writing checkpoints, the
//! test-only fault injections ([`Faults`]), and the folder's exclusive
//! lock ([`lock`]). `train`, `unlearn`, `eval` and `study` import this;
//! it imports none of them.

pub mod lock;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::Tensor;

use crate::cli::FaultArgs;
use crate::comm::Comm;
use crate::config::RunPlan;
use crate::data::Cursor;
use crate::engine::Engine;
use crate::engine::checkpoint::{self, Checkpointer, Restored};
use crate::engine::ema::{EMA_FILE, Ema};
use crate::fsx::{self, sha256_hex};
use crate::inputs::Inputs;
use crate::model::{Model, weights};
pub use lock::{Claim, LOCK_FILE, RunLock, clear, hostname};

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
    if plan.model.replace_head {
        recipe["model"]["replace_head"] = json!(true);
    }
    if plan.model.arch.task() == crate::model::Task::Denoise {
        recipe["diffusion"] = json!(plan.diffusion);
    }
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

/// The bytes of a checkpoint: the model, the run state with optimizer
/// buffers, and the EMA weights of a model that keeps them.
pub fn checkpoint_files(
    model: &Model,
    engine: &Engine,
    state: &RunState,
    ema: Option<&Ema>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut meta = BTreeMap::new();
    meta.insert("sfron.arch".to_string(), model.arch.name());
    meta.insert("sfron.step".to_string(), state.step.to_string());
    let model_bytes = weights::to_bytes(&model.state(), &meta).map_err(anyhow::Error::msg)?;
    let (tensors, _) = engine.optimizer.state(&engine.names);
    let mut smeta = BTreeMap::new();
    smeta.insert(STATE_KEY.to_string(), serde_json::to_string(state)?);
    let state_bytes = weights::to_bytes(&tensors, &smeta).map_err(anyhow::Error::msg)?;
    let mut files = vec![
        (MODEL_FILE.to_string(), model_bytes),
        (STATE_FILE.to_string(), state_bytes),
    ];
    if let Some(ema) = ema {
        meta.insert(EMA_DECAY.to_string(), ema.decay().to_string());
        let bytes = weights::to_bytes(&ema.state(model), &meta).map_err(anyhow::Error::msg)?;
        files.push((EMA_FILE.to_string(), bytes));
    }
    Ok(files)
}

/// Metadata key of an EMA file's decay.
pub const EMA_DECAY: &str = "sfron.ema_decay";

/// The EMA of a model that keeps one (a denoiser, at `decay > 0`:
/// `diffusion.ema_decay` in training, `diffusion.unlearn_ema_decay` in
/// unlearning), starting at its current weights, or at the averages of
/// `start`: `(path named in errors, the bytes of an [`EMA_FILE`])`, a
/// checkpoint's when resuming, the original's when unlearning.
pub fn ema_for(model: &Model, decay: f64, start: Option<(&Path, &[u8])>) -> Result<Option<Ema>> {
    if model.task() != crate::model::Task::Denoise || decay <= 0.0 {
        return Ok(None);
    }
    let mut ema = Ema::new(decay, model);
    if let Some((where_, bytes)) = start {
        let (tensors, _) =
            weights::from_bytes(bytes).map_err(|e| anyhow::anyhow!("{}: {e}", where_.display()))?;
        ema.restore(&tensors.into_iter().collect())
            .map_err(|e| anyhow::anyhow!("{}: {e}", where_.display()))?;
    }
    Ok(Some(ema))
}

/// A checkpoint's [`EMA_FILE`], as [`ema_for`] takes it.
pub fn checkpoint_ema(restored: &Restored) -> Result<(PathBuf, &[u8])> {
    Ok((restored.dir.join(EMA_FILE), restored.file(EMA_FILE)?))
}

/// Rank 0 creates the run folder, saves the resolved configuration and the
/// split there, and opens the checkpointer (other ranks get `None`).
pub fn open_run_dir(comm: &Comm, plan: &RunPlan, inputs: &Inputs) -> Result<Option<Checkpointer>> {
    if !comm.is_root() {
        return Ok(None);
    }
    std::fs::create_dir_all(&plan.run_dir)
        .with_context(|| format!("creating {}", plan.run_dir.display()))?;
    save_config(plan)?;
    if let Some((m, _)) = &inputs.split {
        m.save(&plan.run_dir.join("split.json"))?;
    }
    Ok(Some(Checkpointer::new(
        checkpoint::folder(&plan.run_dir),
        plan.checkpoint.keep_last as usize,
        plan.checkpoint.milestones.clone(),
    )?))
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

/// Saves the resolved configuration as `config.toml` in the run folder
/// (rank 0's job; it loads back with `--config`).
pub fn save_config(plan: &RunPlan) -> Result<()> {
    let resolved = plan.config.resolved_toml();
    let config_path = plan.run_dir.join("config.toml");
    fsx::write_atomic(&config_path, resolved.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))
}
