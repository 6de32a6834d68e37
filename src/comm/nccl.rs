//! NCCL, loaded at run time, as the data plane of gradients on GPUs.
//!
//! Open MPI stages GPU buffers through host memory, so on GPUs the gradient
//! buckets are summed by NCCL over NVLink / InfiniBand instead. MPI stays
//! the launcher and the control plane: rank 0 makes NCCL's unique id and
//! broadcasts it over MPI (as llm.c does), then every rank joins the NCCL
//! communicator on its node-local GPU.
//!
//! The library is opened with `dlopen` (`libloading`), never linked: a build
//! without NCCL, or a node without it, still runs, and the caller falls back
//! to pinned host buffers through MPI. A PyTorch wheel's `libtorch_cuda.so`
//! already loads `libnccl.so.2`, so opening it by that name finds the same
//! copy PyTorch uses; `SFRON_NCCL` names another file.
//!
//! Only the calls sfron needs are bound (NCCL 2.x ABI): version, unique id,
//! init, all-reduce, destroy, error strings, and CUDA's `cudaSetDevice`
//! (resolved from the CUDA runtime libtorch loaded).

use std::ffi::{CStr, c_char, c_int, c_void};

use libloading::Library;

use super::Comm;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; 128],
}

type RawComm = *mut c_void;
/// `ncclFloat32` and `ncclSum` in `nccl.h`.
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;

/// The bound entry points; `_lib` keeps them valid.
struct Api {
    _lib: Library,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        *mut c_void,
    ) -> c_int,
    comm_destroy: unsafe extern "C" fn(RawComm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Api {
    fn load() -> Result<Self, String> {
        let names: Vec<String> = match std::env::var("SFRON_NCCL") {
            Ok(path) if !path.is_empty() => vec![path],
            _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
        };
        let mut tried = Vec::new();
        for name in &names {
            // SAFETY: loading NCCL runs its library constructors, which have
            // no preconditions.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Self::bind(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(tried.join("; "))
    }

    fn bind(lib: Library) -> Result<Self, libloading::Error> {
        // SAFETY: each symbol is NCCL 2.x's exported C function of exactly
        // the signature declared in `Api` (nccl.h).
        unsafe {
            Ok(Api {
                get_version: *lib.get(b"ncclGetVersion\0")?,
                get_unique_id: *lib.get(b"ncclGetUniqueId\0")?,
                comm_init_rank: *lib.get(b"ncclCommInitRank\0")?,
                all_reduce: *lib.get(b"ncclAllReduce\0")?,
                comm_destroy: *lib.get(b"ncclCommDestroy\0")?,
                error_string: *lib.get(b"ncclGetErrorString\0")?,
                _lib: lib,
            })
        }
    }

    fn check(&self, rc: c_int, what: &str) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static, NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(rc)) };
        Err(format!("{what}: {} (code {rc})", text.to_string_lossy()))
    }
}

/// NCCL's version as `major.minor.patch`, or why it could not be loaded.
pub fn version() -> Result<String, String> {
    let api = Api::load()?;
    let mut code: c_int = 0;
    // SAFETY: writes one int.
    api.check(unsafe { (api.get_version)(&mut code) }, "ncclGetVersion")?;
    // NCCL ≥ 2.9 encodes major*10000 + minor*100 + patch.
    Ok(format!(
        "{}.{}.{}",
        code / 10000,
        (code % 10000) / 100,
        code % 100
    ))
}

/// Makes `device` the calling thread's current CUDA device through the CUDA
/// runtime libtorch loaded (NCCL joins the current device).
fn set_cuda_device(device: usize) -> Result<(), String> {
    let this = libloading::os::unix::Library::this();
    // SAFETY: `cudaSetDevice(int) -> cudaError_t` of the CUDA runtime.
    let set: libloading::os::unix::Symbol<unsafe extern "C" fn(c_int) -> c_int> =
        unsafe { this.get(b"cudaSetDevice\0") }
            .map_err(|e| format!("cudaSetDevice not found (no CUDA runtime loaded): {e}"))?;
    // SAFETY: a plain call with a device index.
    let rc = unsafe { set(device as c_int) };
    if rc != 0 {
        return Err(format!(
            "cudaSetDevice({device}) failed with CUDA error {rc}"
        ));
    }
    Ok(())
}

