//! `sfron study` with `study.population = N` (DESIGN §2.1): a population of
//! originals, oracles and unlearnings, judged by distributions over models
//! (KLoM, U-LiRA, the NeurIPS 2023 challenge score), as one distributed job.
//!
//! ```text
//! <run folder>/population.json        the recipe the items were made with
//! <run folder>/split.json             the forget set (study.scenario, seed study.seeds[0])
//! <run folder>/membership.safetensors study.subsample: `member` u8 [N, training samples]
//! <run folder>/model-K/split.json     study.subsample: the forget set ∩ model K's half, the rest excluded
//! <run folder>/model-K/original/      sfron train, seed run.seed + K
//! <run folder>/model-K/retrain/       sfron train --on remain, seed run.seed + K
//! <run folder>/model-K/<method>/      sfron unlearn from model K's original, seed run.seed + K
//! <run folder>/model-K/eval/<name>/   sfron eval: retrain alone, original and methods against it
//! <run folder>/queue/<item>/          the item's claim (a lock) and its `done` mark
//! <run folder>/report.{json,md}, plots/, per_example.safetensors (KLoM and ε per example)
//! ```
//!
//! The work items are "original K", "retrain K" (with its evaluation),
//! "judge K" (the original's evaluation against retrain K) and "M K" (method
//! M from original K, with its evaluation); the last two wait for the first
//! two. The job splits into groups of `comm.group_size` ranks
//! ([`Comm::split_groups`]); each group's leader claims the first item
//! whose inputs are done and that no one holds (a lock in `queue/<item>/`,
//! released by the kernel when a process dies), the group runs it
//! data-parallel on its own communicator with the ordinary stages of
//! [`super`], and the leader marks it done. A model's seed comes from the
//! model's number, never from the group, so an item's result does not
//! depend on which group ran it or how large the group was (beyond the
//! summation order of a data-parallel step). Items marked done are skipped
//! on a rerun; an interrupted item resumes from its checkpoint (its stage
//! records it). Several jobs may work on one folder at once (a SLURM array
//! with `study.only = K`): the claims keep them apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tch::{Device, Tensor};

use super::{eval_stage, stage_plan, train_stage, unlearn_stage};
use crate::comm::Comm;
use crate::config::raw::UnlearnMethod;
use crate::config::{Layers, RunPlan};
use crate::data::{Manifest, Part, Scenario};
use crate::engine::signals::StopFlag;
use crate::eval::{self, Evaluation};
use crate::fsx::write_atomic;
use crate::inputs::Inputs;
use crate::model::weights;
use crate::rng::{Rng, tag};
use crate::rundir::{Claim, MODEL_FILE, Status};

pub const RECORD_FILE: &str = "population.json";
pub const MEMBERSHIP_FILE: &str = "membership.safetensors";
const DONE_FILE: &str = "done";
/// How often an idle group leader looks for claimable items.
const POLL: Duration = Duration::from_millis(200);

/// What one work item does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Original,
    Retrain,
    /// The original's evaluation against Retrain.
    Judge,
    Unlearn(UnlearnMethod),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    model: u32,
    work: Work,
}

impl Item {
    fn name(&self) -> String {
        let work = match self.work {
            Work::Original => "original",
            Work::Retrain => "retrain",
            Work::Judge => "judge",
            Work::Unlearn(m) => m.as_str(),
        };
        format!("model-{}-{work}", self.model)
    }

    /// The items whose outputs this one reads.
    fn needs(&self) -> Vec<Item> {
        match self.work {
            Work::Original | Work::Retrain => Vec::new(),
            Work::Judge | Work::Unlearn(_) => [Work::Original, Work::Retrain]
                .map(|work| Item {
                    model: self.model,
                    work,
                })
                .to_vec(),
        }
    }
}

/// The study's fixed facts, the same on every rank.
struct Population<'a> {
    root: PathBuf,
    plan: &'a RunPlan,
    layers: &'a Layers,
    /// The forget set of every model (`split.json`).
    split: PathBuf,
}

