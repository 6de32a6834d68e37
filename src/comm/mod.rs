//! The communicator: the only module that talks to MPI.
//!
//! Owns the small collective vocabulary every other module uses: barrier,
//! element-wise sum / mean / max / min of flat buffers and of tensors, broadcast
//! of bytes, buffers and tensors, all-gather of bytes, agreement on a flag, and
//! abort. Model and method code receive a [`Comm`] and never know whether it is
//! one process or many (STYLE habit 7).
//!
//! Threading rule: MPI is initialised once by `main` (through [`Comm::init`]),
//! with `MPI_THREAD_FUNNELED` checked, and only the main thread calls these
//! methods. tokio tasks and data workers never touch a `Comm`. Dropping the
//! `Comm` finalises MPI.
//!
//! A process started without an MPI launcher, with `SFRON_COMM=local`, or built
//! without the `mpi` feature is a one-rank world: every collective returns at
//! once without copying.

pub mod buckets;
#[cfg(feature = "mpi")]
mod mpi_world;
pub mod nccl;

use std::fmt;

use tch::{Kind, Tensor};

/// Elements are broadcast in chunks of at most this many values (MPI counts
/// are 32-bit); the old scratch-copy reduction also used it.
pub const REDUCE_CHUNK: usize = 1 << 22;

/// Default size of the pieces a large reduction is cut into (see
/// [`Comm::reduce`]); `comm.segment_kib` sets it per run.
pub const DEFAULT_SEGMENT_BYTES: usize = 1 << 20;

/// Where this process sits in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub size: usize,
    /// Rank among the job's processes on this host (a group keeps the
    /// job's: it picks the GPU).
    pub local_rank: usize,
    /// Number of the job's processes on this host (it divides the cores).
    pub local_size: usize,
}

impl Topology {
    pub fn single() -> Self {
        Topology {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
        }
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

/// How to set up the world, from `SFRON_COMM` (default `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommMode {
    /// MPI when an MPI launcher started this process, else one rank.
    Auto,
    /// MPI always (a singleton MPI world without a launcher).
    Mpi,
    /// One rank, MPI never initialised.
    Local,
}

impl CommMode {
    /// Reads `SFRON_COMM`; unset means `auto`.
    pub fn from_env() -> Result<Self, CommError> {
        Self::parse(std::env::var("SFRON_COMM").as_deref().unwrap_or(""))
    }