/// One NCCL communicator over every rank of the MPI world.
pub struct Nccl {
    api: Api,
    comm: RawComm,
    pub version: String,
}

impl Nccl {
    /// Joins every rank's NCCL communicator on CUDA device `device`.
    /// Collective over `comm`: every rank calls it; every rank gets `Ok`, or
    /// every rank gets `Err` (a rank that cannot load NCCL makes all fall
    /// back together, never leaves the others waiting in the init).
    pub fn init(comm: &Comm, device: usize) -> Result<Self, String> {
        let api = Api::load();
        if !comm.all_agree(api.is_ok()) {
            return Err(match api {
                Err(e) => format!("NCCL could not be loaded: {e}"),
                Ok(_) => "NCCL could not be loaded on another rank".into(),
            });
        }
        let api = api.expect("agreed");
        let version = version()?;
        let mut id = UniqueId { internal: [0; 128] };
        let mut made = true;
        if comm.is_root() {
            // SAFETY: writes the 128-byte id.
            made = api
                .check(unsafe { (api.get_unique_id)(&mut id) }, "ncclGetUniqueId")
                .inspect_err(|e| tracing::warn!(error = %e, "NCCL"))
                .is_ok();
        }
        if !comm.all_agree(made) {
            return Err("rank 0 could not make an NCCL unique id".into());
        }
        comm.broadcast(&mut id.internal[..], 0);
        let ready = set_cuda_device(device).inspect_err(|e| tracing::warn!(error = %e, "NCCL"));
        if !comm.all_agree(ready.is_ok()) {
            return Err(ready
                .err()
                .unwrap_or_else(|| "another rank has no CUDA device".into()));
        }
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: `raw` receives the communicator; the id is rank 0's, the
        // rank and size are MPI's. Every rank makes this call (collective).
        let rc = unsafe {
            (api.comm_init_rank)(&mut raw, comm.size() as c_int, id, comm.rank() as c_int)
        };
        let joined = api.check(rc, "ncclCommInitRank");
        if !comm.all_agree(joined.is_ok()) {
            if joined.is_ok() {
                // SAFETY: a communicator this rank made.
                unsafe { (api.comm_destroy)(raw) };
            }
            return Err(joined
                .err()
                .unwrap_or_else(|| "ncclCommInitRank failed on another rank".into()));
        }
        Ok(Nccl {
            api,
            comm: raw,
            version,
        })
    }

    /// Enqueues the in-place sum of the `len` floats at `ptr` (device
    /// memory) on the legacy default CUDA stream, the one libtorch's kernels
    /// run on: later kernels see the result without a host wait.
    ///
    /// # Safety
    /// `ptr` must point to `len` floats of device memory on this rank's CUDA
    /// device that stay allocated until the stream reaches the reduction.
    pub unsafe fn sum_f32(&self, ptr: *mut f32, len: usize) -> Result<(), String> {
        // SAFETY: the caller's contract, for floats.
        unsafe { self.sum_in_place(ptr.cast(), len, NCCL_FLOAT32) }
    }

    /// [`Nccl::sum_f32`] of `len` doubles (global BatchNorm's statistics).
    ///
    /// # Safety
    /// As [`Nccl::sum_f32`], for `len` doubles.
    pub unsafe fn sum_f64(&self, ptr: *mut f64, len: usize) -> Result<(), String> {
        // SAFETY: the caller's contract, for doubles.
        unsafe { self.sum_in_place(ptr.cast(), len, NCCL_FLOAT64) }
    }

    /// The in-place sum of `len` elements of `dtype` at `ptr` on the
    /// default stream.
    ///
    /// # Safety
    /// As [`Nccl::sum_f32`], for `len` elements of `dtype`.
    unsafe fn sum_in_place(
        &self,
        ptr: *mut c_void,
        len: usize,
        dtype: c_int,
    ) -> Result<(), String> {
        // SAFETY: the caller's contract; a null stream is the default stream.
        let rc = unsafe {
            (self.api.all_reduce)(
                ptr.cast_const(),
                ptr,
                len,
                dtype,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.api.check(rc, "ncclAllReduce")
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator made in `init`, destroyed once.
        unsafe { (self.api.comm_destroy)(self.comm) };
    }
}
