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

/// `bash SCRIPT` in job 4242 with the stand-ins of `dir`, whose srun exits `rc`.
fn script(script: &str, dir: &Path, rc: i32) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .env("SRUN", dir.join("srun"))
        .env("SCONTROL", dir.join("scontrol"))
        .env("SFRON_BIN", "/opt/sfron")
        .env("SLURM_JOB_ID", "4242")
        .env("FAKE_DIR", dir)
        .env("FAKE_RC", rc.to_string());
    cmd
}

/// The arguments the stand-in srun of `dir` got, after `out` exited 0.
fn srun_line(dir: &Path, out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let srun = std::fs::read_to_string(dir.join("srun.args")).unwrap();
    srun.trim().to_string()
}

fn sbatch(dir: &Path, rc: i32, args: &[&str]) -> Output {
    script(SCRIPT, dir, rc).args(args).output().unwrap()
}

#[test]
fn resumable_exit_requeues_the_job() {
    let dir = fakes("requeue");
    let out = sbatch(&dir, 75, &["doctor", "--set", "run.seed=1"]);
    assert_eq!(
        srun_line(&dir, &out),
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

const ARRAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/array.sbatch");

fn array(dir: &Path, task: &str) -> Output {
    script(ARRAY, dir, 0)
        .env("SFRON_SBATCH", SCRIPT)
        .env("SLURM_ARRAY_TASK_ID", task)
        .env("METHODS", "sfron ft ga")
        .env("SEEDS", "0 1")
        .env("CONFIG", "configs/c.toml")
        .env("ORIGINAL", "/w/orig.safetensors")
        .output()
        .unwrap()
}

#[test]
fn array_task_runs_its_method_and_seed() {
    let dir = fakes("array");
    let out = array(&dir, "4");
    // Task 4 of 3 methods × 2 seeds: method 4 mod 3 = ft, seed index 4 div 3 = 1.
    assert_eq!(
        srun_line(&dir, &out),
        "--mpi=pmix --kill-on-bad-exit=1 /opt/sfron -c configs/c.toml --set run.name=ft-seed1 \
         --set run.seed=1 unlearn --method ft --from /w/orig.safetensors --split splits/seed-1.json"
    );
    let out = array(&dir, "6");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only 6 runs") && err.contains("--array=0-5"),
        "{err}"
    );
}

const POPULATION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/population.sbatch");
const POPULATION_ARRAY: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/population-array.sbatch");

#[test]
fn population_job_splits_into_groups_and_requeues() {
    let dir = fakes("population");
    let out = script(POPULATION, &dir, 75)
        .env("SFRON_SBATCH", SCRIPT)
        .env("GROUP_SIZE", "4")
        .env("CONFIG", "configs/p.toml")
        .args(["--set", "study.population=20"])
        .output()
        .unwrap();
    assert_eq!(
        srun_line(&dir, &out),
        "--mpi=pmix --kill-on-bad-exit=1 /opt/sfron --set study.population=20 -c configs/p.toml \
         --set run.name=population --set comm.group_size=4 study"
    );
    // Preempted (75): the job is requeued like any other.
    let requeue = std::fs::read_to_string(dir.join("scontrol.args")).unwrap();
    assert_eq!(requeue.trim(), "requeue 4242");
}

#[test]
fn population_array_task_runs_its_model() {
    let dir = fakes("population-array");
    let out = script(POPULATION_ARRAY, &dir, 0)
        .env("SFRON_SBATCH", SCRIPT)
        .env("SLURM_ARRAY_TASK_ID", "7")
        .env("CONFIG", "configs/p.toml")
        .output()
        .unwrap();
    assert_eq!(
        srun_line(&dir, &out),
        "--mpi=pmix --kill-on-bad-exit=1 /opt/sfron -c configs/p.toml --set run.name=population \
         --set study.only=7 study"
    );
    let out = script(POPULATION_ARRAY, &dir, 0)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--array=0-N"));
}

#[test]
fn usr1_to_the_batch_shell_reaches_the_launcher_and_requeues() {
    let dir = fakes("signal");
    // A launcher that runs until SIGUSR1, then exits 75 as sfron does.
    let srun = "#!/bin/bash\ntrap 'echo got-usr1 > \"$FAKE_DIR/srun.args\"; exit 75' USR1\nsleep 30 &\nwait\n";
    std::fs::write(dir.join("srun"), srun).unwrap();
    let mut child = script(SCRIPT, &dir, 0).arg("doctor").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.join("srun.args"))
            .unwrap()
            .trim(),
        "got-usr1"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("scontrol.args"))
            .unwrap()
            .trim(),
        "requeue 4242"
    );
}

const RUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/launch/run");

#[test]
fn launch_run_dry_run_shows_binding_threads_and_forwarding() {
    let out = Command::new(RUN)
        .args([
            "-n",
            "2",
            "--threads",
            "3",
            "--bind",
            "core",
            "--dry-run",
            "--",
            "sfron",
            "doctor",
        ])
        .env("SFRON_SEED", "5")
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(line.starts_with("OMP_NUM_THREADS=3 "), "{line}");
    assert!(line.contains(" -np 2 "), "{line}");
    assert!(
        line.contains("target/release/sfron --threads 3 doctor"),
        "{line}"
    );
    if line.contains("--map-by") {
        // Open MPI: each rank on its 3 cores; SFRON_* forwarded.
        assert!(line.contains("--map-by slot:PE=3 --bind-to core"), "{line}");
        assert!(line.contains("-x SFRON_SEED"), "{line}");
    }
    let bad = Command::new(RUN)
        .args(["-n", "0", "--", "sfron", "doctor"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("-n must be a positive whole number"));
}

/// A doctor run that succeeded on two MPI ranks.
#[cfg(feature = "mpi")]
fn assert_two_ranks(out: &Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("world       2 rank(s), backend mpi"),
        "{text}"
    );
}

/// launch/run and the mpirun variant of the sbatch script start the real
/// binary on 2 ranks (SLURM variables faked, mpirun real).
#[cfg(feature = "mpi")]
#[test]
fn real_mpirun_through_launch_run_and_the_sbatch_script() {
    let root = std::env::temp_dir().join(format!("sfron-launch-{}", std::process::id()));
    let root = root.display().to_string();
    let out = Command::new(RUN)
        .args(["-n", "2", "--threads", "1", "--bind", "none", "--", "sfron"])
        .args(["--set", &format!("run.root={root}"), "doctor"])
        .output()
        .unwrap();
    assert_two_ranks(&out);

    let dir = fakes("mpirun");
    // mpirun as this machine needs it (2 ranks on maybe fewer cores).
    let wrapper = "#!/bin/sh\nexec mpirun --oversubscribe \"$@\"\n";
    std::fs::write(dir.join("mpirun"), wrapper).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(dir.join("mpirun"))
        .status()
        .unwrap();
    let out = Command::new("bash")
        .arg(SCRIPT)
        .args(["--set", &format!("run.root={root}"), "doctor"])
        .env("SFRON_LAUNCH", "mpirun")
        .env("MPIRUN", dir.join("mpirun"))
        .env("SLURM_NTASKS", "2")
        // Without a job id Open MPI does not look for a SLURM node list.
        .env_remove("SLURM_JOB_ID")
        .env_remove("SLURM_JOBID")
        .env("SFRON_BIN", env!("CARGO_BIN_EXE_sfron"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    assert_two_ranks(&out);
    let _ = std::fs::remove_dir_all(&root);
}
