//! Evaluation (DESIGN §2). [`score`]: a sample list's loss and accuracy
//! during a run. [`examine`] and [`run`] (`sfron eval`): every sample's
//! outputs, gathered on rank 0, then the metrics ([`metrics`]) with the two
//! membership-inference attacks ([`mia`]) and the gaps to a reference.
//!
//! Rank independence: the sample list (forget, remain, test, each in index
//! order) is cut into fixed global batches, batch k computed on rank
//! k mod ranks, so every sample is computed in the same batch for any rank
//! count and the outputs, hence the metrics, are identical.

mod examples;
pub mod generation;
pub mod metrics;
pub mod mia;
pub mod population;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::cli::EvalArgs;
use crate::comm::Comm;
use crate::config::RunPlan;
use crate::data::sampler::{Sampler, Stream};
use crate::data::{Batch, Loader};
use crate::engine::correct;
use crate::inputs::Inputs;
use crate::model::{Model, weights};
use crate::rundir::{Status, save_config};
pub use examples::{Examples, Subset};
pub use metrics::{Gap, Metrics};

/// Loss and accuracy of a sample list, summed over every rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub loss_sum: f64,
    pub correct: f64,
    pub count: f64,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct / self.count.max(1.0)
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1.0)
    }
}

/// Scores `indices` (eval mode, the loader's transform) over all ranks.
pub fn score(
    comm: &Comm,
    model: &Model,
    loader: &mut Loader,
    indices: &[usize],
    batch: usize,
    device: Device,
) -> Result<Score> {
    let mut sampler = Sampler::new(indices.to_vec(), 0, Stream::Eval, batch, false, false);
    let batches = sampler.batches_per_epoch();
    let mut local = [0f64; 3];
    let ahead = 4;
    let mut submitted = 0;
    for k in 0..batches {
        while submitted < batches && submitted < k + ahead {
            loader.submit(
                0,
                sampler.local_batch(0, submitted, comm.rank(), comm.size()),
            );
            submitted += 1;
        }
        let b: Batch = loader.take()?;
        if b.is_empty() {
            continue;
        }
        tch::no_grad(|| {
            let logits = model.forward_t(&b.images.to_device(device), false);
            let labels = b.labels.to_device(device);
            let loss = logits.cross_entropy_for_logits(&labels) * b.len() as f64;
            local[0] += loss.double_value(&[]);
            local[1] += correct(&logits, &labels);
            local[2] += b.len() as f64;
        });
    }
    comm.sum(&mut local);
    Ok(Score {
        loss_sum: local[0],
        correct: local[1],
        count: local[2],
    })
}

/// What `sfron eval` writes as `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub model: String,
    /// Content digest of the weights (`sha256:…`).
    pub model_digest: String,
    pub reference: Option<String>,
    pub reference_digest: Option<String>,
    /// Hash of the split manifest.
    pub split: String,
    pub metrics: Metrics,
    /// The reference's own metrics, and the model's gaps to them.
    pub reference_metrics: Option<Metrics>,
    pub gap: Option<Gap>,
    /// Wall time of the run that wrote the model (its `unlearn.json` or
    /// `train.json`), of the reference's, and their ratio (RTE).
    pub seconds: Option<f64>,
    pub reference_seconds: Option<f64>,
    pub time_ratio: Option<f64>,
    pub eval_seconds: f64,
    pub ranks: usize,
}

