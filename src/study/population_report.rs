//! The report of a population study: `report.json`, `report.md` and the
//! plots, from the files its items wrote (DESIGN §2.1).
//!
//! Per method (and for the untouched originals, as a yardstick), over the N
//! models of each kind:
//! - KLoM per example, KL(method's margins ‖ Retrain's margins), on the
//!   forget, remain and test sets, as percentiles 50, 95, 99;
//! - U-LiRA on the forget set: per example, leave-one-out Gaussians of the
//!   margins of models that learned the example and unlearned it, and of
//!   models that never learned it (with study.subsample: the method's own
//!   models without the example; without: the oracles); the pooled ROC's
//!   AUC and TPR at 1% and 0.1% FPR, and the spread of per-example AUCs;
//! - the NeurIPS 2023 challenge score F × RA_u/RA_r × TA_u/TA_r;
//! - UA, RA, TA, Avg. Gap and KL to Retrain as mean ± std over the N pairs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::json;
use tch::Tensor;

use super::display_name;
use super::plots::{Drawn, PALETTE};
use crate::config::RunPlan;
use crate::data::Manifest;
use crate::eval::population as stats;
use crate::eval::{self, Evaluation, Examples, Subset};
use crate::fsx::write_atomic;
use crate::model::weights;

/// KLoM's percentiles in the report.
const PERCENTILES: [f64; 3] = [50.0, 95.0, 99.0];

/// Every model of one kind (a method, the originals or the oracles).
struct Kind {
    name: String,
    /// Margins per model, by column: training samples, then test samples.
    margins: Vec<Vec<f32>>,
    evaluations: Vec<Evaluation>,
}

/// The columns of each set.
struct Columns {
    forget: Vec<usize>,
    remain: Vec<usize>,
    test: Vec<usize>,
}

