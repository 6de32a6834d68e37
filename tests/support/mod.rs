//! Helpers shared by the integration test binaries.

use std::process::Command;

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
