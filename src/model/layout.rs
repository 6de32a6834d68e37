//! How a model computes: bf16 autocast and the channels-last memory layout.
//!
//! Autocast: tch's `autocast` turns on CUDA autocast at its default dtype,
//! float16, and does nothing on a CPU. sfron needs bfloat16 on either, so it
//! binds libtorch's own switches, `at::autocast::{set,is}_autocast_enabled`,
//! `{set,get}_autocast_dtype`, `{increment,decrement}_nesting` and
//! `clear_cache`, at run time from the libtorch this process loaded (C++
//! names, Itanium ABI; `c10::DeviceType` and `c10::ScalarType` are `int8_t`
//! enums). A libtorch without them is reported by name, never guessed at.
//!
//! Channels-last: a 4-D tensor whose memory runs N, H, W, C while its shape
//! stays N, C, H, W. libtorch picks NHWC kernels (tensor cores, oneDNN) from
//! the strides, so the layout is set once on the convolution weights and on
//! each input batch, and every activation follows.

use std::ffi::c_int;

use libloading::os::unix::Library;
use tch::{Device, Tensor};

use crate::config::raw::Precision;

/// `c10::DeviceType::{CPU, CUDA}` and `c10::ScalarType::BFloat16`.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
const SCALAR_BF16: i8 = 15;

/// libtorch's autocast switches (see the module docs).
struct Switches {
    set_enabled: unsafe extern "C" fn(i8, bool),
    is_enabled: unsafe extern "C" fn(i8) -> bool,
    set_dtype: unsafe extern "C" fn(i8, i8),
    get_dtype: unsafe extern "C" fn(i8) -> i8,
    increment: unsafe extern "C" fn() -> c_int,
    decrement: unsafe extern "C" fn() -> c_int,
    clear_cache: unsafe extern "C" fn(),
}

/// The symbol `name` of the loaded libtorch as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the signature of the C++ function `name` mangles.
unsafe fn symbol<F: Copy>(this: &Library, name: &str) -> Result<F, String> {
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    // SAFETY: the caller vouches for `F`; the symbols of the libtorch this
    // process loaded stay valid for the process's life.
    unsafe { this.get::<F>(&z) }
        .map(|s| *s)
        .map_err(|e| format!("libtorch lacks {name}: {e}"))
}

fn switches() -> Result<&'static Switches, String> {
    static SWITCHES: std::sync::OnceLock<Result<Switches, String>> = std::sync::OnceLock::new();
    let bind = || -> Result<Switches, String> {
        let this = Library::this();
        // SAFETY: each name is the mangled libtorch function with the
        // signature declared in `Switches` (libtorch 2.x,
        // aten/src/ATen/autocast_mode.h).
        unsafe {
            Ok(Switches {
                set_enabled: symbol(
                    &this,
                    "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb",
                )?,
                is_enabled: symbol(
                    &this,
                    "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE",
                )?,
                set_dtype: symbol(
                    &this,
                    "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE",
                )?,
                get_dtype: symbol(
                    &this,
                    "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE",
                )?,
                increment: symbol(&this, "_ZN2at8autocast17increment_nestingEv")?,
                decrement: symbol(&this, "_ZN2at8autocast17decrement_nestingEv")?,
                clear_cache: symbol(&this, "_ZN2at8autocast11clear_cacheEv")?,
            })
        }
    };
    SWITCHES.get_or_init(bind).as_ref().map_err(Clone::clone)
}

/// Whether this libtorch offers the autocast switches (for `doctor`).
pub fn autocast_available() -> Result<(), String> {
    switches().map(|_| ())
}

/// bf16 autocast on `device` while alive; the previous state comes back on drop.
pub struct Autocast {
    device: i8,
    was_enabled: bool,
    was_dtype: i8,
}

impl Autocast {
    pub fn bf16(device: Device) -> Result<Self, String> {
        let s = switches()?;
        let device = match device {
            Device::Cuda(_) => DEVICE_CUDA,
            _ => DEVICE_CPU,
        };
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        unsafe {
            let guard = Autocast {
                device,
                was_enabled: (s.is_enabled)(device),
                was_dtype: (s.get_dtype)(device),
            };
            (s.set_dtype)(device, SCALAR_BF16);
            (s.set_enabled)(device, true);
            (s.increment)();
            Ok(guard)
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let s = switches().expect("bound when the guard was made");
        // SAFETY: as in `Autocast::bf16`; as torch.autocast's __exit__, the
        // cast cache is cleared when the outermost region ends.
        unsafe {
            if (s.decrement)() == 0 {
                (s.clear_cache)();
            }
            (s.set_enabled)(self.device, self.was_enabled);
            (s.set_dtype)(self.device, self.was_dtype);
        }
    }
}

/// How a model's forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compute {
    pub precision: Precision,
    pub channels_last: bool,
    /// Activation checkpointing of a DiT's blocks ([`super::recompute`]).
    pub recompute: bool,
}

impl Default for Compute {
    fn default() -> Self {
        Compute {
            precision: Precision::Fp32,
            channels_last: false,
            recompute: false,
        }
    }
}

/// Records a precision other than fp32 in a run's recipe (it changes the
/// numbers; fp32 adds nothing, so existing recipes keep their hashes).
/// The memory layout changes no result beyond float reassociation and is
/// left out, like the number of ranks.
pub fn add_precision(recipe: &mut serde_json::Value, precision: Precision) {
    if precision != Precision::Fp32 {
        recipe["precision"] = serde_json::json!(precision.as_str());
    }
}

/// `t` (4-D) with channels-last strides; other ranks are returned as they are.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether `t` is 4-D with channels-last strides.
pub fn is_channels_last(t: &Tensor) -> bool {
    let size = t.size();
    let stride = t.stride();
    t.dim() == 4 && stride[1] == 1 && (size[1] == 1 || stride[3] == size[1])
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn bf16_autocast_runs_convolutions_in_bf16_and_restores_the_state() {
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let plain = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(plain.kind(), Kind::Float);
        let mixed = {
            let _guard = Autocast::bf16(Device::Cpu).expect("libtorch's autocast switches");
            x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
        };
        assert_eq!(mixed.kind(), Kind::BFloat16);
        let diff = (mixed.to_kind(Kind::Float) - &plain)
            .abs()
            .max()
            .double_value(&[]);
        let scale = plain.abs().max().double_value(&[]);
        assert!(
            diff < 0.02 * scale,
            "bf16 {diff} against fp32 scale {scale}"
        );
        // Off again after the guard.
        let after = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(after.kind(), Kind::Float);
    }

    #[test]
    fn channels_last_keeps_shape_and_values_and_changes_strides() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = to_channels_last(&x);
        assert_eq!(y.size(), x.size());
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(is_channels_last(&y) && !is_channels_last(&x));
        assert_eq!((&y - &x).abs().max().double_value(&[]), 0.0);
    }
}