    fn parse(value: &str) -> Result<Self, CommError> {
        match value {
            "" | "auto" => Ok(CommMode::Auto),
            "mpi" => Ok(CommMode::Mpi),
            "local" => Ok(CommMode::Local),
            other => Err(CommError::Setup(format!(
                "environment variable SFRON_COMM={other:?}: expected one of auto, mpi, local"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("communicator setup: {0}")]
    Setup(String),
    #[error("rank {rank}: {what}")]
    Collective { rank: usize, what: String },
}

/// This rank's group of [`Comm::split_groups`].
#[derive(Debug)]
pub struct Group {
    /// The group's communicator (rank 0 of it is the group's leader).
    pub comm: Comm,
    /// Which group, `0..count` (group `g` holds job ranks `g·size..(g+1)·size`).
    pub index: usize,
    pub count: usize,
}

/// Element-wise reduction operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for i64 {}
    impl Sealed for u8 {}
}

/// Element types the communicator reduces and broadcasts.
#[cfg(feature = "mpi")]
pub trait Scalar:
    Copy + Default + Send + 'static + sealed::Sealed + mpi::traits::Equivalence
{
}
#[cfg(not(feature = "mpi"))]
pub trait Scalar: Copy + Default + Send + 'static + sealed::Sealed {}
impl Scalar for f32 {}
impl Scalar for f64 {}
impl Scalar for i64 {}
impl Scalar for u8 {}

/// Floating-point scalars, which also have a mean.
pub trait Float: Scalar + std::ops::DivAssign + From<u16> {}
impl Float for f32 {}
impl Float for f64 {}

enum Inner {
    Local,
    #[cfg(feature = "mpi")]
    Mpi(mpi_world::MpiWorld),
}

/// The job's communicator. Create one with [`Comm::init`] in `main`; pass it by
/// reference. See the module docs for the threading rule.
pub struct Comm {
    inner: Inner,
    topology: Topology,
    /// Reductions above twice this many bytes go in pieces of this size,
    /// all in flight at once; 0: one call.
    segment_bytes: std::cell::Cell<usize>,
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Comm")
            .field("backend", &self.backend())
            .field("topology", &self.topology)
            .finish()
    }
}

/// Environment variables that MPI launchers set in the processes they start:
/// Open MPI's mpirun, MPICH/Hydra and Intel MPI (PMI), PMIx (Open MPI 5,
/// `srun --mpi=pmix`).
pub const LAUNCHER_VARS: [&str; 5] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

/// Whether an MPI launcher started this process.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

impl Comm {
    /// The one-rank world. Costs nothing; usable in unit tests.
    pub fn local() -> Self {
        Comm {
            inner: Inner::Local,
            topology: Topology::single(),
            segment_bytes: DEFAULT_SEGMENT_BYTES.into(),
        }
    }

    /// Sets up the world once per process. Under an MPI launcher (or with
    /// `mode = Mpi`) this initialises MPI and installs a panic hook that aborts
    /// the whole job, so that one rank's panic never leaves the others waiting
    /// in a collective.
    pub fn init(mode: CommMode) -> Result<Self, CommError> {
        let want_mpi = match mode {
            CommMode::Local => false,
            CommMode::Mpi => true,
            CommMode::Auto => launched_by_mpi(),
        };
        if !want_mpi {
            refuse_unwired_slurm_tasks()?;
            return Ok(Comm::local());
        }
        #[cfg(feature = "mpi")]
        {
            let world = mpi_world::MpiWorld::init()?;
            let topology = world.topology();
            if topology.size > 1 {
                install_abort_on_panic();
            }
            Ok(Comm {
                inner: Inner::Mpi(world),
                topology,
                segment_bytes: DEFAULT_SEGMENT_BYTES.into(),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            Err(CommError::Setup(
                "this sfron was built without the `mpi` feature but was started by an MPI \
                 launcher (or SFRON_COMM=mpi); rebuild with `launch/setup` (MPI on by default) \
                 or run without mpirun"
                    .into(),
            ))
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }
    pub fn rank(&self) -> usize {
        self.topology.rank
    }
    pub fn size(&self) -> usize {
        self.topology.size
    }
    pub fn local_rank(&self) -> usize {
        self.topology.local_rank
    }
    pub fn local_size(&self) -> usize {
        self.topology.local_size
    }
    pub fn is_root(&self) -> bool {
        self.topology.is_root()
    }

    /// "local" or "mpi".
    pub fn backend(&self) -> &'static str {
        match self.inner {
            Inner::Local => "local",
            #[cfg(feature = "mpi")]
            Inner::Mpi(_) => "mpi",
        }
    }

    /// The MPI library's own version string, if MPI is in use or compiled in.
    pub fn library_version() -> Option<String> {
        #[cfg(feature = "mpi")]
        {
            mpi_world::library_version()
        }
        #[cfg(not(feature = "mpi"))]
        {
            None
        }
    }

    pub fn barrier(&self) {
        match &self.inner {
            Inner::Local => {}
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.barrier(),
        }
    }

    /// Sets the piece size of large reductions (`comm.segment_kib`; 0: one call).
    pub fn set_segment_bytes(&self, bytes: usize) {
        self.segment_bytes.set(bytes);
    }

    pub fn segment_bytes(&self) -> usize {
        self.segment_bytes.get()
    }

    /// Element-wise all-reduce in place: every rank ends with the same values.
    ///
    /// A buffer above two segments is reduced in segment-sized pieces, all
    /// started at once (non-blocking) and tested as they go: each piece is
    /// summed while it is still in cache and the pieces pipeline, where one
    /// call over a buffer larger than the cache runs at a fraction of memory
    /// bandwidth (BENCHMARKS.md: 64 MiB over 2 ranks, about 2.4× the ring
    /// model in one call, 1.3-1.6× in 1 MiB pieces).
    pub fn reduce<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) {
        match &self.inner {
            Inner::Local => {
                let _ = (buf, op); // one rank: already the result
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => {
                let segment = self.segment_elements::<T>();
                if segment == 0 || buf.len() <= 2 * segment {
                    return w.all_reduce(buf, op);
                }
                let mut pending = Vec::with_capacity(buf.len().div_ceil(segment));
                // SAFETY: `buf` is borrowed for this whole call, and every
                // request is waited for before it ends.
                unsafe { start_pieces(w, buf.as_mut_ptr(), buf.len(), op, segment, &mut pending) };
                pending.into_iter().for_each(Request::wait);
            }
        }
    }

    /// Elements of `T` in one segment (0: no segments).
    #[cfg(feature = "mpi")]
    fn segment_elements<T>(&self) -> usize {
        self.segment_bytes.get() / std::mem::size_of::<T>()
    }

    /// Starts an element-wise sum of the `len` values at `ptr` across ranks,
    /// in place and non-blocking (`MPI_Iallreduce` with `MPI_IN_PLACE`), in
    /// segment-sized pieces as [`Comm::reduce`]; the requests join
    /// `pending`, whose requests in flight are tested (MPI progresses only
    /// inside its calls).
    ///
    /// # Safety
    /// `ptr` must point to `len` initialised values that stay allocated and
    /// are neither read nor written by anything else until every request
    /// pushed completes ([`Request::wait`], or its drop, which waits).
    pub unsafe fn start_sum<T: Scalar>(&self, ptr: *mut T, len: usize, pending: &mut Vec<Request>) {
        match &self.inner {
            Inner::Local => {
                let _ = (ptr, len, pending); // one rank: already the result
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => {
                let segment = match self.segment_elements::<T>() {
                    0 => len.max(1),
                    n => n,
                };
                // SAFETY: the caller's contract.
                unsafe { start_pieces(w, ptr, len, ReduceOp::Sum, segment, pending) };
            }
        }
    }

    /// The sum as rsmpi's safe API allows it (each chunk copied to a scratch
    /// buffer, reduced back): what sfron did before `MPI_IN_PLACE`, kept so
    /// that `sfron bench reduce` can measure against it.
    pub fn sum_via_scratch<T: Scalar>(&self, buf: &mut [T]) {
        match &self.inner {
            Inner::Local => {
                let _ = buf; // one rank: already the result
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.all_reduce_via_scratch(buf),
        }
    }

    /// Element-wise sum across ranks, in place.
    pub fn sum<T: Scalar>(&self, buf: &mut [T]) {
        self.reduce(buf, ReduceOp::Sum);
    }

    /// Element-wise mean across ranks, in place (the sum divided by the size).
    pub fn mean<T: Float>(&self, buf: &mut [T]) {
        if self.size() == 1 {
            return;
        }
        self.sum(buf);
        let n = T::from(u16::try_from(self.size()).expect("more than 65535 ranks"));
        for x in buf.iter_mut() {
            *x /= n;
        }
    }

    /// Sum of one scalar across ranks.
    pub fn sum_scalar<T: Scalar>(&self, x: T) -> T {
        let mut buf = [x];
        self.sum(&mut buf);
        buf[0]
    }

    /// True on every rank if `ok` is true on every rank (a MIN all-reduce).
    pub fn all_agree(&self, ok: bool) -> bool {
        let mut flag = [u8::from(ok)];
        self.reduce(&mut flag, ReduceOp::Min);
        flag[0] == 1
    }

    /// Copies `root`'s buffer into every rank's buffer (same length everywhere).
    pub fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) {
        match &self.inner {
            Inner::Local => {
                let _ = (buf, root); // one rank: already the result
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.broadcast(buf, root),
        }
    }

    /// Replaces every rank's bytes with `root`'s (lengths may differ).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) {
        if self.size() == 1 {
            return;
        }
        let mut len = [bytes.len() as i64];
        self.broadcast(&mut len, root);
        bytes.resize(len[0] as usize, 0);
        self.broadcast(bytes.as_mut_slice(), root);
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match &self.inner {
            Inner::Local => vec![bytes.to_vec()],
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.all_gather_bytes(bytes),
        }
    }

    /// Every rank's bytes, in rank order, on `root` (`None` on the others).
    pub fn gather_bytes(&self, bytes: &[u8], root: usize) -> Option<Vec<Vec<u8>>> {
        match &self.inner {
            Inner::Local => {
                let _ = root; // one rank: it is the root
                Some(vec![bytes.to_vec()])
            }
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.gather_bytes(bytes, root),
        }
    }

    /// Element-wise all-reduce of a tensor in place. Float, Double and Int64
    /// tensors on any device; CPU-contiguous tensors are reduced without a copy,
    /// others through a host buffer.
    pub fn reduce_tensor(&self, t: &mut Tensor, op: ReduceOp) -> Result<(), CommError> {
        if self.size() == 1 {
            return Ok(());
        }
        self.with_host_values(t, |comm, host| match host {
            HostSlice::F32(s) => comm.reduce(s, op),
            HostSlice::F64(s) => comm.reduce(s, op),
            HostSlice::I64(s) => comm.reduce(s, op),
        })
    }

    /// Element-wise sum of a tensor across ranks, in place.
    pub fn sum_tensor(&self, t: &mut Tensor) -> Result<(), CommError> {
        self.reduce_tensor(t, ReduceOp::Sum)
    }

    /// Element-wise mean of a floating-point tensor across ranks, in place.
    pub fn mean_tensor(&self, t: &mut Tensor) -> Result<(), CommError> {
        if self.size() == 1 {
            return Ok(());
        }
        self.with_host_values(t, |comm, host| match host {
            HostSlice::F32(s) => comm.mean(s),
            HostSlice::F64(s) => comm.mean(s),
            HostSlice::I64(_) => {}
        })?;
        if t.kind() == Kind::Int64 {
            return Err(self.collective_error("mean of an Int64 tensor is not defined"));
        }
        Ok(())
    }

    /// Copies `root`'s tensor into every rank's tensor (same shape and kind).
    pub fn broadcast_tensor(&self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        if self.size() == 1 {
            return Ok(());
        }
        self.with_host_values(t, |comm, host| match host {
            HostSlice::F32(s) => comm.broadcast(s, root),
            HostSlice::F64(s) => comm.broadcast(s, root),
            HostSlice::I64(s) => comm.broadcast(s, root),
        })
    }

    /// Splits the job into `world / size` groups of `size` consecutive
    /// ranks and returns this rank's group: an ordinary communicator over
    /// which the group runs its own model data-parallel (`comm.group_size`).
    /// Collectives on it involve only the group. It keeps this process's
    /// host placement (`local_rank`, `local_size`: the GPU and the threads
    /// stay the job's). Drop it before the job's communicator (MPI is
    /// finalised with the latter). A size that does not divide the world is
    /// refused.
    pub fn split_groups(&self, size: usize) -> Result<Group, CommError> {
        if size == 0 || !self.size().is_multiple_of(size) {
            return Err(CommError::Setup(format!(
                "comm.group_size = {size} does not divide the job's {} ranks into groups",
                self.size()
            )));
        }
        let index = self.rank() / size;
        let count = self.size() / size;
        let comm = match &self.inner {
            Inner::Local => Comm::local(),
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => {
                let group = w.split(size)?;
                let topology = group.topology();
                Comm {
                    inner: Inner::Mpi(group),
                    topology,
                    segment_bytes: self.segment_bytes.get().into(),
                }
            }
        };
        Ok(Group { comm, index, count })
    }

    /// Ends every rank of the job with `code`. Never returns.
    pub fn abort(&self, code: i32) -> ! {
        match &self.inner {
            Inner::Local => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Inner::Mpi(w) => w.abort(code),
        }
    }

    fn collective_error(&self, what: &str) -> CommError {
        CommError::Collective {
            rank: self.rank(),
            what: what.to_string(),
        }
    }

    /// Runs `f` on the tensor's values as a host slice and writes the result
    /// back when the tensor is not CPU-contiguous.
    fn with_host_values(
        &self,
        t: &mut Tensor,
        f: impl FnOnce(&Self, HostSlice<'_>),
    ) -> Result<(), CommError> {
        let kind = t.kind();
        if !matches!(kind, Kind::Float | Kind::Double | Kind::Int64) {
            return Err(self.collective_error(&format!(
                "tensors of kind {kind:?} are not reduced; use Float, Double or Int64"
            )));
        }
        let on_host = t.device() == tch::Device::Cpu && t.is_contiguous();
        let host = if on_host {
            t.shallow_clone()
        } else {
            t.to_device(tch::Device::Cpu).contiguous()
        };
        let numel = host.numel();
        let ptr = host.data_ptr();
        // SAFETY: `host` is a contiguous CPU tensor of `numel` elements of
        // `kind`, which we hold (and nothing else touches) for the whole call.
        let slice = unsafe {
            match kind {
                Kind::Float => {
                    HostSlice::F32(std::slice::from_raw_parts_mut(ptr as *mut f32, numel))
                }
                Kind::Double => {
                    HostSlice::F64(std::slice::from_raw_parts_mut(ptr as *mut f64, numel))
                }
                _ => HostSlice::I64(std::slice::from_raw_parts_mut(ptr as *mut i64, numel)),
            }
        };
        f(self, slice);
        if !on_host {
            t.copy_(&host);
        }
        Ok(())
    }
}

/// A reduction started by [`Comm::start_sum`]. Dropping it waits for it.
#[must_use = "a started reduction must be waited for"]
pub struct Request(
    #[cfg(feature = "mpi")] Option<mpi_world::Request>,
    #[cfg(not(feature = "mpi"))] Option<std::convert::Infallible>,
);

/// Starts the reduction of the `len` values at `ptr` in pieces of at most
/// `segment`, each joining `pending`, whose requests in flight are tested
/// after every start: Open MPI has no progress thread, so a non-blocking
/// reduction advances only inside MPI calls. Completed ones leave the list.
///
/// # Safety
/// As [`Comm::start_sum`].
#[cfg(feature = "mpi")]
unsafe fn start_pieces<T: Scalar>(
    w: &mpi_world::MpiWorld,
    ptr: *mut T,
    len: usize,
    op: ReduceOp,
    segment: usize,
    pending: &mut Vec<Request>,
) {
    let mut at = 0;
    while at < len {
        let n = segment.min(len - at);
        // SAFETY: the caller's contract covers these elements until every
        // request completes.
        let r = unsafe { w.start(std::slice::from_raw_parts_mut(ptr.add(at), n), op) };
        pending.push(Request(Some(r)));
        pending.retain_mut(|p| !p.test());
        at += n;
    }
}

impl Request {
    /// True once the reduction has completed; calling it lets MPI progress
    /// the reduction while the caller does other work.
    pub fn test(&mut self) -> bool {
        #[cfg(feature = "mpi")]
        if let Some(r) = &mut self.0
            && r.test()
        {
            self.0 = None;
        }
        self.0.is_none()
    }

    /// Blocks until the reduction has completed.
    pub fn wait(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        #[cfg(feature = "mpi")]
        if let Some(mut r) = self.0.take() {
            r.wait();
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.finish();
    }
}

enum HostSlice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    I64(&'a mut [i64]),
}

/// `srun` without an MPI plugin starts N independent processes that would all
/// believe they are rank 0 (and all write checkpoints). Refuse that.
fn refuse_unwired_slurm_tasks() -> Result<(), CommError> {
    let ntasks = std::env::var("SLURM_STEP_NUM_TASKS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1);
    if ntasks > 1 {
        return Err(CommError::Setup(format!(
            "SLURM started {ntasks} tasks but no MPI launcher variables are set; \
             start sfron with `srun --mpi=pmix` (or pmi2), or with mpirun inside the allocation"
        )));
    }
    Ok(())
}

/// A panic on one rank ends the job: print the usual message, then abort MPI
/// (with the bare bindings the other ranks would wait forever, rsmpi #197).
#[cfg(feature = "mpi")]
fn install_abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        mpi_world::abort_world(crate::exit::ERROR);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_world_is_rank_zero_of_one() {
        let comm = Comm::local();
        assert_eq!(comm.topology(), &Topology::single());
        assert!(comm.is_root());
        assert_eq!(comm.backend(), "local");
    }

    #[test]
    fn a_local_world_is_one_group_of_one_and_refuses_other_sizes() {
        let comm = Comm::local();
        let g = comm.split_groups(1).unwrap();
        assert_eq!((g.index, g.count, g.comm.size()), (0, 1, 1));
        for bad in [0, 2] {
            let e = comm.split_groups(bad).unwrap_err().to_string();
            assert!(
                e.contains("comm.group_size") && e.contains("1 ranks"),
                "{e}"
            );
        }
    }

    #[test]
    fn local_collectives_leave_values_alone() {
        let comm = Comm::local();
        let mut v = vec![1.5f32, -2.0, 3.25];
        comm.sum(&mut v);
        comm.mean(&mut v);
        comm.broadcast(&mut v, 0);
        assert_eq!(v, vec![1.5, -2.0, 3.25]);
        assert!(comm.all_agree(true));
        assert!(!comm.all_agree(false));
        assert_eq!(comm.all_gather_bytes(b"abc"), vec![b"abc".to_vec()]);
        let mut t = Tensor::from_slice(&[1.0f64, 2.0]);
        comm.sum_tensor(&mut t).unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn comm_mode_parse_names_the_variable_on_error() {
        assert_eq!(CommMode::parse("").unwrap(), CommMode::Auto);
        assert_eq!(CommMode::parse("mpi").unwrap(), CommMode::Mpi);
        assert_eq!(CommMode::parse("local").unwrap(), CommMode::Local);
        let err = CommMode::parse("gloo").unwrap_err().to_string();
        assert!(
            err.contains("SFRON_COMM=\"gloo\"") && err.contains("auto, mpi, local"),
            "{err}"
        );
    }
}
