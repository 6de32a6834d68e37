//! A run folder's exclusive lock: one job writes a run folder at a time.
//!
//! Rank 0 takes an `flock` on `<run folder>/.sfron.lock` before anything is
//! written there and holds it until the job ends; the kernel releases it
//! when the process dies however it dies (`kill -9`, OOM, a node crash seen
//! by the file server), so a stale lock file never blocks the next job. A
//! second job on the same folder gets an error that names the folder and the
//! holder (host, pid, command, start time, from the file's text) and writes
//! nothing. Every rank gets the same outcome.
//!
//! `sfron study` holds its folder and each stage's folder while the stage
//! runs; a cleared stage folder keeps its lock file ([`clear`]).
//!
//! On shared file systems `flock` needs the file server's support (NFSv4,
//! Lustre mounted with `flock`, GPFS, BeeGFS do).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Result, bail};

use crate::comm::Comm;

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".sfron.lock";

/// Held while alive (the locked file's descriptor on rank 0; nothing on
/// the other ranks).
///
/// A job that created the run folder and wrote nothing else into it (bad
/// input found after the lock was taken) removes the folder again when the
/// lock is dropped, so a refused job leaves no trace.
#[must_use = "the lock is released when this is dropped"]
pub struct RunLock {
    file: Option<File>,
    /// The folder, when this job created it.
    created: Option<std::path::PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(dir) = self.created.take() else {
            return;
        };
        let only_lock = std::fs::read_dir(&dir)
            .is_ok_and(|entries| entries.flatten().all(|e| e.file_name() == LOCK_FILE));
        if only_lock {
            // Unlinked while still held: a job that opens the name after
            // this creates a fresh file and folder.
            let _ = std::fs::remove_file(dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&dir);
        }
        self.file.take();
    }
}

impl RunLock {
    /// Locks `dir` for this job (`command` names it in the lock file), or
    /// fails on every rank, naming the folder and the holder.
    pub fn acquire(comm: &Comm, dir: &Path, command: &str) -> Result<Self> {
        let mut outcome = Vec::new();
        let mut file = None;
        let mut created = None;
        if comm.is_root() {
            let existed = dir.exists();
            match lock(dir, command) {
                Ok(f) => {
                    file = Some(f);
                    created = (!existed).then(|| dir.to_path_buf());
                }
                Err(e) => outcome = format!("{e:#}").into_bytes(),
            }
        }
        comm.broadcast_bytes(&mut outcome, 0);
        if !outcome.is_empty() {
            bail!("{}", String::from_utf8_lossy(&outcome));
        }
        Ok(RunLock { file, created })
    }
}

/// Opens and locks `dir`'s lock file (creating the folder and the file if
/// need be, changing nothing when another job holds it), then records this
/// process as the holder.
fn lock(dir: &Path, command: &str) -> Result<File> {
    match try_lock(dir, command)? {
        Ok(file) => Ok(file),
        Err(holder) => bail!(
            "{} is in use by another job ({}): wait for it to end, or give this run another run.name",
            dir.display(),
            if holder.is_empty() {
                "holder unknown"
            } else {
                &holder
            }
        ),
    }
}

/// A claim on a folder taken by one process (no communicator): a
/// population study's group leader claims a work item with it. Released when
/// dropped or when the process dies.
#[must_use = "the claim is released when this is dropped"]
pub struct Claim {
    _file: File,
}

impl Claim {
    /// Claims `dir` for `command`, or `None` when another process holds it.
    pub fn take(dir: &Path, command: &str) -> Result<Option<Claim>> {
        Ok(try_lock(dir, command)?
            .ok()
            .map(|file| Claim { _file: file }))
    }
}

/// [`lock`], with `Ok(Err(holder))` when another process holds the lock.
fn try_lock(dir: &Path, command: &str) -> Result<std::result::Result<File, String>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own, for the file's lifetime.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Ok(Err(holder.trim().to_string()));
        }
        bail!("locking {}: {err}", path.display());
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = format!(
        "host {}, pid {}, {command}, started at {started} (Unix time)\n",
        hostname(),
        std::process::id()
    );
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(text.as_bytes()))
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(Ok(file))
}

/// Removes everything in `dir` but its lock file (a cleared folder stays
/// locked: removing the locked file would let another job lock a new one).
pub fn clear(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// This machine's host name ("unknown" if it has none).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_names_its_holder_and_ends_with_its_file() {
        let dir = std::env::temp_dir().join(format!("sfron-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = lock(&dir, "sfron test").unwrap();
        let refused = format!("{:#}", lock(&dir, "sfron test").unwrap_err());
        assert!(
            refused.contains(&format!("pid {}", std::process::id()))
                && refused.contains("sfron test")
                && refused.contains(&dir.display().to_string()),
            "{refused}"
        );
        std::fs::write(dir.join("keep"), b"x").unwrap();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        clear(&dir).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [LOCK_FILE]);
        assert!(Claim::take(&dir, "sfron test").unwrap().is_none());
        drop(first);
        let claim = Claim::take(&dir, "sfron test")
            .unwrap()
            .expect("free again");
        assert!(lock(&dir, "sfron test").is_err());
        drop(claim);
        drop(lock(&dir, "sfron test").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
