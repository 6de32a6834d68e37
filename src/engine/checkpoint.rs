//! Checkpoints: rank 0 writes them in the background, completely or not at all.
//!
//! Layout: `<run>/checkpoints/step-0000000120/` holding `model.safetensors`
//! (PyTorch loads it as it is), `state.safetensors` (optimizer buffers and the
//! run state as metadata) and `COMPLETE`, a JSON marker with the SHA-256 of
//! each file. A checkpoint is written into a hidden temporary folder (each
//! file fsynced, the marker last), which is then renamed into place and the
//! parent folder fsynced: a crash at any moment leaves either a complete
//! checkpoint or a hidden leftover that the next run removes. Old checkpoints
//! are renamed aside before they are deleted, so a crash during retention
//! never leaves a half-deleted checkpoint under a real name.
//!
//! Reading verifies every file against the marker: a flipped byte is refused
//! with the file named, never loaded.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::fsx::sha256_hex;

pub const MARKER: &str = "COMPLETE";
const PREFIX: &str = "step-";

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    step: u64,
    /// File name → SHA-256 (hex) of its bytes.
    files: BTreeMap<String, String>,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Restored {
    pub dir: PathBuf,
    pub step: u64,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Restored {
    pub fn file(&self, name: &str) -> Result<&[u8]> {
        self.files
            .get(name)
            .map(Vec::as_slice)
            .with_context(|| format!("checkpoint {} has no {name}", self.dir.display()))
    }
}

/// The checkpoint folder of a run.
pub fn folder(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Complete checkpoints of `dir` (those with a marker), oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let step = e.file_name().to_str()?.strip_prefix(PREFIX)?.parse().ok()?;
            e.path().join(MARKER).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Reads and verifies the newest complete checkpoint of `dir`, if any.
pub fn newest(dir: &Path) -> Result<Option<Restored>> {
    match list(dir).pop() {
        None => Ok(None),
        Some((_, path)) => read(&path).map(Some),
    }
}

/// Reads one checkpoint folder and verifies every file against its marker.
pub fn read(path: &Path) -> Result<Restored> {
    let marker_path = path.join(MARKER);
    let marker: Marker = serde_json::from_slice(
        &fs::read(&marker_path).with_context(|| format!("reading {}", marker_path.display()))?,
    )
    .with_context(|| format!("{} is not a checkpoint marker", marker_path.display()))?;
    let mut files = BTreeMap::new();
    for (name, expected) in &marker.files {
        let file = path.join(name);
        let bytes = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let actual = sha256_hex(&bytes);
        if &actual != expected {
            bail!(
                "checkpoint file {} fails its checksum (marker {expected}, file {actual}): it is \
                 corrupted; move {} aside to resume from the previous checkpoint",
                file.display(),
                path.display()
            );
        }
        files.insert(name.clone(), bytes);
    }
    Ok(Restored {
        dir: path.to_path_buf(),
        step: marker.step,
        files,
    })
}

/// Rank 0's background checkpoint writer (one write in flight at a time).
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: usize,
    milestones: Vec<u64>,
    runtime: tokio::runtime::Runtime,
    pending: Option<(u64, tokio::task::JoinHandle<io::Result<PathBuf>>)>,
}

impl Checkpointer {
    /// A writer into `dir`; removes leftovers of interrupted writes.
    pub fn new(dir: PathBuf, keep_last: usize, milestones: Vec<u64>) -> Result<Self> {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".step-") || name.starts_with(".trash-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name("sfron-ckpt")
            .build()
            .context("starting the checkpoint writer")?;
        Ok(Checkpointer {
            dir,
            keep_last: keep_last.max(1),
            milestones,
            runtime,
            pending: None,
        })
    }

    /// Starts writing checkpoint `step` from `files` (name, bytes) in the
    /// background, after the previous write has finished.
    pub fn save(&mut self, step: u64, files: Vec<(String, Vec<u8>)>) -> Result<()> {
        self.wait()?;
        let (dir, keep, milestones) = (self.dir.clone(), self.keep_last, self.milestones.clone());
        let handle = self
            .runtime
            .spawn_blocking(move || write(&dir, step, &files, keep, &milestones));
        self.pending = Some((step, handle));
        Ok(())
    }

    /// Waits for the write in flight; returns the folder it wrote.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        let Some((step, handle)) = self.pending.take() else {
            return Ok(None);
        };
        let written = self
            .runtime
            .block_on(handle)
            .context("the checkpoint writer stopped")?
            .with_context(|| format!("writing checkpoint {step} into {}", self.dir.display()))?;
        tracing::debug!(step, dir = %written.display(), "checkpoint complete");
        Ok(Some(written))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("{e:#}");
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes one checkpoint (see the module docs), then applies retention.
fn write(
    dir: &Path,
    step: u64,
    files: &[(String, Vec<u8>)],
    keep_last: usize,
    milestones: &[u64],
) -> io::Result<PathBuf> {
    let name = format!("{PREFIX}{step:010}");
    let target = dir.join(&name);
    if target.join(MARKER).is_file() {
        // Runs are deterministic: the same step holds the same state.
        return Ok(target);
    }
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp)?;
    let mut marker = Marker {
        step,
        files: BTreeMap::new(),
    };
    for (file, bytes) in files {
        write_synced(&tmp.join(file), bytes)?;
        marker.files.insert(file.clone(), sha256_hex(bytes));
    }
    let json = serde_json::to_vec_pretty(&marker).map_err(io::Error::other)?;
    write_synced(&tmp.join(MARKER), &json)?;
    File::open(&tmp)?.sync_all()?;
    if target.exists() {
        // An incomplete folder under the real name (not made by sfron).
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&tmp, &target)?;
    File::open(dir)?.sync_all()?;
    retain(dir, keep_last, milestones)?;
    Ok(target)
}

