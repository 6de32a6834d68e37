//! The study of a diffusion model (DESIGN §6): every model of a seed (the
//! original, Retrain, each method) is judged by `sfron eval` on generated
//! images ([`crate::eval::generation`]: forget accuracy, remaining-class
//! accuracy, FID), each SFR-on snapshot too (the forgetting's path), and
//! the report puts them side by side with Retrain.
//!
//! ```text
//! <seed>/eval/<name>/eval.json, grid.png          one per model
//! <seed>/eval/sfron-snapshots/iter-N/eval.json    one per SFR-on snapshot
//! report.{json,md}, plots/snapshots.svg
//! ```
//!
//! A model trained or unlearned by the study is sampled from its run
//! folder, so `sample.weights` picks its EMA or raw weights; the report says
//! which.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use tch::Device;

use super::report::{Stat, mean_std};
use super::{begin, display_name, finish, plots, stage_plan};
use crate::comm::Comm;
use crate::config::{Layers, RunPlan};
use crate::engine::ema::EMA_FILE;
use crate::eval::generation::{self, GRID_FILE, GenerationEval};
use crate::fsx::{sha256_hex, write_atomic};
use crate::inputs::Inputs;
use crate::model::weights;
use crate::rundir::{MODEL_FILE, Status};

/// One evaluated model of one seed (rank 0).
pub struct Judged {
    pub name: String,
    pub eval: GenerationEval,
    /// The stage folder (its grid).
    pub dir: PathBuf,
    /// Iterations (or training steps) and seconds of the run that made it.
    pub cost: Option<(u64, f64)>,
}

/// The suffix of a model's name for the judgement of its raw weights
/// (`study.judge_raw`).
pub const RAW_SUFFIX: &str = "-raw";

/// A row's name: the method's, "(raw)" for its raw weights.
fn shown(name: &str) -> String {
    match name.strip_suffix(RAW_SUFFIX) {
        Some(base) => format!("{} (raw)", display_name(base)),
        None => display_name(name).to_string(),
    }
}

/// SFR-on's path: each snapshot's iteration and judgement.
pub type Snapshots = Vec<(u64, GenerationEval)>;

/// One seed's judgements: the models, then SFR-on's path.
pub type Seed = (u64, Vec<Judged>, Snapshots);

/// What `sfron eval` samples for the model at `path`: its run folder when
/// it is a run's `model.safetensors` with an EMA beside it (so that
/// `sample.weights` chooses), else the file itself.
fn target(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir)
            if path.file_name() == Some(MODEL_FILE.as_ref()) && dir.join(EMA_FILE).is_file() =>
        {
            dir.to_path_buf()
        }
        _ => path.to_path_buf(),
    }
}

/// Evaluates `model` in `plan.run_dir`, or reads a matching earlier
/// evaluation; rank 0 gets it.
fn stage(
    comm: &Comm,
    plan: &RunPlan,
    device: Device,
    model: &Path,
) -> Result<Option<GenerationEval>> {
    let digest = |p: &Path| -> Result<Option<String>> {
        if !p.is_file() {
            return Ok(None);
        }
        Ok(Some(weights::identify(&weights::read(p)?, p)?))
    };
    let (file, ema) = crate::sample::weights_file(model, plan.sample.weights)?;
    let inputs = Inputs::open(plan)?;
    let classifier = Path::new(&plan.eval.classifier);
    let mut sample = plan.sample.clone();
    sample.from = String::new();
    let key = format!(
        "eval:sha256:{}",
        sha256_hex(
            json!({
                "model": digest(&file)?, "ema": ema,
                "classifier": digest(classifier)?,
                "split": inputs.split_hash(),
                "data": inputs.identity(plan),
                "arch": plan.model.arch.name(),
                "eval": plan.eval, "sample": sample, "diffusion": plan.diffusion,
                "seed": plan.seed,
            })
            .to_string()
            .as_bytes()
        )
    );
    let outputs = [crate::eval::EVAL_FILE, GRID_FILE];
    let (done, _lock) = begin(comm, &plan.run_dir, &key, &outputs)?;
    if !done && generation::run(comm, plan, device, model)? == Status::Done {
        finish(comm, &plan.run_dir, &key, &outputs)?;
    }
    if !comm.is_root() {
        return Ok(None);
    }
    let path = plan.run_dir.join(crate::eval::EVAL_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{}: not a generation evaluation", path.display())
    })?))
}

/// The iterations (steps) and seconds a run folder's summary records.
fn cost(dir: &Path) -> Option<(u64, f64)> {
    for (file, count) in [("unlearn.json", "iterations"), ("train.json", "steps")] {
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            return Some((v[count].as_u64()?, v["seconds"].as_f64()?));
        }
    }
    None
}

