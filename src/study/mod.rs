//! `sfron study`: the whole comparison from one config (DESIGN §2, §4).
//!
//! ```text
//! <run folder>/original/              sfron train (all training data, run.seed),
//!                                     unless study.original names the weights
//! <run folder>/seed-S/split.json      sfron split --scenario <study.scenario> (seed S)
//! <run folder>/seed-S/retrain/        sfron train --on remain
//! <run folder>/seed-S/<method>/       sfron unlearn --method <method> --from original
//! <run folder>/seed-S/eval/<name>/    sfron eval (methods and the original against Retrain)
//! <run folder>/report.{json,md}, plots/*.svg
//! ```
//!
//! Every stage is the ordinary command with `--set`s over the study's
//! config, so any stage can be rerun by hand. A stage records its key in
//! `stage.json` (the run's recipe hash, which covers the config, the data,
//! the split and the weights it starts from; for evaluations the digests of
//! the weights compared) and, when done, the SHA-256 of its outputs. A rerun
//! skips a stage whose key and outputs match, resumes one that was
//! interrupted (exit 75 from SIGTERM/SIGUSR1 ends the study the same way),
//! and starts over a stage whose key changed.

mod generation;
mod plots;
mod population;
mod population_report;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::comm::Comm;
use crate::config::{self, Layers, RunPlan};
use crate::data::{Manifest, Part, Scenario};
use crate::eval::{self, Evaluation, Examples};
use crate::fsx::{sha256_hex, write_atomic};
use crate::inputs::Inputs;
use crate::model::weights;
use crate::rundir::{self, Faults, MODEL_FILE, RunLock, Status};
use crate::train;
use crate::unlearn;
pub use population::half as membership_half;
pub use report::{Row, Summary};

const STAGE_FILE: &str = "stage.json";

/// What a stage folder records about itself.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StageRecord {
    key: String,
    done: bool,
    /// Output file → SHA-256 of its bytes.
    outputs: BTreeMap<String, String>,
}

/// One evaluated model of one seed (rank 0).
pub struct Evaluated {
    pub name: String,
    pub evaluation: Evaluation,
    pub examples: Option<Examples>,
}