/// Reads every model's outputs, computes the statistics, writes the report
/// and the plots under `root`; returns the Markdown table.
pub fn write(
    root: &Path,
    plan: &RunPlan,
    split: &Path,
    membership: Option<PathBuf>,
) -> Result<String> {
    let n_models = plan.study.population as usize;
    let manifest = Manifest::load(split)?;
    let n_train = manifest.dataset.samples;
    let member = membership
        .map(|path| read_membership(&path, n_models, n_train))
        .transpose()?;
    let mut names = vec!["retrain".to_string(), "original".to_string()];
    names.extend(plan.study.methods.iter().map(|m| m.as_str().to_string()));

    let mut n_test = None;
    let mut kinds = Vec::new();
    for name in &names {
        let mut kind = Kind {
            name: name.clone(),
            margins: Vec::new(),
            evaluations: Vec::new(),
        };
        for k in 0..n_models {
            let dir = root.join(format!("model-{k}/eval/{name}"));
            let examples = Examples::load_dir(&dir)?;
            let tests = examples
                .subset
                .iter()
                .filter(|&&s| s == Subset::Test as u8)
                .count();
            if *n_test.get_or_insert(tests) != tests {
                bail!(
                    "{}: {tests} test rows, but model-0's evaluations have {}",
                    dir.display(),
                    n_test.unwrap_or(0)
                );
            }
            kind.margins
                .push(by_column(&examples, n_train, tests, &dir)?);
            let path = dir.join(eval::EVAL_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            kind.evaluations.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an evaluation", path.display()))?,
            );
        }
        kinds.push(kind);
    }
    let n_test = n_test.unwrap_or(0);
    let forget = manifest.forget.clone();
    let remain = manifest.remain();
    let columns = Columns {
        forget,
        remain,
        test: (n_train..n_train + n_test).collect(),
    };

    let oracle = &kinds[0];
    let mut rows = Vec::new();
    let mut klom_values = BTreeMap::new();
    let mut rocs = Vec::new();
    for kind in &kinds[1..] {
        let (row, kloms, roc) = judge(kind, oracle, &columns, member.as_deref(), n_train)?;
        rows.push(row);
        klom_values.insert(kind.name.clone(), kloms);
        rocs.push((kind.name.clone(), roc));
    }
    let ra_r = mean_of(oracle, |m| m.remain_acc);
    let ta_r = mean_of(oracle, |m| m.test_acc);

    let plots = draw(root, &klom_values, &rocs)?;
    write_per_example(root, &columns, n_train, &klom_values)?;
    let table = markdown_table(&rows);
    let report = json!({
        "models": n_models,
        "subsample": plan.study.subsample,
        "forget": columns.forget.len(),
        "remain": columns.remain.len(),
        "test": n_test,
        "klom": {
            "bins": stats::KlomBins::default().bins,
            "clip": stats::KlomBins::default().clip,
            "eps": stats::KlomBins::default().eps,
        },
        "challenge_delta": stats::CHALLENGE_DELTA,
        "retrain": { "remain_acc": ra_r, "test_acc": ta_r },
        "methods": rows,
    });
    let json_path = root.join("report.json");
    write_atomic(
        &json_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    let md = markdown(plan, &report, &table, &plots);
    let md_path = root.join("report.md");
    write_atomic(&md_path, md.as_bytes())
        .with_context(|| format!("writing {}", md_path.display()))?;
    Ok(table)
}

/// The file of per-example values, `per_example.safetensors`: for each
/// kind `<name>.klom_<set>` (f32, in the order of `index.<set>`) and
/// `<name>.epsilon` (the challenge's ε, order of `index.forget`); the
/// indices are the samples' ids in the training part (forget, remain) or
/// the test part.
fn write_per_example(
    root: &Path,
    columns: &Columns,
    n_train: usize,
    values: &BTreeMap<String, BTreeMap<String, Vec<f64>>>,
) -> Result<()> {
    let ids = |cols: &[usize]| -> Vec<i64> {
        cols.iter()
            .map(|&c| if c >= n_train { c - n_train } else { c } as i64)
            .collect()
    };
    let mut tensors = vec![
        (
            "index.forget".to_string(),
            Tensor::from_slice(&ids(&columns.forget)),
        ),
        (
            "index.remain".into(),
            Tensor::from_slice(&ids(&columns.remain)),
        ),
        ("index.test".into(), Tensor::from_slice(&ids(&columns.test))),
    ];
    for (name, per) in values {
        for (key, v) in per {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            tensors.push((format!("{name}.{key}"), Tensor::from_slice(&v)));
        }
    }
    let path = root.join("per_example.safetensors");
    weights::save(&path, &tensors, &BTreeMap::new())
        .with_context(|| format!("writing {}", path.display()))
}

fn read_membership(path: &Path, models: usize, samples: usize) -> Result<Vec<Vec<bool>>> {
    let (tensors, _) = weights::load(path)?;
    let (_, member) = tensors
        .into_iter()
        .find(|(n, _)| n == "member")
        .with_context(|| format!("{}: no tensor `member`", path.display()))?;
    if member.size() != [models as i64, samples as i64] {
        bail!(
            "{}: `member` is {:?}, expected [{models}, {samples}]",
            path.display(),
            member.size()
        );
    }
    let flat = Vec::<u8>::try_from(member.flatten(0, -1))?;
    Ok(flat
        .chunks(samples)
        .map(|r| r.iter().map(|&b| b == 1).collect())
        .collect())
}

/// A model's margins by column (training indices, then `n_train` + test
/// index); every column must be present.
fn by_column(ex: &Examples, n_train: usize, n_test: usize, dir: &Path) -> Result<Vec<f32>> {
    let mut out = vec![f32::NAN; n_train + n_test];
    for r in 0..ex.len() {
        let i = ex.index[r] as usize;
        let column = if ex.subset[r] == Subset::Test as u8 {
            n_train + i
        } else {
            i
        };
        if let Some(v) = out.get_mut(column) {
            *v = ex.margin[r];
        }
    }
    if let Some(missing) = out.iter().position(|v| v.is_nan()) {
        bail!(
            "{}: no margin for {} (every training and test sample needs one)",
            dir.display(),
            if missing < n_train {
                format!("training sample {missing}")
            } else {
                format!("test sample {}", missing - n_train)
            }
        );
    }
    Ok(out)
}

fn column(kind: &Kind, c: usize) -> Vec<f64> {
    kind.margins.iter().map(|m| f64::from(m[c])).collect()
}

fn mean_of(kind: &Kind, f: impl Fn(&eval::Metrics) -> f64) -> f64 {
    let v: Vec<f64> = kind.evaluations.iter().map(|e| f(&e.metrics)).collect();
    stats::mean_std(&v).0
}

fn mean_std_json(values: &[f64]) -> serde_json::Value {
    let (mean, std) = stats::mean_std(values);
    json!({ "mean": mean, "std": std })
}

/// One kind's statistics against the oracles: its report row, its
/// per-example values (`klom_<set>` in the set's column order, `epsilon` on
/// the forget set), and its U-LiRA ROC.
fn judge(
    kind: &Kind,
    oracle: &Kind,
    columns: &Columns,
    member: Option<&[Vec<bool>]>,
    n_train: usize,
) -> Result<(serde_json::Value, BTreeMap<String, Vec<f64>>, stats::Roc)> {
    let bins = stats::KlomBins::default();
    let mut kloms = BTreeMap::new();
    let mut klom_json = serde_json::Map::new();
    for (set, cols) in [
        ("forget", &columns.forget),
        ("remain", &columns.remain),
        ("test", &columns.test),
    ] {
        let values: Vec<f64> = cols
            .iter()
            .map(|&c| bins.klom(&column(kind, c), &column(oracle, c)))
            .collect();
        let mut entry = serde_json::Map::new();
        for q in PERCENTILES {
            entry.insert(format!("p{q:.0}"), json!(stats::percentile(&values, q)));
        }
        entry.insert("mean".into(), json!(stats::mean_std(&values).0));
        klom_json.insert(set.into(), entry.into());
        kloms.insert(format!("klom_{set}"), values);
    }

    // U-LiRA and the challenge's ε on the forget set.
    let (mut scores, mut positive) = (Vec::new(), Vec::new());
    let mut per_example_auc = Vec::new();
    let mut epsilons = Vec::new();
    let mut skipped = 0usize;
    for &c in &columns.forget {
        let mine = column(kind, c);
        let (learned, never): (Vec<f64>, Vec<f64>) = match member {
            Some(member) => {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for (k, &m) in mine.iter().enumerate() {
                    if c < n_train && member[k][c] {
                        a.push(m);
                    } else {
                        b.push(m);
                    }
                }
                (a, b)
            }
            None => (mine.clone(), column(oracle, c)),
        };
        epsilons.push(stats::challenge_epsilon(
            &learned,
            &column(oracle, c),
            stats::CHALLENGE_DELTA,
        ));
        // Too few models on a side, or a diverged model's non-finite margin.
        let Some((pos, neg)) = stats::ulira_example(&learned, &never)
            .filter(|(p, n)| p.iter().chain(n).all(|s| s.is_finite()))
        else {
            skipped += 1;
            continue;
        };
        let flags: Vec<bool> = pos
            .iter()
            .map(|_| true)
            .chain(neg.iter().map(|_| false))
            .collect();
        let mine: Vec<f64> = pos.iter().chain(&neg).copied().collect();
        per_example_auc.push(stats::roc(&mine, &flags).auc());
        scores.extend(mine);
        positive.extend(flags);
    }
    let roc = stats::roc(&scores, &positive);
    // An example without a model that learned it (subsampling) has no ε.
    let measured: Vec<f64> = epsilons.iter().copied().filter(|e| !e.is_nan()).collect();
    let f = stats::forgetting_quality(&measured);
    kloms.insert("epsilon".into(), epsilons);
    let (ra_u, ra_r) = (
        mean_of(kind, |m| m.remain_acc),
        mean_of(oracle, |m| m.remain_acc),
    );
    let (ta_u, ta_r) = (
        mean_of(kind, |m| m.test_acc),
        mean_of(oracle, |m| m.test_acc),
    );
    let metric = |f: &dyn Fn(&Evaluation) -> Option<f64>| -> Vec<f64> {
        kind.evaluations.iter().filter_map(f).collect()
    };
    let row = json!({
        "name": kind.name,
        "display": display_name(&kind.name),
        "klom": klom_json,
        "ulira": {
            "auc": roc.auc(),
            "tpr_at_1pct_fpr": roc.tpr_at_fpr(0.01),
            "tpr_at_0.1pct_fpr": roc.tpr_at_fpr(0.001),
            "per_example_auc": mean_std_json(&per_example_auc),
            "examples": per_example_auc.len(),
            "skipped": skipped,
        },
        "challenge": {
            "forgetting_quality": f,
            "examples": measured.len(),
            "score": stats::challenge_score(f, ra_u, ra_r, ta_u, ta_r),
        },
        "unlearn_acc": mean_std_json(&metric(&|e| Some(e.metrics.unlearn_acc))),
        "remain_acc": mean_std_json(&metric(&|e| Some(e.metrics.remain_acc))),
        "test_acc": mean_std_json(&metric(&|e| Some(e.metrics.test_acc))),
        "avg_gap": mean_std_json(&metric(&|e| e.gap.as_ref().map(|g| g.avg_gap))),
        "kl_forget": mean_std_json(&metric(&|e| e.metrics.kl_forget)),
    });
    Ok((row, kloms, roc))
}

fn markdown_table(rows: &[serde_json::Value]) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.3}"));
    let pm = |v: &serde_json::Value| format!("{} ± {}", f(&v["mean"]), f(&v["std"]));
    let klom =
        |v: &serde_json::Value| format!("{} / {} / {}", f(&v["p50"]), f(&v["p95"]), f(&v["p99"]));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| Method | KLoM forget (p50 / p95 / p99) | KLoM remain | KLoM test | U-LiRA AUC | TPR@1% FPR | TPR@0.1% FPR | Challenge F | Challenge score | UA | RA | TA | Avg. Gap | KL |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["display"].as_str().unwrap_or(""),
            klom(&r["klom"]["forget"]),
            klom(&r["klom"]["remain"]),
            klom(&r["klom"]["test"]),
            f(&r["ulira"]["auc"]),
            f(&r["ulira"]["tpr_at_1pct_fpr"]),
            f(&r["ulira"]["tpr_at_0.1pct_fpr"]),
            f(&r["challenge"]["forgetting_quality"]),
            f(&r["challenge"]["score"]),
            pm(&r["unlearn_acc"]),
            pm(&r["remain_acc"]),
            pm(&r["test_acc"]),
            pm(&r["avg_gap"]),
            pm(&r["kl_forget"]),
        );
    }
    t
}

