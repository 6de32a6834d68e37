//! The report's plots (SVG, with plotters), from the first seed: forget and
//! remain loss and accuracy over each method's unlearning steps, per-class
//! test accuracy, and entropy histograms of forget versus test samples.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{Evaluated, display_name};
use crate::eval::Subset;

pub(super) type Drawn = std::result::Result<(), Box<dyn std::error::Error>>;

/// The reports' series colours (matplotlib's tab10), in order.
pub(super) const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws every plot under `root/plots`; returns (title, path relative to root).
pub fn draw(root: &Path, per_seed: &[(u64, Vec<Evaluated>)]) -> Result<Vec<(String, String)>> {
    let Some((seed, evaluated)) = per_seed.first() else {
        return Ok(Vec::new());
    };
    let dir = root.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    let mut save = |title: String, file: String, drawn: Drawn| -> Result<()> {
        drawn.map_err(|e| anyhow::anyhow!("drawing {}: {e}", dir.join(&file).display()))?;
        out.push((title, format!("plots/{file}")));
        Ok(())
    };

    // The three models of the headline comparison.
    let focus: Vec<&Evaluated> = ["original", "retrain"]
        .iter()
        .filter_map(|n| evaluated.iter().find(|e| e.name == *n))
        .chain(evaluated.iter().find(|e| e.name == "sfron").or_else(|| {
            evaluated
                .iter()
                .find(|e| e.name != "original" && e.name != "retrain")
        }))
        .collect();

    let file = "entropy.svg".to_string();
    save(
        format!("Entropy of forget vs test samples (seed {seed})"),
        file.clone(),
        entropy_histograms(&dir.join(&file), &focus),
    )?;
    let file = "per_class.svg".to_string();
    save(
        format!("Test accuracy per class (seed {seed})"),
        file.clone(),
        per_class(&dir.join(&file), &focus),
    )?;
    for e in evaluated {
        if e.name == "original" || e.name == "retrain" {
            continue;
        }
        let metrics = root
            .join(format!("seed-{seed}"))
            .join(&e.name)
            .join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&metrics) else {
            continue;
        };
        let file = format!("curves-{}.svg", e.name);
        save(
            format!(
                "{}: loss and accuracy over the unlearning steps (seed {seed})",
                display_name(&e.name)
            ),
            file.clone(),
            curves(&dir.join(&file), display_name(&e.name), &text),
        )?;
    }
    Ok(out)
}

/// Every chart here: f64 × f64 on an SVG.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series' legend, boxed, at `position`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Drawn {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Histograms of log10(entropy) of the forget and test rows, one panel per model.
fn entropy_histograms(path: &Path, models: &[&Evaluated]) -> Drawn {
    let area = SVGBackend::new(path, (360 * models.len().max(1) as u32, 320)).into_drawing_area();
    area.fill(&WHITE)?;
    let panels = area.split_evenly((1, models.len().max(1)));
    let log = |v: f64| v.max(1e-12).log10();
    for (panel, e) in panels.iter().zip(models) {
        let Some(ex) = &e.examples else { continue };
        let forget: Vec<f64> = ex
            .of(Subset::Forget, &ex.entropy)
            .into_iter()
            .map(log)
            .collect();
        let test: Vec<f64> = ex
            .of(Subset::Test, &ex.entropy)
            .into_iter()
            .map(log)
            .collect();
        let floor = forget.iter().chain(&test).fold(0.0f64, |a, &b| a.min(b)) - 0.1;
        let top = forget
            .iter()
            .chain(&test)
            .fold(floor + 1.0, |a, &b| a.max(b))
            + 0.1;
        let bins = 40;
        let width = (top - floor) / bins as f64;
        let hist = |v: &[f64]| {
            let mut h = vec![0f64; bins];
            for x in v {
                let k = (((x - floor) / width) as usize).min(bins - 1);
                h[k] += 1.0 / v.len().max(1) as f64;
            }
            h
        };
        let (hf, ht) = (hist(&forget), hist(&test));
        let ymax = hf.iter().chain(&ht).fold(0.01f64, |a, &b| a.max(b)) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(display_name(&e.name), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(floor..top, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("log10 entropy (nats)")
            .y_desc("share of samples")
            .draw()?;
        for (h, color, label) in [(&hf, PALETTE[3], "forget"), (&ht, PALETTE[0], "test")] {
            chart
                .draw_series(h.iter().enumerate().map(|(k, &y)| {
                    let x0 = floor + k as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, y)], color.mix(0.45).filled())
                }))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.45).filled())
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    area.present()?;
    Ok(())
}

