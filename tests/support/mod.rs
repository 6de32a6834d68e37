//! Helpers shared by the integration test binaries (each binary uses some).

use std::path::PathBuf;
use std::process::Command;

/// A new empty folder under the system temp folder, unique to this test
/// binary's process.
#[allow(dead_code)]
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sfron-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[allow(dead_code)]
/// The built `sfron`, as if started from a plain shell: no MPI launcher
/// variables, no SLURM task count, no `SFRON_*` configuration variables.
pub fn sfron_alone() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sfron"));
    for var in sfron::comm::LAUNCHER_VARS {
        cmd.env_remove(var);
    }
    for (var, _) in sfron::config::ENV_KEYS {
        cmd.env_remove(var);
    }
    cmd.env_remove("SLURM_STEP_NUM_TASKS")
        .env_remove("SFRON_COMM");
    cmd
}