fn markdown(
    plan: &RunPlan,
    report: &serde_json::Value,
    table: &str,
    plots: &[(String, String)],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Population study: {}\n", plan.run_dir.display());
    let _ = writeln!(
        md,
        "{} originals ({}), {} oracles (Retrain on the remain set) and, per method, {} \
         unlearnings, one from each original; forget set `{}` (seed {}): {} forget, {} remain, \
         {} test samples. Model k's seed is run.seed + k.\n",
        report["models"],
        if plan.study.subsample {
            "each on a random half of the training set, membership in membership.safetensors"
        } else {
            "each on the whole training set"
        },
        report["models"],
        report["models"],
        plan.study.scenario,
        plan.study.seeds[0],
        report["forget"],
        report["remain"],
        report["test"],
    );
    md.push_str(table);
    let _ = writeln!(
        md,
        "\nRetrain: RA {:.3}, TA {:.3} (means over its models).\n",
        report["retrain"]["remain_acc"].as_f64().unwrap_or(f64::NAN),
        report["retrain"]["test_acc"].as_f64().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        md,
        "## Definitions\n\n\
         - **Margin**: correct logit − logsumexp of the other logits (examples.safetensors `margin`).\n\
         - **KLoM** (Georgiev et al., ICLR 2025; data-unlearning-bench `compute_binned_KL_div`): \
         per example, KL(method ‖ Retrain) of the histograms of the two populations' margins: \
         margins clipped to [−{clip}, {clip}], {bins} equal bins over the pooled range (a value \
         equal to the top edge falls in no bin, as in the reference), Retrain's probabilities \
         floored at ε = {eps} where the method's are positive, both renormalised. Percentiles \
         50 / 95 / 99 over the examples of each set (numpy's linear interpolation). 0 is perfect.\n\
         - **U-LiRA** (Hayes et al., SaTML 2025): per forget example, Gaussians (mean, std with \
         ddof 0) of the margins of models that learned the example and then unlearned it, and \
         of models that never learned it ({never}), each model scored leave-one-out by the log \
         likelihood ratio; the ROC pools every (model, example) score. AUC 0.5 and TPR = FPR are \
         perfect. Examples with fewer than 3 models on a side, or a non-finite margin, are skipped.\n\
         - **Challenge score** (Triantafillou et al., arXiv:2406.09073, the NeurIPS 2023 \
         unlearning competition): per forget example, ε = the largest over threshold attacks on \
         the margins (both directions) of max(ln(1 − δ − FPR) − ln FNR, ln(1 − δ − FNR) − ln FPR), \
         δ = {delta}; H(ε) = 2 / 2^n with n the index of ε among bins of width 0.5 from 0 \
         (13 edges); F = mean H; score = F × RA_u/RA_r × TA_u/TA_r (mean accuracies).\n\
         - **UA, RA, TA, Avg. Gap, KL**: each unlearned model k against oracle k (DESIGN §2), \
         mean ± std (ddof 1) over the N pairs.\n",
        clip = report["klom"]["clip"],
        bins = report["klom"]["bins"],
        eps = report["klom"]["eps"],
        delta = report["challenge_delta"],
        never = if plan.study.subsample {
            "the same method's models whose half left the example out"
        } else {
            "the oracles"
        },
    );
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for (title, path) in plots {
            let _ = writeln!(md, "### {title}\n\n![{title}]({path})\n");
        }
    }
    md
}

