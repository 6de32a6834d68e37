//! Preemption: SIGTERM and SIGUSR1 (SLURM's `--signal`) set a flag that the
//! step loop reads at its next reduction, so all ranks stop at the same step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by a signal (or by tests); read at step boundaries.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that SIGTERM and SIGUSR1 set. The handlers only store to an
    /// atomic (async-signal-safe).
    pub fn install() -> std::io::Result<Self> {
        let flag = StopFlag::default();
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            signal_hook::flag::register(signal, flag.0.clone())?;
        }
        Ok(flag)
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