/// Per-example outputs of `model` on the split's forget, remain and test
/// sets (and the training samples it excludes), on rank 0 (`None` on the others). With a `reference`, the KL and JS
/// of the model to it on the forget rows (NaN on the others: the reference
/// is run on the forget set only).
pub fn examine(
    comm: &Comm,
    plan: &RunPlan,
    inputs: &Inputs,
    model: &Model,
    reference: Option<&Model>,
    device: Device,
) -> Result<Option<Examples>> {
    let lists = [
        inputs.forget(),
        inputs.remain(),
        (0..inputs.test.len()).collect::<Vec<usize>>(),
        inputs.excluded(),
    ];
    let mut jobs = Vec::new();
    let mut position = 0usize;
    for (subset, list) in Subset::ROWS.into_iter().zip(&lists) {
        for chunk in list.chunks(plan.eval.batch) {
            jobs.push((subset, position, chunk.to_vec()));
            position += chunk.len();
        }
    }
    let mine: Vec<&(Subset, usize, Vec<usize>)> = jobs
        .iter()
        .enumerate()
        .filter(|(k, _)| k % comm.size() == comm.rank())
        .map(|(_, j)| j)
        .collect();
    let transform = &plan.data.test_transform;
    // Forget, remain and excluded rows come from the training part, test rows from the test part.
    let mut loaders = [
        Inputs::loader(plan, &inputs.train, transform),
        Inputs::loader(plan, &inputs.test, transform),
    ];
    let part = |subset: Subset| usize::from(subset == Subset::Test);
    // Logit columns per row (0: none written).
    let classes = if plan.eval.logits {
        model.classes as usize
    } else {
        0
    };
    let mut bytes: Vec<u8> = Vec::new();
    // The rows reach rank 0 in rounds of `per_round` batches per rank, each
    // round's message under 1 GiB in all (MPI counts are 32-bit; ImageNet's
    // 1.3 M rows with 1,000 logits are 5 GB) and at most a shard; every
    // rank takes part in as many rounds as the rank with the most batches.
    // (Rank 0 still holds every row: its metrics need them all.)
    let width = if reference.is_some() { 9 } else { 7 };
    let record = 8 + 8 * width + 4 * classes;
    let budget = (1usize << 30) / comm.size() / (record * plan.eval.batch).max(1);
    // At most a shard's rows per round (`eval.shard_rows`), when sharded.
    let shard = plan.eval.shard_rows as usize / (comm.size() * plan.eval.batch).max(1);
    let per_round = match plan.eval.shard_rows {
        0 => budget,
        _ => budget.min(shard),
    }
    .max(1);
    let rounds = (jobs.len().div_ceil(comm.size()).max(1) - 1) / per_round + 1;
    let mut gathered: Vec<Vec<u8>> = Vec::new();
    let mut gather = |bytes: &mut Vec<u8>| {
        if let Some(parts) = comm.gather_bytes(bytes, 0) {
            gathered.extend(parts);
        }
        bytes.clear();
    };
    let mut done_rounds = 0;
    let ahead = 4;
    let mut submitted = 0;
    for k in 0..mine.len() {
        if k > 0 && k % per_round == 0 {
            gather(&mut bytes);
            done_rounds += 1;
        }
        while submitted < mine.len() && submitted < k + ahead {
            let (subset, _, indices) = mine[submitted];
            loaders[part(*subset)].submit(0, indices.clone());
            submitted += 1;
        }
        let (subset, start, indices) = mine[k];
        let b: Batch = loaders[part(*subset)].take()?;
        if b.is_empty() {
            continue;
        }
        // Rows left out by the corrupt-sample policy: keep the others' places.
        let mut at = 0;
        let positions: Vec<u64> = b
            .indices
            .iter()
            .map(|i| {
                while indices[at] != *i {
                    at += 1;
                }
                (start + at) as u64
            })
            .collect();
        tch::no_grad(|| -> Result<()> {
            let x = b.images.to_device(device);
            let y = b.labels.to_device(device);
            let (logits, logp, mut columns) = outputs(model, &x, &y);
            if let Some(r) = reference {
                if *subset == Subset::Forget {
                    let (_, ref_logp, _) = outputs(r, &x, &y);
                    let (kl, js) = divergences(&ref_logp, &logp);
                    columns.push(kl);
                    columns.push(js);
                } else {
                    let nan = Tensor::full([b.len() as i64], f64::NAN, (Kind::Double, device));
                    columns.push(nan.shallow_clone());
                    columns.push(nan);
                }
            }
            columns.insert(0, y.to_kind(Kind::Double));
            let table = Vec::<f64>::try_from(
                Tensor::stack(&columns, 1)
                    .to_device(Device::Cpu)
                    .contiguous()
                    .flatten(0, -1),
            )?;
            let width = columns.len();
            let logits = if classes > 0 {
                Vec::<f32>::try_from(
                    logits
                        .to_kind(Kind::Float)
                        .to_device(Device::Cpu)
                        .contiguous()
                        .flatten(0, -1),
                )?
            } else {
                Vec::new()
            };
            for (r, pos) in positions.iter().enumerate() {
                bytes.extend_from_slice(&pos.to_le_bytes());
                for v in &table[r * width..(r + 1) * width] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                for v in &logits[r * classes..(r + 1) * classes] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            Ok(())
        })?;
    }
    while done_rounds < rounds {
        gather(&mut bytes);
        done_rounds += 1;
    }
    if !comm.is_root() {
        return Ok(None);
    }
    Ok(Some(assemble(
        &gathered,
        &lists,
        reference.is_some(),
        classes,
    )))
}

/// Logits, log-probabilities (f64) and the per-row columns loss, margin,
/// predicted class, confidence, entropy, correct (f64).
///
/// The margin is `z_y − logsumexp_{j≠y} z_j` in f64 from the logits (one
/// class: +∞).
fn outputs(model: &Model, x: &Tensor, y: &Tensor) -> (Tensor, Tensor, Vec<Tensor>) {
    let logits = model.forward_t(x, false);
    let z = logits.to_kind(Kind::Double);
    let logp = z.log_softmax(-1, Kind::Double);
    let p = logp.exp();
    let label = y.unsqueeze(1);
    let at_label = |t: &Tensor| t.gather(1, &label, false).squeeze_dim(1);
    let loss = -at_label(&logp);
    let others = z
        .scatter_value(1, &label, f64::NEG_INFINITY)
        .logsumexp([-1], false);
    let margin = at_label(&z) - others;
    let predicted = logits.argmax(-1, false);
    let confidence = at_label(&p);
    let entropy =
        -(&p * &logp)
            .nan_to_num(0.0, None, None)
            .sum_dim_intlist(-1, false, Kind::Double);
    let correct = predicted.eq_tensor(y).to_kind(Kind::Double);
    let columns = vec![
        loss,
        margin,
        predicted.to_kind(Kind::Double),
        confidence,
        entropy,
        correct,
    ];
    (logits, logp, columns)
}

/// Smoothing of the divergences (DESIGN §2).
const SMOOTH: f64 = 1e-20;

/// Per row: KL(p ‖ q) and JS(p, q) of the distributions with log-probabilities `lp`, `lq`.
fn divergences(lp: &Tensor, lq: &Tensor) -> (Tensor, Tensor) {
    let (p, q) = (lp.exp(), lq.exp());
    let kl = |a: &Tensor, b: &Tensor| {
        (a * ((a + SMOOTH).log() - (b + SMOOTH).log())).sum_dim_intlist(-1, false, Kind::Double)
    };
    let m = (&p + &q) / 2.0;
    let js = (kl(&p, &m) + kl(&q, &m)) / 2.0;
    (kl(&p, &q), js)
}

/// Rank 0: the gathered rows in list order (`classes` logits per row, 0: none).
fn assemble(
    parts: &[Vec<u8>],
    lists: &[Vec<usize>; 4],
    with_reference: bool,
    classes: usize,
) -> Examples {
    // label, 6 columns, then kl and js.
    let width = if with_reference { 9 } else { 7 };
    let record = 8 + 8 * width + 4 * classes;
    let mut rows: Vec<(u64, &[u8])> = parts
        .iter()
        .flat_map(|p| p.chunks_exact(record))
        .map(|r| {
            (
                u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                &r[8..],
            )
        })
        .collect();
    rows.sort_unstable_by_key(|r| r.0);
    let mut starts = [0usize; 4];
    for s in 1..4 {
        starts[s] = starts[s - 1] + lists[s - 1].len();
    }
    let mut model = Examples::default();
    let (mut kl, mut js, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    for (pos, r) in rows {
        let f = |k: usize| f64::from_le_bytes(r[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        let pos = pos as usize;
        let s = (0..4)
            .rev()
            .find(|&s| pos >= starts[s])
            .expect("position 0 or more");
        model.subset.push(s as u8);
        model.index.push(lists[s][pos - starts[s]] as i64);
        model.label.push(f(0) as i64);
        model.loss.push(f(1) as f32);
        model.margin.push(f(2) as f32);
        model.predicted.push(f(3) as i64);
        model.confidence.push(f(4) as f32);
        model.entropy.push(f(5) as f32);
        model.correct.push(f(6) as u8);
        if with_reference {
            kl.push(f(7) as f32);
            js.push(f(8) as f32);
        }
        if classes > 0 {
            let l = &r[8 * width..];
            logits.extend(
                l.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
        }
    }
    if with_reference {
        model.kl = Some(kl);
        model.js = Some(js);
    }
    if classes > 0 {
        model.logits = Some(logits);
    }
    model
}

/// Loads the weights at `path` into a fresh model of the plan's architecture;
/// returns it with its content digest.
pub fn load_model(
    plan: &RunPlan,
    inputs: &Inputs,
    path: &Path,
    device: Device,
) -> Result<(Model, String)> {
    let bytes = weights::read(path)?;
    let digest = weights::identify(&bytes, path)?;
    let mut model = Model::new(
        plan.model.arch.clone(),
        inputs.in_channels,
        inputs.classes,
        device,
    );
    model.load_bytes(&bytes, path)?;
    model
        .set_compute(plan.compute())
        .map_err(anyhow::Error::msg)?;
    Ok((model, digest))
}

/// Wall time of the run that wrote the weights at `path`: `seconds` of the
/// `unlearn.json` or `train.json` beside it.
pub fn run_seconds(path: &Path) -> Option<f64> {
    let dir = path.parent()?;
    ["unlearn.json", "train.json"].iter().find_map(|name| {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("seconds")?.as_f64()
    })
}

/// The model an evaluation compares with (Retrain), and its metrics when
/// they are known already (else they are computed).
pub struct Reference<'a> {
    pub path: &'a Path,
    pub metrics: Option<Metrics>,
}

/// Evaluates the weights at `model_path` (against `reference`) on the
/// plan's split; rank 0 writes `examples.safetensors` (or its shards) and
/// `eval.json` to the run folder and gets the evaluation and the examples.
pub fn evaluate_files(
    comm: &Comm,
    plan: &RunPlan,
    device: Device,
    model_path: &Path,
    reference: Option<Reference>,
) -> Result<Option<(Evaluation, Examples)>> {
    let started = Instant::now();
    let inputs = Inputs::open(plan)?;
    if inputs.split.is_none() {
        anyhow::bail!("eval needs a split: pass --split MANIFEST (or set data.split)");
    }
    let (model, model_digest) = load_model(plan, &inputs, model_path, device)?;
    let (reference_model, reference_digest, known) = match &reference {
        None => (None, None, None),
        Some(r) => {
            let (m, d) = load_model(plan, &inputs, r.path, device)?;
            (Some(m), Some(d), r.metrics.clone())
        }
    };
    let classes = inputs.classes as usize;
    // The reference's own metrics, when not given (every rank takes part).
    let reference_metrics = match (&reference_model, known) {
        (_, Some(m)) => Some(Some(m)),
        (Some(r), None) => {
            Some(examine(comm, plan, &inputs, r, None, device)?.map(|ex| Metrics::of(&ex, classes)))
        }
        (None, None) => None,
    };
    let examined = examine(
        comm,
        plan,
        &inputs,
        &model,
        reference_model.as_ref(),
        device,
    )?;
    let Some(examples) = examined else {
        comm.barrier();
        return Ok(None);
    };
    let reference_metrics = reference_metrics.flatten();
    let metrics = Metrics::of(&examples, classes);
    let reference_path = reference.as_ref().map(|r| r.path);
    let seconds = run_seconds(model_path);
    let reference_seconds = reference_path.and_then(run_seconds);
    let evaluation = Evaluation {
        model: model_path.display().to_string(),
        model_digest,
        reference: reference_path.map(|p| p.display().to_string()),
        reference_digest,
        split: inputs.split_hash(),
        gap: reference_metrics.as_ref().map(|r| metrics.gap(r)),
        metrics,
        reference_metrics,
        time_ratio: seconds.zip(reference_seconds).map(|(a, b)| a / b),
        seconds,
        reference_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
        ranks: comm.size(),
    };
    std::fs::create_dir_all(&plan.run_dir)
        .with_context(|| format!("creating {}", plan.run_dir.display()))?;
    save_config(plan)?;
    let mut meta = BTreeMap::new();
    meta.insert("sfron.model".into(), evaluation.model_digest.clone());
    meta.insert("sfron.split".into(), evaluation.split.clone());
    if let Some(r) = &evaluation.reference_digest {
        meta.insert("sfron.reference".into(), r.clone());
    }
    examples.save_dir(&plan.run_dir, plan.eval.shard_rows as usize, &meta)?;
    crate::fsx::write_atomic(
        &plan.run_dir.join(EVAL_FILE),
        serde_json::to_string_pretty(&evaluation)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", plan.run_dir.join(EVAL_FILE).display()))?;
    comm.barrier();
    Ok(Some((evaluation, examples)))
}

pub const EVAL_FILE: &str = "eval.json";
pub use examples::{FILE as EXAMPLES_FILE, files_in as examples_files};

/// `sfron eval`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, args: &EvalArgs) -> Result<Status> {
    if plan.model.arch.task() == crate::model::Task::Denoise {
        if args.reference.is_some() {
            anyhow::bail!(
                "--reference compares a classifier's outputs; a diffusion model's evaluation \
                 is its generation metrics (run eval on Retrain too and compare)"
            );
        }
        return generation::run(comm, plan, device, &args.model);
    }
    let reference = args.reference.as_deref().map(|path| Reference {
        path,
        metrics: None,
    });
    let done = evaluate_files(comm, plan, device, &args.model, reference)?;
    if let Some((e, _)) = done {
        print!("{}", summary(&e));
        println!("→ {}", plan.run_dir.join(EVAL_FILE).display());
    }
    Ok(Status::Done)
}

/// A few lines for people.
pub fn summary(e: &Evaluation) -> String {
    let line = |name: &str, m: &Metrics| {
        format!(
            "{name:<10} FA {:6.2}  RA {:6.2}  TA {:6.2}  MIA(entropy) {:6.2}  MIA-efficacy {:6.2}\n",
            m.forget_acc, m.remain_acc, m.test_acc, m.mia_entropy, m.mia_efficacy
        )
    };
    let mut out = line("model", &e.metrics);
    if let (Some(r), Some(g)) = (&e.reference_metrics, &e.gap) {
        out.push_str(&line("reference", r));
        out.push_str(&format!(
            "Avg. Gap {:.2} (with MIA-efficacy {:.2}); KL {:.4}, JS {:.4} on the forget set\n",
            g.avg_gap,
            g.avg_gap_efficacy,
            e.metrics.kl_forget.unwrap_or(f64::NAN),
            e.metrics.js_forget.unwrap_or(f64::NAN)
        ));
    }
    if let Some(s) = e.seconds {
        out.push_str(&format!("run time {s:.1} s"));
        if let Some(r) = e.time_ratio {
            out.push_str(&format!(" ({r:.2} of the reference's)"));
        }
        out.push('\n');
    }
    out
}