impl Population<'_> {
    fn model_dir(&self, k: u32) -> PathBuf {
        self.root.join(format!("model-{k}"))
    }

    /// Model k's split: its own with study.subsample, else the common one.
    fn split_of(&self, k: u32) -> PathBuf {
        if self.plan.study.subsample {
            self.model_dir(k).join("split.json")
        } else {
            self.split.clone()
        }
    }

    /// Model k's seed: run.seed + k, whatever group trains it.
    fn seed(&self, k: u32) -> u64 {
        self.plan.seed + u64::from(k)
    }

    fn queue_dir(&self, item: &Item) -> PathBuf {
        self.root.join("queue").join(item.name())
    }

    fn is_done(&self, item: &Item) -> bool {
        self.queue_dir(item).join(DONE_FILE).is_file()
    }

    /// Every item of the job, inputs first.
    fn items(&self) -> Vec<Item> {
        let study = &self.plan.study;
        let models: Vec<u32> = if study.only >= 0 {
            vec![study.only as u32]
        } else {
            (0..study.population).collect()
        };
        let mut items = Vec::new();
        for &model in &models {
            for work in [Work::Original, Work::Retrain] {
                items.push(Item { model, work });
            }
        }
        for &model in &models {
            items.push(Item {
                model,
                work: Work::Judge,
            });
            for &m in &study.methods {
                items.push(Item {
                    model,
                    work: Work::Unlearn(m),
                });
            }
        }
        items
    }
}

pub fn run(world: &Comm, plan: &RunPlan, layers: &Layers, device: Device) -> Result<Status> {
    let study = &plan.study;
    if plan.model.arch.task() == crate::model::Task::Denoise {
        bail!(
            "study.population judges classifiers by their margins; {} is a diffusion model",
            plan.model.arch.name()
        );
    }
    if study.seeds.len() != 1 {
        bail!(
            "a population study has one forget set: study.seeds = [S] (it lists {:?})",
            study.seeds
        );
    }
    let group_size = match plan.comm.group_size as usize {
        0 => world.size(),
        g => g,
    };
    let population = Population {
        root: plan.run_dir.clone(),
        plan,
        layers,
        split: plan.run_dir.join("split.json"),
    };
    tracing::info!(study = %population.root.display(), models = study.population,
        subsample = study.subsample, groups = world.size() / group_size, group_size,
        methods = ?study.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(), "population study");
    prepare(world, &population)?;

    let group = world.split_groups(group_size)?;
    let stop = StopFlag::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let status = work_through(&group.comm, &population, device, &stop)?;
    drop(group);
    world.barrier();
    if world.all_agree(status == Status::Done) {
        if study.only < 0 && world.is_root() {
            let table = super::population_report::write(
                &population.root,
                plan,
                &population.split,
                population
                    .plan
                    .study
                    .subsample
                    .then(|| population.root.join(MEMBERSHIP_FILE)),
            )?;
            print!("{table}");
            println!("report: {}", population.root.join("report.md").display());
        }
        world.barrier();
        Ok(Status::Done)
    } else {
        Ok(Status::Preempted)
    }
}

/// Rank 0 refuses a folder made with another recipe, then writes the
/// record, the split and (study.subsample) the membership table and the
/// models' splits, unless the same ones are there.
fn prepare(world: &Comm, p: &Population) -> Result<()> {
    let mut refused = Vec::new();
    if world.is_root() {
        let recipe = recipe(p.plan)?;
        let record = p.root.join(RECORD_FILE);
        let outcome = match std::fs::read_to_string(&record) {
            Ok(text) => {
                let old: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a population record", record.display()))?;
                let mut differences = Vec::new();
                diff("", &old["recipe"], &recipe, &mut differences);
                if differences.is_empty() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "{} holds a population made with another recipe ({}); its items \
                         cannot be mixed with this one's: give this study another run.name, \
                         or remove the folder",
                        p.root.display(),
                        differences.join("; ")
                    ))
                }
            }
            Err(_) => Ok(()),
        };
        match outcome {
            Ok(()) => write_inputs(p, &recipe)?,
            Err(e) => refused = format!("{e:#}").into_bytes(),
        }
    }
    world.broadcast_bytes(&mut refused, 0);
    if !refused.is_empty() {
        bail!("{}", String::from_utf8_lossy(&refused));
    }
    Ok(())
}

