//! The study's report: `report.json` (every seed's evaluation, means and
//! standard deviations) and `report.md` (the table, per-class accuracy and the
//! plots).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use super::{Evaluated, display_name, plots};
use crate::config::RunPlan;
use crate::eval::Evaluation;
use crate::fsx::write_atomic;

/// The table's columns: name, how a value is read from an evaluation, and
/// its gap to Retrain (None: the column is itself a distance or a cost).
struct Column {
    name: &'static str,
    key: &'static str,
    value: fn(&Evaluation) -> Option<f64>,
    gap: Option<fn(&Evaluation) -> Option<f64>>,
    digits: usize,
}

const COLUMNS: [Column; 8] = [
    Column {
        name: "FA",
        key: "forget_acc",
        value: |e| Some(e.metrics.forget_acc),
        gap: Some(|e| e.gap.as_ref().map(|g| g.forget_acc)),
        digits: 2,
    },
    Column {
        name: "RA",
        key: "remain_acc",
        value: |e| Some(e.metrics.remain_acc),
        gap: Some(|e| e.gap.as_ref().map(|g| g.remain_acc)),
        digits: 2,
    },
    Column {
        name: "TA",
        key: "test_acc",
        value: |e| Some(e.metrics.test_acc),
        gap: Some(|e| e.gap.as_ref().map(|g| g.test_acc)),
        digits: 2,
    },
    Column {
        name: "MIA (entropy)",
        key: "mia_entropy",
        value: |e| Some(e.metrics.mia_entropy),
        gap: Some(|e| e.gap.as_ref().map(|g| g.mia_entropy)),
        digits: 2,
    },
    Column {
        name: "MIA-efficacy",
        key: "mia_efficacy",
        value: |e| Some(e.metrics.mia_efficacy),
        gap: Some(|e| e.gap.as_ref().map(|g| g.mia_efficacy)),
        digits: 2,
    },
    Column {
        name: "KL",
        key: "kl_forget",
        value: |e| e.metrics.kl_forget,
        gap: None,
        digits: 4,
    },
    Column {
        name: "Avg. Gap",
        key: "avg_gap",
        value: |e| e.gap.as_ref().map(|g| g.avg_gap),
        gap: None,
        digits: 2,
    },
    Column {
        name: "time (s)",
        key: "seconds",
        value: |e| e.seconds,
        gap: None,
        digits: 1,
    },
];

