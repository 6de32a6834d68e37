//! Progress for people (an indicatif bar when stderr is a terminal, log
//! lines otherwise) and metrics for programs (JSON lines), on rank 0 only.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// Rank 0's metrics file and progress display; a no-op on other ranks.
pub struct Progress {
    metrics: Option<(PathBuf, BufWriter<File>)>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Opens `<run>/metrics.jsonl` on rank 0, dropping records after `resumed_at`
    /// (steps that the resumed run will do again).
    pub fn new(
        run_dir: &Path,
        root: bool,
        what: &str,
        total: u64,
        resumed_at: u64,
    ) -> Result<Self> {
        if !root {
            return Ok(Progress {
                metrics: None,
                bar: None,
            });
        }
        let path = run_dir.join("metrics.jsonl");
        if resumed_at > 0 && path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= resumed_at)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::fsx::write_atomic(&path, kept.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        } else if resumed_at == 0 {
            let _ = std::fs::remove_file(&path);
        }
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total).with_prefix(what.to_string());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed} < {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_position(resumed_at);
            bar
        });
        Ok(Progress {
            metrics: Some((path, BufWriter::new(file))),
            bar,
        })
    }

    /// Appends one JSON record (flushed, so a killed run keeps what it logged).
    pub fn record(&mut self, record: Value) -> Result<()> {
        if let Some((path, w)) = &mut self.metrics {
            serde_json::to_writer(&mut *w, &record)?;
            w.write_all(b"\n")?;
            w.flush()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Moves the bar, or logs `message` when there is no bar.
    pub fn show(&self, step: u64, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(message.to_string());
            }
            None if self.metrics.is_some() => tracing::info!("step {step}: {message}"),
            None => {}
        }
    }

    /// Prints a line above the bar (or logs it).
    pub fn say(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None if self.metrics.is_some() => tracing::info!("{message}"),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
