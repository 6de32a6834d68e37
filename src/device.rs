//! Device choice and libtorch threads for this rank.
//!
//! `auto` takes CUDA device `local_rank mod device_count` when CUDA is usable,
//! else the CPU; `cuda` insists on CUDA. CPU threads per rank come from the
//! plan (cores / ranks on this host unless set).

use tch::{Cuda, Device};

use crate::config::raw::DeviceKind;
use crate::config::{ConfigError, RunPlan};

/// What libtorch can see, for `doctor` and `setup`.
#[derive(Clone, Debug)]
pub struct TorchInfo {
    pub version: &'static str,
    pub lib_dir: &'static str,
    /// `libtorch_cuda` was present and linked at build time.
    pub built_with_cuda: bool,
    pub cuda_available: bool,
    pub cuda_devices: usize,
}

impl TorchInfo {
    pub fn probe() -> Self {
        TorchInfo {
            version: env!("SFRON_LIBTORCH_VERSION"),
            lib_dir: env!("SFRON_LIBTORCH_LIB"),
            built_with_cuda: env!("SFRON_LIBTORCH_CUDA") == "true",
            cuda_available: Cuda::is_available(),
            cuda_devices: Cuda::device_count().max(0) as usize,
        }
    }
}

/// Picks this rank's device and sets libtorch's CPU thread count.
pub fn select(plan: &RunPlan) -> Result<Device, ConfigError> {
    tch::set_num_threads(plan.threads as i32);
    let devices = Cuda::device_count().max(0) as usize;
    let usable = Cuda::is_available() && devices > 0;
    let local_rank = plan.topology.local_rank;
    match plan.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Auto if !usable => Ok(Device::Cpu),
        DeviceKind::Auto | DeviceKind::Cuda if usable => Ok(Device::Cuda(local_rank % devices)),
        _ => {
            let why = if env!("SFRON_LIBTORCH_CUDA") == "true" {
                "this libtorch has CUDA but no GPU or driver is visible to this process"
            } else {
                "this sfron was built against a CPU-only libtorch"
            };
            Err(plan.config.key_error(
                "device.kind",
                format!("\"cuda\" requested but {why}; use \"auto\" or \"cpu\""),
            ))
        }
    }
}

/// Short device name for logs: `cpu`, `cuda:1`.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