/// Mean and sample standard deviation (n − 1) of the values present.
pub(super) fn mean_std(values: &[Option<f64>]) -> Stat {
    let v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 {
        (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Some((mean, std))
}

/// Mean and standard deviation over the seeds.
pub(super) type Stat = Option<(f64, f64)>;

/// One row of the table over the seeds.
#[derive(Serialize)]
pub struct Row {
    pub name: String,
    pub label: String,
    /// Column key → (mean, std) of the value, and of the gap to Retrain.
    pub mean: serde_json::Map<String, serde_json::Value>,
    pub seeds: Vec<serde_json::Value>,
    #[serde(skip)]
    cells: Vec<(Stat, Stat)>,
}

pub struct Summary {
    /// The Markdown table (also printed).
    pub table: String,
}

/// Writes report.json and report.md; `notes` (caveats about the models
/// compared, e.g. one chosen by the test set) head the Markdown's findings.
pub fn write(
    root: &Path,
    plan: &RunPlan,
    per_seed: &[(u64, Vec<Evaluated>)],
    notes: &[String],
) -> Result<Summary> {
    let names: Vec<String> = per_seed
        .first()
        .map(|(_, ev)| ev.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for name in &names {
        let evals: Vec<(u64, &Evaluation)> = per_seed
            .iter()
            .filter_map(|(s, ev)| {
                ev.iter()
                    .find(|e| &e.name == name)
                    .map(|e| (*s, &e.evaluation))
            })
            .collect();
        let mut mean = serde_json::Map::new();
        let mut cells = Vec::new();
        for c in &COLUMNS {
            // Retrain's Avg. Gap to itself is 0.
            let value = |e: &Evaluation| match (c.key, name.as_str()) {
                ("avg_gap", "retrain") => Some(0.0),
                _ => (c.value)(e),
            };
            let v = mean_std(&evals.iter().map(|(_, e)| value(e)).collect::<Vec<_>>());
            // Retrain's gaps to itself are 0.
            let g = c.gap.map(|gap| {
                mean_std(
                    &evals
                        .iter()
                        .map(|(_, e)| if name == "retrain" { Some(0.0) } else { gap(e) })
                        .collect::<Vec<_>>(),
                )
            });
            let g = g.flatten();
            mean.insert(
                c.key.into(),
                json!(v.map(|(m, s)| json!({"mean": m, "std": s}))),
            );
            if c.gap.is_some() {
                mean.insert(
                    format!("{}_gap", c.key),
                    json!(g.map(|(m, s)| json!({"mean": m, "std": s}))),
                );
            }
            cells.push((v, g));
        }
        let ratio = mean_std(&evals.iter().map(|(_, e)| e.time_ratio).collect::<Vec<_>>());
        mean.insert(
            "time_ratio".into(),
            json!(ratio.map(|(m, s)| json!({"mean": m, "std": s}))),
        );
        rows.push(Row {
            name: name.clone(),
            label: display_name(name).into(),
            mean,
            seeds: evals
                .iter()
                .map(|(s, e)| json!({"seed": s, "evaluation": e}))
                .collect(),
            cells,
        });
    }

    // The best method per column: the smallest gap to Retrain, or the
    // smallest value for KL, Avg. Gap and time.
    let methods = |r: &&Row| r.name != "original" && r.name != "retrain";
    let mut best: Vec<Vec<String>> = Vec::new();
    for (k, c) in COLUMNS.iter().enumerate() {
        let score = |r: &Row| match c.gap {
            Some(_) => r.cells[k].1.map(|g| g.0),
            None => r.cells[k].0.map(|v| v.0),
        };
        let scores: Vec<(f64, &Row)> = rows
            .iter()
            .filter(methods)
            .filter_map(|r| score(r).map(|s| (s, r)))
            .collect();
        let min = scores.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
        // Ties are all best.
        let winner: Vec<String> = scores
            .iter()
            .filter(|s| s.0 <= min + 1e-9)
            .map(|s| s.1.name.clone())
            .collect();
        best.push(winner);
    }

    let seeds: Vec<u64> = per_seed.iter().map(|(s, _)| *s).collect();
    let several = seeds.len() > 1;
    let mut table = format!(
        "| {} | {} |\n|---|{}\n",
        "method",
        COLUMNS
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in &rows {
        let mut cells = Vec::new();
        for (k, c) in COLUMNS.iter().enumerate() {
            let (v, g) = r.cells[k];
            let mut text = match v {
                None => "–".to_string(),
                Some((m, s)) if several => format!("{m:.d$} ± {s:.d$}", d = c.digits),
                Some((m, _)) => format!("{m:.d$}", d = c.digits),
            };
            if let (Some((gm, _)), true) = (g, r.name != "retrain") {
                text.push_str(&format!(" ({gm:.2})"));
            }
            if c.key == "seconds"
                && let Some(Some(ratio)) = r.mean.get("time_ratio").map(|v| v["mean"].as_f64())
            {
                text.push_str(&format!(" ({ratio:.2}×)"));
            }
            if best[k].contains(&r.name) {
                text = format!("**{text}**");
            }
            cells.push(text);
        }
        table.push_str(&format!("| {} | {} |\n", r.label, cells.join(" | ")));
    }

    let plots = plots::draw(root, per_seed)?;
    let scenario = &plan.study.scenario;
    let mut md = format!(
        "# Study: {scenario}, {} seed(s) {:?}\n\n\
         Every method starts from the same original model and is judged against\n\
         Retrain on the same split and seed. Values in %, {}gaps to Retrain in\n\
         parentheses, the best method per column in bold (the smallest gap; for KL,\n\
         Avg. Gap and time the smallest value). MIA (entropy) is the authors'\n\
         attack (logistic regression on entropy, share of the forget set called\n\
         member); MIA-efficacy is SalUn's (SVC on confidence, share called\n\
         non-member). Avg. Gap = mean gap over FA, RA, TA and MIA (entropy). KL is\n\
         KL(Retrain ‖ model) on the forget set. Time is the run's wall time, with\n\
         its ratio to Retrain's.\n\n{table}\n",
        seeds.len(),
        seeds,
        if several {
            "mean ± sample std over the seeds, mean "
        } else {
            ""
        },
    );
    let smallest: Vec<&str> = best[6].iter().map(|n| display_name(n)).collect();
    md.push_str(&format!(
        "Smallest Avg. Gap: **{}**.\n\n",
        smallest.join(", ")
    ));
    for note in notes {
        md.push_str(&format!("**Note.** {note}\n\n"));
    }

    // Per-class test accuracy, first seed.
    if let Some((seed, ev)) = per_seed.first() {
        let classes = ev
            .first()
            .map_or(0, |e| e.evaluation.metrics.test_acc_per_class.len());
        md.push_str(&format!(
            "## Test accuracy per class (seed {seed})\n\n| method | {} |\n|---|{}\n",
            (0..classes)
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(classes)
        ));
        for e in ev {
            md.push_str(&format!(
                "| {} | {} |\n",
                display_name(&e.name),
                e.evaluation
                    .metrics
                    .test_acc_per_class
                    .iter()
                    .map(|a| format!("{a:.1}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        md.push('\n');
    }
    md.push_str("## Plots\n\n");
    for (title, file) in &plots {
        md.push_str(&format!("### {title}\n\n![{title}]({file})\n\n"));
    }
    md.push_str(
        "Per-example outputs of every evaluated model: `seed-*/eval/<name>/examples.safetensors`.\n",
    );

    let report = json!({
        "scenario": scenario,
        "seeds": seeds,
        "methods": plan.study.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        "columns": COLUMNS.iter().map(|c| json!({"name": c.name, "key": c.key})).collect::<Vec<_>>(),
        "best": COLUMNS.iter().zip(&best).map(|(c, b)| (c.key.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(),
        "rows": rows,
        "notes": notes,
        "plots": plots.iter().map(|(t, f)| json!({"title": t, "file": f})).collect::<Vec<_>>(),
    });
    let path = root.join("report.json");
    write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let path = root.join("report.md");
    write_atomic(&path, md.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(Summary { table })
}