/// Judges every model of one seed, then the SFR-on snapshots; rank 0 gets
/// the judgements (models first, in `models`' order; snapshots as
/// `sfron@N`).
pub fn judge_seed(
    comm: &Comm,
    plan: &RunPlan,
    layers: &Layers,
    seed_root: &Path,
    common: &[String],
    device: Device,
    models: &[(String, PathBuf)],
) -> Result<Option<(Vec<Judged>, Snapshots)>> {
    let mut judged = Vec::new();
    let ema = plan.sample.weights == crate::config::raw::SampleWeights::Ema;
    let mut raw_sets = common.to_vec();
    raw_sets.push("sample.weights=raw".into());
    for (name, model) in models {
        let target = target(model);
        // The model's EMA (or only) weights, then with study.judge_raw its
        // raw weights beside an EMA.
        let mut passes = vec![(name.clone(), common)];
        if plan.study.judge_raw && ema && target.is_dir() {
            passes.push((format!("{name}{RAW_SUFFIX}"), &raw_sets));
        }
        for (stage_name, sets) in passes {
            let p = stage_plan(comm, layers, &seed_root.join("eval"), &stage_name, sets)?;
            if let Some(eval) = stage(comm, &p, device, &target)? {
                judged.push(Judged {
                    name: stage_name,
                    eval,
                    dir: p.run_dir.clone(),
                    cost: model.parent().and_then(cost),
                });
            }
        }
    }
    // The forgetting's path: each SFR-on snapshot, judged alike.
    let mut path = Vec::new();
    let snapshots = seed_root.join("sfron").join("snapshots");
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&snapshots)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let stem = name.strip_prefix("iter-")?;
            let n = if ema {
                stem.strip_suffix(".ema.safetensors")?
            } else {
                stem.strip_suffix(".safetensors")
                    .filter(|s| !s.ends_with(".ema"))?
            };
            Some((n.parse().ok()?, p))
        })
        .collect();
    files.sort();
    let mut sets = common.to_vec();
    if plan.study.snapshot_per_class > 0 {
        sets.push(format!(
            "sample.per_class={}",
            plan.study.snapshot_per_class
        ));
    }
    for (n, file) in files {
        let p = stage_plan(
            comm,
            layers,
            &seed_root.join("eval").join("sfron-snapshots"),
            &format!("iter-{n:06}"),
            &sets,
        )?;
        if let Some(eval) = stage(comm, &p, device, &file)? {
            path.push((n, eval));
        }
    }
    Ok(comm.is_root().then_some((judged, path)))
}

/// A value's cell: `mean ± std` over the seeds (no ± for one seed).
fn cell(v: Stat, digits: usize, seeds: usize) -> String {
    match v {
        None => "–".into(),
        Some((m, s)) if seeds > 1 => format!("{m:.digits$} ± {s:.digits$}"),
        Some((m, _)) => format!("{m:.digits$}"),
    }
}