/// What a population's items depend on: the whole resolved config but the
/// keys that only place or schedule the job (run.root, run.name, log, comm,
/// device.threads, data.workers) or choose which items it runs
/// (study.population, study.only, study.methods: a population may grow, or
/// gain a method, with the items it has).
fn recipe(plan: &RunPlan) -> Result<serde_json::Value> {
    let mut raw = serde_json::to_value(&plan.config.raw)?;
    for (section, key) in [
        ("run", Some("root")),
        ("run", Some("name")),
        ("log", None),
        ("comm", None),
        ("device", Some("threads")),
        ("data", Some("workers")),
        ("study", Some("population")),
        ("study", Some("only")),
        ("study", Some("methods")),
    ] {
        match key {
            None => {
                raw.as_object_mut().map(|o| o.remove(section));
            }
            Some(k) => {
                if let Some(o) = raw.get_mut(section).and_then(|s| s.as_object_mut()) {
                    o.remove(k);
                }
            }
        }
    }
    Ok(raw)
}

/// The keys whose values differ between two config trees, as
/// `key: old → new`.
fn diff(at: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    match (old, new) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let key = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                let none = serde_json::Value::Null;
                diff(
                    &key,
                    a.get(k).unwrap_or(&none),
                    b.get(k).unwrap_or(&none),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{at}: {a} then, {b} now")),
        _ => {}
    }
}

fn write_inputs(p: &Population, recipe: &serde_json::Value) -> Result<()> {
    let plan = p.plan;
    std::fs::create_dir_all(&p.root).with_context(|| format!("creating {}", p.root.display()))?;
    let record = p.root.join(RECORD_FILE);
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "version": 1,
        "recipe": recipe,
    }))?;
    if std::fs::read_to_string(&record).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&record, text.as_bytes())
            .with_context(|| format!("writing {}", record.display()))?;
    }
    let train = Inputs::open_part(plan, Part::Train)?;
    let seed = plan.study.seeds[0];
    let scenario = Scenario::parse(&plan.study.scenario, seed).context("study.scenario")?;
    let manifest = Manifest::create(&train, scenario)?;
    save_if_changed(&manifest, &p.split)?;
    if !plan.study.subsample {
        return Ok(());
    }
    let n = train.len();
    let mut table = vec![0u8; plan.study.population as usize * n];
    for k in 0..plan.study.population {
        let keep = half(plan.seed, k, n);
        for (i, &kept) in keep.iter().enumerate() {
            table[k as usize * n + i] = u8::from(kept);
        }
        let restricted = manifest
            .restricted(&train, &keep)
            .with_context(|| format!("model {k}'s half of the training set"))?;
        save_if_changed(&restricted, &p.split_of(k))?;
    }
    let path = p.root.join(MEMBERSHIP_FILE);
    let tensors = vec![(
        "member".to_string(),
        Tensor::from_slice(&table).view([plan.study.population as i64, n as i64]),
    )];
    let mut meta = BTreeMap::new();
    meta.insert(
        "sfron.membership".into(),
        "member[k, i] = 1: model k's original learned training sample i".into(),
    );
    weights::save(&path, &tensors, &meta).with_context(|| format!("writing {}", path.display()))
}

/// The half of `n` training samples subsampled model `k` learns: the first
/// ⌊n/2⌋ of a shuffle keyed by `[run seed, MEMBERSHIP, k]`.
pub fn half(seed: u64, k: u32, n: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::keyed(&[seed, tag::MEMBERSHIP, u64::from(k)]).shuffle(&mut order);
    let mut keep = vec![false; n];
    for &i in &order[..n / 2] {
        keep[i] = true;
    }
    keep
}

fn save_if_changed(manifest: &Manifest, path: &Path) -> Result<()> {
    if Manifest::load(path).is_ok_and(|old| &old == manifest) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    manifest.save(path)?;
    Ok(())
}