/// Deletes complete checkpoints beyond the newest `keep_last`, except milestones.
fn retain(dir: &Path, keep_last: usize, milestones: &[u64]) -> io::Result<()> {
    let all = list(dir);
    let cut = all.len().saturating_sub(keep_last);
    for (step, path) in &all[..cut] {
        if milestones.contains(step) {
            continue;
        }
        let trash = dir.join(format!(".trash-{step}-{}", std::process::id()));
        fs::rename(path, &trash)?;
        fs::remove_dir_all(&trash)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sfron-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn writes_reads_keeps_last_and_milestones() {
        let dir = temp("retain");
        let mut c = Checkpointer::new(dir.clone(), 2, vec![2]).unwrap();
        for step in 1..=5u64 {
            c.save(step, vec![("a.bin".into(), vec![step as u8; 10])])
                .unwrap();
        }
        c.wait().unwrap();
        let steps: Vec<u64> = list(&dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 4, 5]);
        let r = newest(&dir).unwrap().unwrap();
        assert_eq!(r.step, 5);
        assert_eq!(r.file("a.bin").unwrap(), &[5u8; 10]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_flipped_byte_is_refused_and_leftovers_are_cleaned() {
        let dir = temp("flip");
        let mut c = Checkpointer::new(dir.clone(), 3, vec![]).unwrap();
        c.save(7, vec![("w".into(), vec![1, 2, 3, 4])]).unwrap();
        c.wait().unwrap();
        let path = dir.join("step-0000000007/w");
        let mut bytes = fs::read(&path).unwrap();
        bytes[2] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        let err = newest(&dir).unwrap_err().to_string();
        assert!(
            err.contains("fails its checksum") && err.contains("step-0000000007/w"),
            "{err}"
        );
        fs::create_dir_all(dir.join(".step-0000000008.tmp-1")).unwrap();
        drop(c);
        let _c = Checkpointer::new(dir.clone(), 3, vec![]).unwrap();
        assert!(!dir.join(".step-0000000008.tmp-1").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
