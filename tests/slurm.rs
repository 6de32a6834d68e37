//! The sbatch script's contract: run sfron through srun, requeue on exit 75
//! (resumable), pass other codes through. `srun` and `scontrol` are stand-ins
//! that record their arguments; the script itself is the real one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/sfron.sbatch");

fn fakes(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sfron-slurm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let srun = "#!/bin/sh\necho \"$@\" > \"$FAKE_DIR/srun.args\"\nexit \"$FAKE_RC\"\n";
    let scontrol = "#!/bin/sh\necho \"$@\" > \"$FAKE_DIR/scontrol.args\"\n";
    for (file, body) in [("srun", srun), ("scontrol", scontrol)] {
        let path = dir.join(file);
        std::fs::write(&path, body).unwrap();
        Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    }
    dir
}

fn sbatch(dir: &Path, rc: i32, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .env("SRUN", dir.join("srun"))
        .env("SCONTROL", dir.join("scontrol"))
        .env("SFRON_BIN", "/opt/sfron")
        .env("SLURM_JOB_ID", "4242")
        .env("FAKE_DIR", dir)
        .env("FAKE_RC", rc.to_string())
        .output()
        .unwrap()
}

#[test]
fn resumable_exit_requeues_the_job() {
    let dir = fakes("requeue");
    let out = sbatch(&dir, 75, &["doctor", "--set", "run.seed=1"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let srun = std::fs::read_to_string(dir.join("srun.args")).unwrap();
    assert_eq!(
        srun.trim(),
        "--mpi=pmix --kill-on-bad-exit=1 /opt/sfron doctor --set run.seed=1"
    );
    let scontrol = std::fs::read_to_string(dir.join("scontrol.args")).unwrap();
    assert_eq!(scontrol.trim(), "requeue 4242");
}

#[test]
fn other_exit_codes_pass_through_without_requeue() {
    for rc in [0, 2, 137] {
        let dir = fakes(&format!("rc{rc}"));
        let out = sbatch(&dir, rc, &["doctor"]);
        assert_eq!(out.status.code(), Some(rc));
        assert!(!dir.join("scontrol.args").exists(), "requeued on exit {rc}");
    }
}

#[test]
fn dry_run_prints_the_srun_line_and_runs_nothing() {
    let dir = fakes("dry");
    let out = sbatch(&dir, 0, &["--dry-run", "doctor"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("srun --mpi=pmix --kill-on-bad-exit=1 /opt/sfron doctor"),
        "{stdout}"
    );
    assert!(!dir.join("srun.args").exists());
}
