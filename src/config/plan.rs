//! The validated run plan: every cross-field rule and derived value, checked
//! once. Downstream code reads a [`RunPlan`], never the raw configuration.

use std::path::PathBuf;

use super::raw::{DataFormat, DeviceKind, LogSection, OnCorrupt, TransformName};
use super::{ConfigError, LoadedConfig};
use crate::comm::Topology;
use crate::data::{CorruptPolicy, Format, Transform};

/// Libtorch intra-op threads above this are a typo, not a machine.
const MAX_THREADS: u32 = 1024;
/// Decode threads per rank above this are a typo.
const MAX_WORKERS: u32 = 256;

/// Where the data is and how it is read.
#[derive(Clone, Debug)]
pub struct DataPlan {
    pub format: Format,
    pub root: PathBuf,
    /// Train-time and test-time transforms.
    pub train_transform: Transform,
    pub test_transform: Transform,
    pub workers: usize,
    pub prefetch: usize,
    pub on_corrupt: CorruptPolicy,
    pub split: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct RunPlan {
    /// `run.root / run.name`.
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: DeviceKind,
    /// Libtorch CPU threads for this rank (derived when `device.threads = 0`).
    pub threads: usize,
    pub log: LogSection,
    pub data: DataPlan,
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
        let data = data_plan(&config)?;
        Ok(RunPlan {
            data,
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

fn data_plan(config: &LoadedConfig) -> Result<DataPlan, ConfigError> {
    let d = &config.raw.data;
    if d.root.trim().is_empty() {
        return Err(config.key_error("data.root", "must name the dataset folder"));
    }
    if d.prefetch == 0 {
        return Err(config.key_error("data.prefetch", "must be at least 1 (batches read ahead)"));
    }
    if d.workers > MAX_WORKERS {
        return Err(config.key_error(
            "data.workers",
            format!("{} decode threads: allowed 0 to {MAX_WORKERS}", d.workers),
        ));
    }
    let format = match d.format {
        DataFormat::Mnist => Format::Mnist,
        DataFormat::Cifar10 => Format::Cifar10,
        DataFormat::Cifar100 => Format::Cifar100,
        DataFormat::ImageFolder => Format::ImageFolder,
        DataFormat::Tar => Format::Tar,
    };
    let pick = |train: bool| match d.transform {
        TransformName::Auto => crate::data::default_transform(format, train),
        TransformName::Mnist => Transform::mnist(),
        TransformName::Cifar10 => Transform::cifar(train, false),
        TransformName::Cifar100 => Transform::cifar(train, true),
        TransformName::ImageNet => Transform::imagenet(train),
    };
    let fixed_size = matches!(format, Format::Mnist | Format::Cifar10 | Format::Cifar100);
    let train_transform = pick(true);
    if fixed_size && train_transform.shape != crate::data::default_transform(format, true).shape {
        return Err(config.key_error(
            "data.transform",
            format!(
                "{:?} does not fit {} images; use \"auto\"",
                d.transform.as_str(),
                format.name()
            ),
        ));
    }
    Ok(DataPlan {
        format,
        root: PathBuf::from(&d.root),
        train_transform,
        test_transform: pick(false),
        workers: d.workers as usize,
        prefetch: d.prefetch as usize,
        on_corrupt: match d.on_corrupt {
            OnCorrupt::Error => CorruptPolicy::Error,
            OnCorrupt::Skip => CorruptPolicy::Skip,
        },
        split: (!d.split.trim().is_empty()).then(|| PathBuf::from(&d.split)),
    })
}