pub fn run(comm: &Comm, plan: &RunPlan, layers: &Layers, device: Device) -> Result<Status> {
    if plan.data.split.is_some() {
        bail!(
            "data.split is set, but a study makes its own splits (study.scenario): remove data.split"
        );
    }
    if plan.study.population > 0 {
        return population::run(comm, plan, layers, device);
    }
    let root = plan.run_dir.clone();
    let study = &plan.study;
    tracing::info!(study = %root.display(), scenario = %study.scenario, seeds = ?study.seeds,
        methods = ?study.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(), "study");

    let denoiser = plan.model.arch.task() == crate::model::Task::Denoise;
    if denoiser
        && let Some(m) = study
            .methods
            .iter()
            .find(|m| !unlearn::DENOISER_METHODS.contains(m))
    {
        bail!(
            "study.methods lists {:?}, which works on a classifier's logits; a study of a \
             diffusion model ({}) compares {}",
            m.as_str(),
            plan.model.arch.name(),
            unlearn::DENOISER_METHODS
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let original = if study.original.is_empty() {
        let original_plan = stage_plan(comm, layers, &root, "original", &["train.on=all".into()])?;
        if train_stage(comm, &original_plan, device)? == Status::Preempted {
            return Ok(Status::Preempted);
        }
        original_plan.run_dir.join(MODEL_FILE)
    } else {
        let given = PathBuf::from(&study.original);
        if !given.is_file() {
            bail!("{} (study.original): no such weights file", given.display());
        }
        given
    };

    // What every unlearning stage's key starts from.
    // The methods start from the model the study judges as the original: a
    // diffusion model's EMA when it is the one sampled (`sample.weights =
    // "ema"`). A short training's raw weights generate far worse than its
    // EMA (the release's 800,000 steps make the two alike).
    let start = denoiser
        .then(|| crate::sample::ema_beside(&original, plan.sample.weights))
        .flatten()
        .unwrap_or_else(|| original.clone());
    let original_id = weights::identify(&weights::read(&start)?, &start)?;

    let mut per_seed: Vec<(u64, Vec<Evaluated>)> = Vec::new();
    let mut judged_per_seed = Vec::new();
    for &seed in &study.seeds {
        let seed_root = root.join(format!("seed-{seed}"));
        let split = seed_root.join("split.json");
        make_split(comm, plan, layers, &seed_root, seed, &split)?;
        let common = vec![
            format!("run.seed={seed}"),
            format!("data.split={}", split.display()),
        ];
        let with = |extra: &[String]| [common.clone(), extra.to_vec()].concat();

        let retrain_plan = stage_plan(
            comm,
            layers,
            &seed_root,
            "retrain",
            &with(&["train.on=remain".into()]),
        )?;
        if train_stage(comm, &retrain_plan, device)? == Status::Preempted {
            return Ok(Status::Preempted);
        }
        let retrain = retrain_plan.run_dir.join(MODEL_FILE);

        let mut models: Vec<(String, PathBuf)> = vec![
            ("original".into(), original.clone()),
            ("retrain".into(), retrain.clone()),
        ];
        for method in &study.methods {
            let sets = with(&[
                format!("unlearn.method={}", method.as_str()),
                format!("unlearn.from={}", start.display()),
                // The evaluation stage measures; the run need not.
                "unlearn.eval_before=false".into(),
                "unlearn.eval_after=false".into(),
            ]);
            let p = stage_plan(comm, layers, &seed_root, method.as_str(), &sets)?;
            if unlearn_stage(comm, &p, device, &original_id)? == Status::Preempted {
                return Ok(Status::Preempted);
            }
            models.push((method.as_str().into(), p.run_dir.join(MODEL_FILE)));
        }

        if denoiser {
            let judged =
                generation::judge_seed(comm, plan, layers, &seed_root, &common, device, &models)?;
            if let Some((judged, path)) = judged {
                judged_per_seed.push((seed, judged, path));
            }
            continue;
        }

        // Retrain first: it is the reference of the others (its gaps are 0
        // by definition), and its metrics are computed once.
        models.swap(0, 1);
        let mut evaluated: Vec<Evaluated> = Vec::new();
        let mut retrain_metrics = None;
        for (name, model) in &models {
            let reference = (name != "retrain").then(|| eval::Reference {
                path: retrain.as_path(),
                metrics: retrain_metrics.clone(),
            });
            let p = stage_plan(comm, layers, &seed_root.join("eval"), name, &common)?;
            let done = eval_stage(comm, &p, device, model, reference)?;
            // Every rank needs Retrain's metrics to know what to skip.
            let mut bytes = done
                .as_ref()
                .map(|e| serde_json::to_vec(&e.0.metrics))
                .transpose()?
                .unwrap_or_default();
            if name == "retrain" {
                comm.broadcast_bytes(&mut bytes, 0);
                retrain_metrics = Some(serde_json::from_slice(&bytes)?);
            }
            if let Some(e) = done {
                evaluated.push(Evaluated {
                    name: name.clone(),
                    evaluation: e.0,
                    examples: Some(e.1),
                });
            }
        }
        // The report's order: original, Retrain, the methods.
        if evaluated.len() > 1 {
            evaluated.swap(0, 1);
        }
        per_seed.push((seed, evaluated));
    }

    if denoiser {
        if comm.is_root() {
            let table = generation::write(&root, plan, &judged_per_seed)?;
            print!("{table}");
            println!("report: {}", root.join("report.md").display());
        }
        comm.barrier();
        return Ok(Status::Done);
    }
    if comm.is_root() {
        let mut notes = Vec::new();
        let mut chosen_by_test = vec![(String::from("the original"), original.clone())];
        for &seed in &study.seeds {
            let retrain = root.join(format!("seed-{seed}/retrain/{MODEL_FILE}"));
            chosen_by_test.push((format!("Retrain (seed {seed})"), retrain));
        }
        for (what, path) in chosen_by_test {
            let (_, meta) = weights::load(&path)?;
            if meta.get(rundir::SELECTED_BY).map(String::as_str) == Some("test") {
                notes.push(format!(
                    "{what} ({}) kept the epoch of its best test accuracy \
                     (train.select = \"test\", as the released code does): its TA, and the \
                     gaps measured against it, are biased by that choice.",
                    path.display()
                ));
            }
        }
        let summary = report::write(&root, plan, &per_seed, &notes)?;
        print!("{}", summary.table);
        println!("report: {}", root.join("report.md").display());
    }
    comm.barrier();
    Ok(Status::Done)
}

/// The plan of one stage: the study's layers plus `run.root`, `run.name`
/// and `sets`.
fn stage_plan(
    comm: &Comm,
    layers: &Layers,
    root: &Path,
    name: &str,
    sets: &[String],
) -> Result<RunPlan> {
    let mut l = layers.clone();
    l.sets.push(format!("run.root={}", root.display()));
    l.sets.push(format!("run.name={name}"));
    l.sets.extend(sets.iter().cloned());
    let loaded = config::load(&l)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Ok(RunPlan::new(loaded, comm.topology(), cores)?)
}

/// Rank 0 writes the seed's split unless the same one is already there.
fn make_split(
    comm: &Comm,
    plan: &RunPlan,
    layers: &Layers,
    seed_root: &Path,
    seed: u64,
    out: &Path,
) -> Result<()> {
    if comm.is_root() {
        let p = stage_plan(
            comm,
            layers,
            seed_root,
            "split",
            &[format!("run.seed={seed}")],
        )?;
        let train = Inputs::open_part(&p, Part::Train)?;
        let scenario = Scenario::parse(&plan.study.scenario, seed)
            .with_context(|| "study.scenario".to_string())?;
        let manifest = Manifest::create(&train, scenario)?;
        let same = Manifest::load(out).is_ok_and(|old| old == manifest);
        if !same {
            std::fs::create_dir_all(seed_root)
                .with_context(|| format!("creating {}", seed_root.display()))?;
            manifest.save(out)?;
            tracing::info!(path = %out.display(), forget = manifest.forget.len(), "wrote the split");
        }
    }
    comm.barrier();
    Ok(())
}

fn train_stage(comm: &Comm, plan: &RunPlan, device: Device) -> Result<Status> {
    let inputs = Inputs::open(plan)?;
    let command = if plan.train.on_remain {
        "retrain"
    } else {
        "train"
    };
    let key = format!("{command}:{}", rundir::recipe_hash(plan, &inputs, command));
    let outputs = [MODEL_FILE, "train.json"];
    let (done, _lock) = begin(comm, &plan.run_dir, &key, &outputs)?;
    if done {
        return Ok(Status::Done);
    }
    let faults = Faults::default();
    let status = train::run(comm, plan, device, faults)?;
    if status == Status::Done {
        finish(comm, &plan.run_dir, &key, &outputs)?;
    }
    Ok(status)
}

/// `from_id`: the [`weights::identify`] of the original (`unlearn.from`).
fn unlearn_stage(comm: &Comm, plan: &RunPlan, device: Device, from_id: &str) -> Result<Status> {
    let inputs = Inputs::open(plan)?;
    let command = format!("unlearn:{}", plan.unlearn.method.as_str());
    let key = unlearn::recipe_hash(plan, &inputs, &command, from_id);
    let outputs = [MODEL_FILE, "unlearn.json"];
    let (done, _lock) = begin(comm, &plan.run_dir, &key, &outputs)?;
    if done {
        return Ok(Status::Done);
    }
    let args = crate::cli::UnlearnArgs::default();
    let status = unlearn::run(comm, plan, device, &args)?;
    if status == Status::Done {
        finish(comm, &plan.run_dir, &key, &outputs)?;
    }
    Ok(status)
}

/// Evaluates `model` (against `reference`), or reads a matching earlier
/// evaluation; rank 0 gets it with its examples.
fn eval_stage(
    comm: &Comm,
    plan: &RunPlan,
    device: Device,
    model: &Path,
    reference: Option<eval::Reference>,
) -> Result<Option<(Evaluation, Examples)>> {
    let digest = |p: &Path| weights::identify(&weights::read(p)?, p);
    let inputs = Inputs::open(plan)?;
    let key = format!(
        "eval:sha256:{}",
        sha256_hex(
            serde_json::json!({
                "model": digest(model)?,
                "reference": reference.as_ref().map(|r| digest(r.path)).transpose()?,
                "split": inputs.split_hash(),
                "data": inputs.identity(plan),
                "test_transform": format!("{:?}", plan.data.test_transform),
                "arch": plan.model.arch.name(),
                "eval": plan.eval,
                // Version 2 of examples.safetensors: margin, predicted class, excluded rows.
                "examples": 2,
            })
            .to_string()
            .as_bytes()
        )
    );
    // The examples' files (one, or its shards) are recorded by `finish`.
    let (done, _lock) = begin(comm, &plan.run_dir, &key, &[eval::EVAL_FILE])?;
    if done {
        if !comm.is_root() {
            return Ok(None);
        }
        let path = plan.run_dir.join(eval::EVAL_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let evaluation: Evaluation = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an evaluation", path.display()))?;
        let examples = Examples::load_dir(&plan.run_dir)?;
        return Ok(Some((evaluation, examples)));
    }
    let done = eval::evaluate_files(comm, plan, device, model, reference)?;
    let mut outputs = vec![eval::EVAL_FILE.to_string()];
    outputs.extend(eval::examples_files(&plan.run_dir));
    let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    finish(comm, &plan.run_dir, &key, &outputs)?;
    Ok(done)
}

/// Locks the stage's folder for as long as the returned lock lives, then
/// says whether the stage in `dir` is done under `key` with its outputs
/// intact (rank 0 decides, every rank learns it). When it is not, a folder
/// that another key left is cleared and `key` is recorded as started.
fn begin(comm: &Comm, dir: &Path, key: &str, outputs: &[&str]) -> Result<(bool, RunLock)> {
    let lock = RunLock::acquire(comm, dir, "sfron study (a stage)")?;
    let mut verdict = [0u8];
    if comm.is_root() {
        let record = read_record(dir);
        // The named outputs are recorded, and every recorded output (an
        // evaluation's example shards too) is as recorded.
        let intact = |r: &StageRecord| {
            outputs.iter().all(|o| r.outputs.contains_key(*o))
                && r.outputs.iter().all(|(o, digest)| {
                    std::fs::read(dir.join(o)).is_ok_and(|b| &sha256_hex(&b) == digest)
                })
        };
        match &record {
            Some(r) if r.key == key && r.done && intact(r) => verdict[0] = 1,
            Some(r) if r.key != key => {
                tracing::info!(stage = %dir.display(), "the stage's inputs changed: starting it over");
                rundir::clear(dir).with_context(|| format!("clearing {}", dir.display()))?;
            }
            _ => {}
        }
        if verdict[0] == 0 {
            write_record(
                dir,
                &StageRecord {
                    key: key.into(),
                    ..StageRecord::default()
                },
            )?;
        }
    }
    comm.broadcast(&mut verdict, 0);
    if verdict[0] == 1 {
        tracing::info!(stage = %dir.display(), "reused");
    }
    Ok((verdict[0] == 1, lock))
}

/// Rank 0 records the stage as done with its outputs' digests.
fn finish(comm: &Comm, dir: &Path, key: &str, outputs: &[&str]) -> Result<()> {
    if comm.is_root() {
        let mut record = StageRecord {
            key: key.into(),
            done: true,
            outputs: BTreeMap::new(),
        };
        for o in outputs {
            let path = dir.join(o);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            record.outputs.insert((*o).into(), sha256_hex(&bytes));
        }
        write_record(dir, &record)?;
    }
    comm.barrier();
    Ok(())
}

fn read_record(dir: &Path) -> Option<StageRecord> {
    let text = std::fs::read_to_string(dir.join(STAGE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(dir: &Path, record: &StageRecord) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(STAGE_FILE);
    write_atomic(&path, serde_json::to_string_pretty(record)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The methods' display names, in the report's order.
pub fn display_name(name: &str) -> &str {
    match name {
        "original" => "Original",
        "retrain" => "Retrain",
        "sfron" => "SFR-on",
        "sfron_r" => "SFR-on: R",
        "sfron_r_on" => "SFR-on: R+on",
        "sfron_f_r_on" => "SFR-on: F+R+on",
        "sfron_joint" => "SFR-on: joint",
        "ft" => "FT",
        "ga" => "GA",
        "rl" => "RL",
        "salun" => "SalUn",
        "bad_teacher" => "Bad Teacher",
        "scrub" => "SCRUB",
        "l1_sparse" => "ℓ1-sparse",
        "sa" => "SA",
        other => other,
    }
}
