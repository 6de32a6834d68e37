//! The validated run plan: every cross-field rule and derived value, checked
//! once. Downstream code reads a [`RunPlan`], never the raw configuration.

use std::path::PathBuf;

use super::raw::{DeviceKind, LogSection};
use super::{ConfigError, LoadedConfig};
use crate::comm::Topology;

/// Libtorch intra-op threads above this are a typo, not a machine.
const MAX_THREADS: u32 = 1024;

#[derive(Clone, Debug)]
pub struct RunPlan {
    /// `run.root / run.name`.
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: DeviceKind,
    /// Libtorch CPU threads for this rank (derived when `device.threads = 0`).
    pub threads: usize,
    pub log: LogSection,
    pub topology: Topology,
    /// The merged configuration this plan came from (for printing and saving).
    pub config: LoadedConfig,
}

impl RunPlan {
    /// Validates `config` for a job of shape `topology`; `cores` is the number
    /// of CPUs this host offers.
    pub fn new(
        config: LoadedConfig,
        topology: &Topology,
        cores: usize,
    ) -> Result<Self, ConfigError> {
        let raw = &config.raw;
        let name = raw.run.name.trim();
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
            return Err(config.key_error(
                "run.name",
                format!(
                    "{:?} is not a folder name: use letters, digits, '-', '_' or '.'",
                    raw.run.name
                ),
            ));
        }
        if raw.run.root.trim().is_empty() {
            return Err(
                config.key_error("run.root", "must name a folder (the default is \"runs\")")
            );
        }
        if raw.device.threads > MAX_THREADS {
            return Err(config.key_error(
                "device.threads",
                format!(
                    "{} threads per rank: allowed 0 (automatic) to {MAX_THREADS}",
                    raw.device.threads
                ),
            ));
        }
        let threads = match raw.device.threads {
            0 => (cores / topology.local_size.max(1)).max(1),
            n => n as usize,
        };
        Ok(RunPlan {
            run_dir: PathBuf::from(&raw.run.root).join(name),
            seed: raw.run.seed,
            device: raw.device.kind,
            threads,
            log: raw.log.clone(),
            topology: topology.clone(),
            config,
        })
    }

    /// What `--dry-run` prints: every key with its origin, then the derived values.
    pub fn describe(&self) -> String {
        let t = &self.topology;
        format!(
            "{}\n# derived\nrun_dir = {:?}\nranks = {}  (this is rank {}, local rank {} of {})\nthreads_per_rank = {}\n",
            self.config.table(),
            self.run_dir.display().to_string(),
            t.size,
            t.rank,
            t.local_rank,
            t.local_size,
            self.threads
        )
    }
}
