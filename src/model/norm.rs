//! BatchNorm with PyTorch's names (`weight`, `bias`, `running_mean`,
//! `running_var`), normalising in train mode by this process's batch
//! ("local", libtorch's own kernel) or by the global batch of every rank
//! ("global", as `torch.nn.SyncBatchNorm`): the per-channel statistics are
//! summed across ranks in the forward pass and the per-channel gradient terms
//! in the backward pass, by the libtorch autograd function of
//! `sync_batch_norm.cpp`, through a [`StatSum`] that the layer above gives
//! ([`NormSync::set`]). Model code never sees a rank: without a `StatSum`
//! (one rank, or `model.batchnorm = "local"`) a layer is libtorch's
//! BatchNorm, bit for bit. Eval mode always uses the running statistics.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, RwLock};

use tch::Tensor;
use tch::nn::{self, ModuleT};
use torch_sys::C_tensor;

use super::Arch;
use crate::config::raw::BatchNormMode;

/// Sums a float64 tensor in place across the job (every rank calls it in
/// the same order: one call per BatchNorm layer per forward pass and per
/// backward pass in train mode).
pub trait StatSum: Send + Sync {
    fn sum(&self, t: &mut Tensor) -> Result<(), String>;
}

/// Where a model's BatchNorm layers find the cross-rank sum; `None`: local
/// statistics. One per model, shared by its layers.
#[derive(Clone, Default)]
pub struct NormSync(Arc<RwLock<Option<Box<Slot>>>>);

/// A `StatSum` at a fixed address for the C++ side, which keeps the address
/// for the backward pass: valid until [`NormSync::set`] replaces it, which
/// its owner (the engine) does only after its last step (on drop).
pub struct Slot(Box<dyn StatSum>);

impl NormSync {
    /// Global statistics through `sum` from now on (`None`: local ones).
    /// The previous `StatSum` is dropped: no backward pass of a forward pass
    /// that used it may run afterwards.
    pub fn set(&self, sum: Option<Box<dyn StatSum>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = sum.map(|s| Box::new(Slot(s)));
    }

    /// The current slot's address.
    fn slot(&self) -> Option<*const Slot> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .map(|s| s as *const Slot)
    }

    /// Train-mode forward passes sum statistics across ranks: every rank
    /// must run each of them (an empty share included), in the same order.
    pub fn is_global(&self) -> bool {
        self.slot().is_some()
    }
}

/// Records `model.batchnorm` in a recipe (`recipe["model"]["batchnorm"]`)
/// when `arch` has BatchNorm; it changes nothing otherwise, and the recipes
/// of models without stay as they were.
pub fn add_to_recipe(recipe: &mut serde_json::Value, arch: &Arch, mode: BatchNormMode) {
    if arch.has_batch_norm() {
        recipe["model"]["batchnorm"] = serde_json::json!(mode.as_str());
    }
}

/// PyTorch's BatchNorm2d defaults.
const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

pub struct BatchNorm {
    inner: nn::BatchNorm,
    sync: NormSync,
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BatchNorm({})", self.inner.running_mean.size()[0])
    }
}

/// A 2-d BatchNorm of `channels` under `p`, global when `sync` says so.
pub fn batch_norm2d(p: nn::Path, channels: i64, sync: &NormSync) -> BatchNorm {
    let config = nn::BatchNormConfig {
        momentum: MOMENTUM,
        eps: EPS,
        ..Default::default()
    };
    BatchNorm {
        inner: nn::batch_norm2d(p, channels, config),
        sync: sync.clone(),
    }
}

unsafe extern "C" {
    fn sfron_sync_batch_norm(
        input: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        running_mean: *mut C_tensor,
        running_var: *mut C_tensor,
        momentum: f64,
        eps: f64,
        sum: extern "C" fn(*mut c_void, *mut C_tensor) -> c_int,
        sum_ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut C_tensor;
}

/// The C++ side's callback: `ctx` is a [`Slot`].
extern "C" fn sum_callback(ctx: *mut c_void, t: *mut C_tensor) -> c_int {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the layer's current `Slot`, alive until the
        // engine that set it drops, after its last backward pass.
        let slot = unsafe { &*(ctx as *const Slot) };
        // SAFETY: a live tensor of the C++ caller; we take a second handle.
        let mut t = unsafe { Tensor::clone_from_ptr(t) };
        slot.0.sum(&mut t)
    });
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!("global BatchNorm: {e}");
            1
        }
        Err(_) => 1,
    }
}

impl BatchNorm {
    fn global(&self, xs: &Tensor, slot: *const Slot) -> Tensor {
        let (Some(w), Some(b)) = (&self.inner.ws, &self.inner.bs) else {
            unreachable!("BatchNorm layers of the zoo are affine");
        };
        let mut err = [0 as c_char; 512];
        let (mut rm, mut rv) = (
            self.inner.running_mean.shallow_clone(),
            self.inner.running_var.shallow_clone(),
        );
        // SAFETY: valid tensors for the call; the result is a new tensor we own.
        let out = unsafe {
            sfron_sync_batch_norm(
                xs.as_ptr(),
                w.as_ptr(),
                b.as_ptr(),
                rm.as_mut_ptr(),
                rv.as_mut_ptr(),
                MOMENTUM,
                EPS,
                sum_callback,
                slot as *mut c_void,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if out.is_null() {
            // SAFETY: the C++ side wrote a NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            panic!("global BatchNorm: {}", msg.to_string_lossy());
        }
        // SAFETY: `out` is a fresh heap tensor handed to us.
        unsafe { Tensor::from_ptr(out) }
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match (train, self.sync.slot()) {
            (true, Some(slot)) => self.global(xs, slot),
            _ => self.inner.forward_t(xs, train),
        }
    }
}