/// The group's loop: its leader claims an item, the group runs it, until
/// every item is done (or a stop signal arrives).
fn work_through(group: &Comm, p: &Population, device: Device, stop: &StopFlag) -> Result<Status> {
    let items = p.items();
    // Time running items, looking for one, and waiting for other groups' inputs.
    let (mut busy, mut looking, mut waiting) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    loop {
        // The leader's choice: an item index, WAIT or FINISHED.
        const WAIT: i64 = -1;
        const FINISHED: i64 = -2;
        let mut choice = [WAIT];
        let mut claim = None;
        let looked = Instant::now();
        if group.is_root() {
            let mut pending = false;
            for (i, item) in items.iter().enumerate() {
                if p.is_done(item) {
                    continue;
                }
                pending = true;
                if !item.needs().iter().all(|n| p.is_done(n)) {
                    continue;
                }
                let Some(c) = Claim::take(&p.queue_dir(item), "sfron study (population item)")?
                else {
                    continue;
                };
                // Finished by another group between the look and the claim.
                if p.is_done(item) {
                    continue;
                }
                claim = Some(c);
                choice[0] = i as i64;
                break;
            }
            if !pending {
                choice[0] = FINISHED;
            }
            if stop.is_set() {
                choice[0] = FINISHED;
            }
        }
        group.broadcast(&mut choice, 0);
        match choice[0] {
            FINISHED => {
                looking += looked.elapsed();
                tracing::info!(
                    busy_s = busy.as_secs_f64(),
                    queue_s = looking.as_secs_f64(),
                    waiting_s = waiting.as_secs_f64(),
                    "the group's work is over"
                );
                return Ok(if stop.is_set() || !all_done(group, p, &items) {
                    Status::Preempted
                } else {
                    Status::Done
                });
            }
            WAIT => {
                looking += looked.elapsed();
                std::thread::sleep(POLL);
                waiting += POLL;
                continue;
            }
            _ => {}
        }
        looking += looked.elapsed();
        let item = items[choice[0] as usize];
        tracing::info!(item = %item.name(), "running");
        let started = Instant::now();
        let status = run_item(group, p, &item, device)?;
        busy += started.elapsed();
        if status == Status::Preempted {
            return Ok(Status::Preempted);
        }
        if group.is_root() {
            let mark = p.queue_dir(&item).join(DONE_FILE);
            write_atomic(&mark, b"done\n")
                .with_context(|| format!("writing {}", mark.display()))?;
        }
        group.barrier();
        drop(claim);
    }
}

/// Whether every item is marked done (the group agrees on rank 0's view).
fn all_done(group: &Comm, p: &Population, items: &[Item]) -> bool {
    let mut done = [u8::from(items.iter().all(|i| p.is_done(i)))];
    group.broadcast(&mut done, 0);
    done[0] == 1
}

/// Runs one item's stages on the group's communicator.
fn run_item(group: &Comm, p: &Population, item: &Item, device: Device) -> Result<Status> {
    let k = item.model;
    let dir = p.model_dir(k);
    let common = vec![
        format!("run.seed={}", p.seed(k)),
        format!("data.split={}", p.split_of(k).display()),
    ];
    let with = |extra: &[String]| [common.clone(), extra.to_vec()].concat();
    let original = dir.join("original").join(MODEL_FILE);
    let retrain = dir.join("retrain").join(MODEL_FILE);
    let eval_dir = dir.join("eval");
    let judge = |name: &str, model: &Path| -> Result<Status> {
        let plan = stage_plan(group, p.layers, &eval_dir, name, &common)?;
        let known = read_metrics(&eval_dir.join("retrain").join(eval::EVAL_FILE));
        let reference = eval::Reference {
            path: retrain.as_path(),
            metrics: known,
        };
        eval_stage(group, &plan, device, model, Some(reference))?;
        Ok(Status::Done)
    };
    match item.work {
        Work::Original => {
            let plan = stage_plan(
                group,
                p.layers,
                &dir,
                "original",
                &with(&["train.on=all".into()]),
            )?;
            train_stage(group, &plan, device)
        }
        Work::Retrain => {
            let plan = stage_plan(
                group,
                p.layers,
                &dir,
                "retrain",
                &with(&["train.on=remain".into()]),
            )?;
            if train_stage(group, &plan, device)? == Status::Preempted {
                return Ok(Status::Preempted);
            }
            let plan = stage_plan(group, p.layers, &eval_dir, "retrain", &common)?;
            eval_stage(group, &plan, device, &retrain, None)?;
            Ok(Status::Done)
        }
        Work::Judge => judge("original", &original),
        Work::Unlearn(m) => {
            let sets = with(&[
                format!("unlearn.method={}", m.as_str()),
                format!("unlearn.from={}", original.display()),
                "unlearn.eval_before=false".into(),
                "unlearn.eval_after=false".into(),
            ]);
            let plan = stage_plan(group, p.layers, &dir, m.as_str(), &sets)?;
            let from_id = weights::identify(&weights::read(&original)?, &original)?;
            if unlearn_stage(group, &plan, device, &from_id)? == Status::Preempted {
                return Ok(Status::Preempted);
            }
            judge(m.as_str(), &plan.run_dir.join(MODEL_FILE))
        }
    }
}

/// The metrics of an evaluation file, if it is one.
fn read_metrics(path: &Path) -> Option<eval::Metrics> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<Evaluation>(&text)
        .ok()
        .map(|e| e.metrics)
}
