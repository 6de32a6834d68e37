//! The raw configuration: what a TOML file, the environment and `--set` may
//! say, exactly as said. Every struct denies unknown fields; defaults live
//! here and nowhere else. Nothing outside `config` reads these types: they
//! become a [`super::RunPlan`] first.

use serde::{Deserialize, Serialize};

/// A configuration enum written as a lowercase string. Deserialising an
/// unknown name fails with the list of allowed names.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("{s:?} is not allowed: expected one of {}", $name::NAMES.join(", "))),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }
    };
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub run: RunSection,
    pub device: DeviceSection,
    pub log: LogSection,
    pub data: DataSection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Folder that holds run folders.
    pub root: String,
    /// This run's folder name under `root`.
    pub name: String,
    /// Seed of every random choice of the run.
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            root: "runs".into(),
            name: "default".into(),
            seed: 0,
        }
    }
}

string_enum! {
    /// Which device a rank computes on.
    DeviceKind {
        /// CUDA device `local_rank mod device_count` when CUDA is usable, else CPU.
        Auto => "auto",
        Cpu => "cpu",
        Cuda => "cuda",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    pub kind: DeviceKind,
    /// CPU threads per rank for libtorch; 0 means cores / ranks on this host.
    pub threads: u32,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection {
            kind: DeviceKind::Auto,
            threads: 0,
        }
    }
}

string_enum! {
    LogLevel {
        Error => "error",
        Warn => "warn",
        Info => "info",
        Debug => "debug",
        Trace => "trace",
    }
}

string_enum! {
    LogRanks {
        /// Rank 0 at `level`, the others at warn.
        Zero => "zero",
        /// Every rank at `level`.
        All => "all",
    }
}

string_enum! {
    LogFormat {
        Text => "text",
        Json => "json",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: LogLevel,
    pub ranks: LogRanks,
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: LogLevel::Info,
            ranks: LogRanks::Zero,
            format: LogFormat::Text,
        }
    }
}

string_enum! {
    /// On-disk dataset formats (see `data::dataset`).
    DataFormat {
        Mnist => "mnist",
        Cifar10 => "cifar10",
        Cifar100 => "cifar100",
        ImageFolder => "imagefolder",
        Tar => "tar",
    }
}

string_enum! {
    /// Per-sample transforms; `auto` picks the format's usual one.
    TransformName {
        Auto => "auto",
        Mnist => "mnist",
        Cifar10 => "cifar10",
        Cifar100 => "cifar100",
        ImageNet => "imagenet",
    }
}

string_enum! {
    /// What to do with an image that cannot be decoded.
    OnCorrupt {
        /// Stop with an error naming the file.
        Error => "error",
        /// Leave the sample out of its batch, count and log it.
        Skip => "skip",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub format: DataFormat,
    /// Folder of the dataset (layout per format: see `data::dataset`).
    pub root: String,
    pub transform: TransformName,
    /// Decode threads per rank; 0 decodes on the main thread.
    pub workers: u32,
    /// Batches decoded ahead per stream.
    pub prefetch: u32,
    pub on_corrupt: OnCorrupt,
    /// Split manifest written by `sfron split` ("" = none).
    pub split: String,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            format: DataFormat::Mnist,
            root: "tests/data/mnist".into(),
            transform: TransformName::Auto,
            workers: 2,
            prefetch: 4,
            on_corrupt: OnCorrupt::Error,
            split: String::new(),
        }
    }
}