/// Grouped bars of test accuracy per class.
fn per_class(path: &Path, models: &[&Evaluated]) -> Drawn {
    let classes = models
        .first()
        .map_or(0, |e| e.evaluation.metrics.test_acc_per_class.len());
    let area = SVGBackend::new(path, (120 + 60 * classes.max(1) as u32, 360)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(-0.5f64..classes as f64 - 0.5, 0f64..105.0)?;
    chart
        .configure_mesh()
        .x_desc("class")
        .y_desc("test accuracy (%)")
        .x_labels(classes.max(1))
        .x_label_formatter(&|x| format!("{:.0}", x))
        .draw()?;
    let group = 0.8 / models.len().max(1) as f64;
    for (m, e) in models.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        let acc = e.evaluation.metrics.test_acc_per_class.clone();
        chart
            .draw_series(acc.into_iter().enumerate().map(move |(c, a)| {
                let x0 = c as f64 - 0.4 + m as f64 * group;
                Rectangle::new(
                    [(x0, 0.0), (x0 + group, if a.is_nan() { 0.0 } else { a })],
                    color.filled(),
                )
            }))?
            .label(display_name(&e.name))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    area.present()?;
    Ok(())
}

/// Loss and accuracy of each stream (forget, remain, union) over the steps
/// of one method's `metrics.jsonl`.
fn curves(path: &Path, title: &str, metrics: &str) -> Drawn {
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        steps
            .iter()
            .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
            .collect()
    };
    let last = steps
        .iter()
        .filter_map(|v| v["step"].as_f64())
        .fold(1.0f64, f64::max);
    let area = SVGBackend::new(path, (900, 340)).into_drawing_area();
    area.fill(&WHITE)?;
    let panels = area.split_evenly((1, 2));
    for (panel, (what, unit)) in panels.iter().zip([("loss", ""), ("acc", " (%)")]) {
        let lines: Vec<(&str, Vec<(f64, f64)>)> = ["forget", "remain", "union"]
            .iter()
            .map(|s| (*s, series(&format!("{s}_{what}"))))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let top = lines
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .filter(|y| y.is_finite())
            .fold(if what == "acc" { 100.0f64 } else { 0.1 }, f64::max);
        let bottom = lines
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .filter(|y| y.is_finite())
            .fold(0.0f64, f64::min);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{title}: {}",
                    if what == "acc" { "accuracy" } else { "loss" }
                ),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..last, bottom..top * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("iteration")
            .y_desc(format!("{what}{unit}"))
            .draw()?;
        for (k, (name, points)) in lines.into_iter().enumerate() {
            let color = PALETTE[[3, 0, 2][k.min(2)]];
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    area.present()?;
    Ok(())
}

/// A diffusion study's SFR-on path: forget accuracy and FID of each
/// snapshot `(iteration, FA, FID)`, Retrain's values dashed.
pub fn snapshot_curves(
    path: &Path,
    points: &[(f64, f64, f64)],
    retrain: Option<(f64, f64)>,
) -> Drawn {
    let last = points.iter().map(|p| p.0).fold(1.0f64, f64::max);
    let area = SVGBackend::new(path, (900, 340)).into_drawing_area();
    area.fill(&WHITE)?;
    let panels = area.split_evenly((1, 2));
    let panels = [
        ("forget accuracy (%)", 0usize, retrain.map(|r| r.0)),
        ("FID (classifier)", 1, retrain.map(|r| r.1)),
    ]
    .into_iter()
    .zip(panels.iter());
    for ((what, k, reference), panel) in panels {
        let series: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.0, if k == 0 { p.1 } else { p.2 }))
            .filter(|p| p.1.is_finite())
            .collect();
        let top = series
            .iter()
            .map(|p| p.1)
            .chain(reference)
            .fold(if k == 0 { 100.0f64 } else { 1.0 }, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("SFR-on: {what}"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..last, 0f64..top * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("iteration")
            .y_desc(what)
            .draw()?;
        let color = PALETTE[if k == 0 { 3 } else { 0 }];
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))?
            .label("SFR-on")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if let Some(r) = reference {
            let grey = RGBColor(90, 90, 90);
            let dashes: Vec<PathElement<(f64, f64)>> = (0..20)
                .map(|i| {
                    let (a, b) = (last * i as f64 / 20.0, last * (i as f64 + 0.5) / 20.0);
                    PathElement::new(vec![(a, r), (b, r)], grey.stroke_width(2))
                })
                .collect();
            chart
                .draw_series(dashes)?
                .label("Retrain")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], grey.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    area.present()?;
    Ok(())
}
