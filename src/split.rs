//! `sfron split`: open the training data, choose the forget set, write the
//! manifest, and say what was chosen.

use std::path::Path;

use anyhow::Result;

use crate::config::RunPlan;
use crate::data::{Manifest, Part, Scenario};

/// Writes the manifest to `out`; returns the summary to print.
pub fn run(plan: &RunPlan, scenario: &str, out: &Path) -> Result<String> {
    let train = crate::inputs::Inputs::open_part(plan, Part::Train)?;
    let scenario = Scenario::parse(scenario, plan.seed)?;
    let manifest = Manifest::create(&train, scenario)?;
    manifest.save(out)?;
    tracing::info!(path = %out.display(), forget = manifest.forget.len(), "wrote the split manifest");
    Ok(summary(&manifest, out))
}

fn summary(m: &Manifest, out: &Path) -> String {
    let remain: usize = m.counts.remain.iter().sum();
    let mut text = format!(
        "split       {} → {}\ndataset     {} at {} ({} training samples, {})\nforget      {} samples\nremain      {} samples\n",
        scenario_text(&m.scenario),
        out.display(),
        m.dataset.format,
        m.dataset.root.display(),
        m.dataset.samples,
        m.dataset.fingerprint,
        m.forget.len(),
        remain
    );
    // Every class when there are few; beyond that (ImageNet's 1,000) the
    // classes with forget samples and a count of the rest.
    let many = m.dataset.classes.len() > MAX_CLASS_ROWS;
    text.push_str("class       forget  remain\n");
    let mut untouched = (0usize, 0usize);
    for (c, name) in m.dataset.classes.iter().enumerate() {
        if many && m.counts.forget[c] == 0 {
            untouched = (untouched.0 + 1, untouched.1 + m.counts.remain[c]);
            continue;
        }
        text.push_str(&format!(
            "{name:<10} {:>7} {:>7}\n",
            m.counts.forget[c], m.counts.remain[c]
        ));
    }
    if untouched.0 > 0 {
        text.push_str(&format!(
            "({} more classes, no forget samples, {} remain samples)\n",
            untouched.0, untouched.1
        ));
    }
    text
}

/// Classes listed one per row up to this many.
const MAX_CLASS_ROWS: usize = 100;

fn scenario_text(s: &Scenario) -> String {
    match s {
        Scenario::Random { fraction, seed } => format!("random:{fraction} (seed {seed})"),
        Scenario::Class { classes } => {
            format!(
                "class:{}",
                classes
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        Scenario::List {
            file,
            listed,
            duplicates,
        } => {
            format!(
                "list:{} ({listed} lines, {duplicates} duplicates)",
                file.display()
            )
        }
    }
}
