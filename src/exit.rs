//! Process exit codes: the contract with shells, `mpirun` and `slurm/sfron.sbatch`.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | done |
//! | 2    | error (bad input, failed check, a rank panicked or died) |
//! | 75   | interrupted at a step boundary, checkpoint written: run the same command again to resume (EX_TEMPFAIL) |

/// Finished.
pub const OK: i32 = 0;
/// Failed: the message says why. Also the MPI abort code when one rank fails.
pub const ERROR: i32 = 2;
/// Interrupted (SIGTERM / SIGUSR1), checkpoint written, resumable: requeue.
pub const RESUMABLE: i32 = 75;