/// Writes report.json, report.md and the snapshot curves; returns the table.
pub fn write(root: &Path, plan: &RunPlan, per_seed: &[Seed]) -> Result<String> {
    let names: Vec<String> = per_seed
        .first()
        .map(|(_, j, _)| j.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default();
    let seeds = per_seed.len();
    // A raw row's reference is Retrain's raw weights when judged, else its EMA.
    let retrain = |seed_judged: &[Judged], name: &str| {
        let raw = format!("retrain{RAW_SUFFIX}");
        let wanted = if name.ends_with(RAW_SUFFIX) && seed_judged.iter().any(|j| j.name == raw) {
            raw.as_str()
        } else {
            "retrain"
        };
        seed_judged
            .iter()
            .find(|j| j.name == wanted)
            .map(|j| j.eval.clone())
    };
    type Get = fn(&GenerationEval) -> Option<f64>;
    let mut columns: Vec<(&str, &str, Get, usize)> = vec![
        ("FA (%)", "forget_acc", |e| Some(e.forget_acc), 2),
        (
            "Remaining acc. (%)",
            "remain_acc",
            |e| Some(e.remain_acc),
            2,
        ),
        (
            "FID (classifier)",
            "fid_classifier",
            |e| Some(e.fid_classifier),
            2,
        ),
    ];
    let inception = per_seed
        .iter()
        .flat_map(|(_, j, _)| j)
        .any(|j| j.eval.fid_inception.is_some());
    if inception {
        columns.push(("FID (Inception)", "fid_inception", |e| e.fid_inception, 2));
    }
    let mut table = String::from("| Method |");
    for (title, ..) in &columns {
        table += &format!(" {title} | gap |");
    }
    table += " Iterations | Time (s) |\n|---|";
    table += &"---:|".repeat(columns.len() * 2 + 2);
    table.push('\n');
    let mut rows_json = Vec::new();
    for name in &names {
        let found: Vec<(&Judged, Option<GenerationEval>)> = per_seed
            .iter()
            .filter_map(|(_, j, _)| {
                j.iter()
                    .find(|e| &e.name == name)
                    .map(|e| (e, retrain(j, name)))
            })
            .collect();
        let mut line = format!("| {} |", shown(name));
        let mut row = json!({"name": name});
        for (_, key, get, digits) in &columns {
            let v = mean_std(&found.iter().map(|(j, _)| get(&j.eval)).collect::<Vec<_>>());
            let g = mean_std(
                &found
                    .iter()
                    .map(|(j, r)| Some((get(&j.eval)? - get(r.as_ref()?)?).abs()))
                    .collect::<Vec<_>>(),
            );
            line += &format!(
                " {} | {} |",
                cell(v, *digits, seeds),
                cell(g, *digits, seeds)
            );
            row[*key] = json!(v.map(|(m, s)| json!({"mean": m, "std": s})));
            row[format!("{key}_gap")] = json!(g.map(|(m, s)| json!({"mean": m, "std": s})));
        }
        let iterations = mean_std(
            &found
                .iter()
                .map(|(j, _)| j.cost.map(|c| c.0 as f64))
                .collect::<Vec<_>>(),
        );
        let seconds = mean_std(
            &found
                .iter()
                .map(|(j, _)| j.cost.map(|c| c.1))
                .collect::<Vec<_>>(),
        );
        line += &format!(
            " {} | {} |\n",
            cell(iterations, 0, 1),
            cell(seconds, 1, seeds)
        );
        row["iterations"] = json!(iterations.map(|v| v.0));
        row["seconds"] = json!(seconds.map(|(m, s)| json!({"mean": m, "std": s})));
        row["seeds"] = json!(found.iter().map(|(j, _)| &j.eval).collect::<Vec<_>>());
        table += &line;
        rows_json.push(row);
    }

    let Some((seed, first, path)) = per_seed.first() else {
        return Ok(table);
    };
    let about = first.first().map(|j| &j.eval);
    let mut md = String::from("# sfron study: forgetting a class of a diffusion model\n\n");
    if let Some(e) = about {
        md += &format!(
            "Forget class {}; {} seed(s). Each model generates {} images per class ({} sampler, \
             {} steps, guidance {}; its **{}** weights where the run kept an EMA{}). Forget \
             accuracy: the share of generated class-{} images that the classifier `{}` calls \
             {}. Remaining accuracy: the same for the other classes. FID: in that classifier's \
             penultimate features, {} generated remaining-class images against all {} real \
             remaining-class training images. Gaps are |value − Retrain's|.\n\n",
            e.forget_class,
            seeds,
            e.sampler["per_class"],
            e.sampler["method"].as_str().unwrap_or("?"),
            e.sampler["steps"],
            e.sampler["guidance"],
            plan.sample.weights.as_str(),
            if names.iter().any(|n| n.ends_with(RAW_SUFFIX)) {
                "; rows marked (raw) sample the same run's raw weights"
            } else {
                ""
            },
            e.forget_class,
            e.classifier,
            e.forget_class,
            e.generated_remain,
            e.real_remain
        );
    }
    md += &table;
    md += "\nIterations and time: the run that made the model (training steps for the \
           original and Retrain; for SA, its replay generation and Fisher are in its time).\n";
    md += &format!("\n## Samples (seed {seed}; one row per class)\n\n");
    for j in first {
        let rel = j.dir.strip_prefix(root).unwrap_or(&j.dir).join(GRID_FILE);
        md += &format!(
            "**{}** (FA {:.1}%, FID {:.1}, {} weights)\n\n![{}]({})\n\n",
            shown(&j.name),
            j.eval.forget_acc,
            j.eval.fid_classifier,
            j.eval.weights,
            shown(&j.name),
            rel.display()
        );
    }
    if !path.is_empty() {
        let dir = root.join("plots");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("snapshots.svg");
        let points: Vec<(f64, f64, f64)> = path
            .iter()
            .map(|(n, e)| (*n as f64, e.forget_acc, e.fid_classifier))
            .collect();
        let reference = retrain(first, "sfron").map(|r| (r.forget_acc, r.fid_classifier));
        plots::snapshot_curves(&file, &points, reference)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", file.display()))?;
        md += &format!(
            "## SFR-on's path (seed {seed})\n\nForget accuracy and FID of the snapshots \
             (unlearn.snapshot_every; {} images per class each), Retrain dashed.\n\n\
             ![SFR-on snapshots](plots/snapshots.svg)\n\n| Iteration | FA (%) | FID |\n|---:|---:|---:|\n",
            path[0].1.sampler["per_class"]
        );
        for (n, e) in path {
            md += &format!("| {n} | {:.2} | {:.2} |\n", e.forget_acc, e.fid_classifier);
        }
    }
    let report = json!({
        "task": "generation",
        "scenario": plan.study.scenario,
        "seeds": per_seed.iter().map(|s| s.0).collect::<Vec<_>>(),
        "weights": plan.sample.weights.as_str(),
        "rows": rows_json,
        "snapshots": per_seed.iter().map(|(s, _, p)| json!({"seed": s, "path": p.iter().map(|(n, e)| json!({"iteration": n, "eval": e})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    write_atomic(
        &root.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&root.join("report.md"), md.as_bytes())?;
    Ok(table)
}