/// KLoM's distribution per set (empirical CDFs, one line per method) and
/// the U-LiRA ROC curves on log axes.
fn draw(
    root: &Path,
    kloms: &BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    rocs: &[(String, stats::Roc)],
) -> Result<Vec<(String, String)>> {
    let dir = root.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for set in ["forget", "remain", "test"] {
        let file = format!("klom_{set}.svg");
        let curves: Vec<(&str, &[f64])> = kloms
            .iter()
            .map(|(name, v)| (display_name(name), v[&format!("klom_{set}")].as_slice()))
            .collect();
        klom_cdf(&dir.join(&file), set, &curves)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", dir.join(&file).display()))?;
        out.push((format!("KLoM on the {set} set"), format!("plots/{file}")));
    }
    let file = "ulira_roc.svg".to_string();
    roc_plot(&dir.join(&file), rocs)
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", dir.join(&file).display()))?;
    out.push(("U-LiRA ROC (log axes)".into(), format!("plots/{file}")));
    Ok(out)
}

fn klom_cdf(path: &Path, set: &str, curves: &[(&str, &[f64])]) -> Drawn {
    let top = curves
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let area = SVGBackend::new(path, (720, 460)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(format!("KLoM per example, {set} set"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..top * 1.05, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("KLoM (nats)")
        .y_desc("share of examples ≤ x")
        .draw()?;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(name, values)| {
            let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len().max(1) as f64;
            let points = v
                .iter()
                .enumerate()
                .map(|(k, &x)| (x, (k + 1) as f64 / n))
                .collect();
            (*name, points)
        })
        .collect();
    draw_lines(&mut chart, &lines)?;
    area.present()?;
    Ok(())
}

fn roc_plot(path: &Path, rocs: &[(String, stats::Roc)]) -> Drawn {
    const LOW: f64 = 1e-4;
    let area = SVGBackend::new(path, (720, 460)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption("U-LiRA on the forget set", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((LOW..1.0).log_scale(), (LOW..1.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(LOW, LOW), (1.0, 1.0)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = rocs
        .iter()
        .map(|(name, roc)| {
            let points = roc
                .fpr
                .iter()
                .zip(&roc.tpr)
                .filter(|(f, t)| **f >= LOW && **t >= LOW)
                .map(|(&f, &t)| (f, t))
                .collect();
            (display_name(name), points)
        })
        .collect();
    draw_lines(&mut chart, &lines)?;
    area.present()?;
    Ok(())
}

/// One line per named curve, in the palette's colours, with the legend
/// boxed at the lower right.
fn draw_lines<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    curves: &[(&str, Vec<(f64, f64)>)],
) -> Drawn
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate<From = (f64, f64)>,
{
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
