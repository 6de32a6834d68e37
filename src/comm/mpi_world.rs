//! The MPI backend of [`super::Comm`]; compiled with the `mpi` feature.
//!
//! Every collective here runs on the main thread (MPI_THREAD_FUNNELED).
//! Reductions are truly in place (`MPI_IN_PLACE`, no scratch copy), blocking
//! or non-blocking. rsmpi's safe API has no `MPI_IN_PLACE`, so both go
//! through [`all_reduce_in_place`], the one function here that calls the raw
//! bindings; the constant itself comes from the real `<mpi.h>`
//! (`src/comm/in_place.c`, compiled by `build.rs`).

use std::os::raw::{c_int, c_void};

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

use super::{CommError, REDUCE_CHUNK, ReduceOp, Scalar, Topology};

unsafe extern "C" {
    /// `MPI_IN_PLACE` of the MPI library this binary links (in_place.c).
    fn sfron_mpi_in_place() -> *mut c_void;
}

/// Largest element count of one in-place reduction call (MPI counts are
/// 32-bit signed).
const MAX_COUNT: usize = 1 << 30;

/// An in-flight non-blocking reduction (`MPI_Request`).
pub(super) struct Request(ffi::MPI_Request);

impl Request {
    /// True once the reduction has completed (drives MPI's progress).
    pub(super) fn test(&mut self) -> bool {
        let mut flag: c_int = 0;
        // SAFETY: a request made by MPI_Iallreduce and not yet completed (a
        // completed one is MPI_REQUEST_NULL, which MPI_Test accepts).
        unsafe { ffi::MPI_Test(&mut self.0, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        flag != 0
    }

    /// Blocks until the reduction has completed.
    pub(super) fn wait(&mut self) {
        // SAFETY: as in `test`.
        unsafe { ffi::MPI_Wait(&mut self.0, ffi::RSMPI_STATUS_IGNORE) };
    }
}

/// `MPI_Allreduce(MPI_IN_PLACE, buf, …)`, or `MPI_Iallreduce` when `request`
/// is given: the one call of the raw bindings for reductions (audited).
///
/// Errors need no return code: the communicator keeps MPI's default handler,
/// MPI_ERRORS_ARE_FATAL, which aborts the job.
///
/// # Safety
/// With `request`, MPI keeps writing into `buf` after the call returns: the
/// caller must keep `buf` borrowed, unread and unwritten until the request
/// completes ([`super::Comm::start_sum`]'s contract; its callers wait for
/// every request before they return).
unsafe fn all_reduce_in_place<T: Scalar>(
    world: &SimpleCommunicator,
    buf: &mut [T],
    op: ReduceOp,
    request: Option<&mut ffi::MPI_Request>,
) {
    assert!(
        buf.len() <= MAX_COUNT,
        "one reduction call of {} elements",
        buf.len()
    );
    let count = buf.len() as c_int;
    let datatype = T::equivalent_datatype().as_raw();
    let op = match op {
        ReduceOp::Sum => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
    .as_raw();
    let recv = buf.as_mut_ptr().cast::<c_void>();
    // SAFETY: `recv` points to `count` initialised elements of `datatype`;
    // MPI_IN_PLACE makes it the send buffer too; the communicator is alive.
    unsafe {
        let send = sfron_mpi_in_place().cast_const();
        match request {
            None => ffi::MPI_Allreduce(send, recv, count, datatype, op, world.as_raw()),
            Some(r) => ffi::MPI_Iallreduce(send, recv, count, datatype, op, world.as_raw(), r),
        };
    }
}

pub(super) struct MpiWorld {
    // Dropping the universe finalises MPI; keep it last to drop after `world`.
    world: SimpleCommunicator,
    topology: Topology,
    /// The job's world holds the universe; a group (see [`MpiWorld::split`])
    /// holds none and must be dropped before the world.
    _universe: Option<Universe>,
}

pub(super) fn library_version() -> Option<String> {
    mpi::environment::library_version().ok().map(|v| {
        v.trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    })
}

/// Aborts `MPI_COMM_WORLD` with `code`, from anywhere (the panic hook).
pub(super) fn abort_world(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl MpiWorld {
    pub(super) fn init() -> Result<Self, CommError> {
        let (universe, provided) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                CommError::Setup("MPI was already initialised in this process".into())
            })?;
        if provided < Threading::Funneled {
            return Err(CommError::Setup(format!(
                "the MPI library provides thread level {provided:?}; sfron needs at least \
                 Funneled (MPI_THREAD_FUNNELED)"
            )));
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let node = world.split_shared(world.rank());
        let topology = Topology {
            rank,
            size,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
        };
        Ok(MpiWorld {
            world,
            topology,
            _universe: Some(universe),
        })
    }

    /// The communicator of this rank's group: ranks `g·size .. (g+1)·size`
    /// of this one, in order (`MPI_Comm_split` with colour `g`, key = rank).
    /// The group keeps this communicator's host placement (`local_rank`,
    /// `local_size`), which chooses the GPU and the threads of a process.
    pub(super) fn split(&self, size: usize) -> Result<Self, CommError> {
        let colour = (self.topology.rank / size) as i32;
        let world = self
            .world
            .split_by_color_with_key(Color::with_value(colour), self.topology.rank as i32)
            .ok_or_else(|| CommError::Setup("MPI_Comm_split gave no communicator".into()))?;
        let topology = Topology {
            rank: world.rank() as usize,
            size: world.size() as usize,
            ..self.topology.clone()
        };
        Ok(MpiWorld {
            world,
            topology,
            _universe: None,
        })
    }

    pub(super) fn topology(&self) -> Topology {
        self.topology.clone()
    }

    pub(super) fn barrier(&self) {
        self.world.barrier();
    }

    /// A blocking reduction in place, in one call per 2^30 elements.
    pub(super) fn all_reduce<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) {
        for chunk in buf.chunks_mut(MAX_COUNT) {
            // SAFETY: blocking: MPI is done with `chunk` when this returns.
            unsafe { all_reduce_in_place(&self.world, chunk, op, None) };
        }
    }

    /// Starts a reduction of `buf` in place.
    ///
    /// # Safety
    /// As [`all_reduce_in_place`] with a request: `buf` stays untouched
    /// until the returned request completes.
    pub(super) unsafe fn start<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) -> Request {
        // SAFETY: RSMPI_REQUEST_NULL is an initialised constant.
        let mut request = Request(unsafe { ffi::RSMPI_REQUEST_NULL });
        // SAFETY: the caller's contract.
        unsafe { all_reduce_in_place(&self.world, buf, op, Some(&mut request.0)) };
        request
    }

    /// The old reduction: chunks copied to a scratch buffer and reduced back
    /// (what rsmpi's safe API allows), kept to measure against.
    pub(super) fn all_reduce_via_scratch<T: Scalar>(&self, buf: &mut [T]) {
        let mut scratch: Vec<T> = Vec::with_capacity(buf.len().min(REDUCE_CHUNK));
        for chunk in buf.chunks_mut(REDUCE_CHUNK) {
            scratch.clear();
            scratch.extend_from_slice(chunk);
            self.world
                .all_reduce_into(&scratch[..], chunk, SystemOperation::sum());
        }
    }

    pub(super) fn broadcast<T: Scalar>(&self, buf: &mut [T], root: usize) {
        let root = self.world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(REDUCE_CHUNK) {
            root.broadcast_into(chunk);
        }
    }

    pub(super) fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let size = self.topology.size;
        let mut counts = vec![0i32; size];
        let count = i32::try_from(bytes.len()).expect("all_gather_bytes of more than 2 GiB");
        self.world.all_gather_into(&count, &mut counts[..]);
        let displs = displacements(&counts);
        let total: i32 = counts.iter().sum();
        let mut gathered = vec![0u8; total as usize];
        {
            let mut partition = PartitionMut::new(&mut gathered[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(bytes, &mut partition);
        }
        split_at(&gathered, &counts, &displs)
    }

    pub(super) fn gather_bytes(&self, bytes: &[u8], root: usize) -> Option<Vec<Vec<u8>>> {
        // Open MPI's MPI_Gatherv rejects a zero-length send from a non-root
        // rank (MPI_ERR_ARG): every rank sends one leading byte, dropped here.
        let mut sent = Vec::with_capacity(bytes.len() + 1);
        sent.push(0u8);
        sent.extend_from_slice(bytes);
        let size = self.topology.size;
        let count = i32::try_from(sent.len()).expect("gather_bytes of more than 2 GiB");
        let process = self.world.process_at_rank(root as i32);
        if self.topology.rank != root {
            process.gather_into(&count);
            process.gather_varcount_into(&sent[..]);
            return None;
        }
        let mut counts = vec![0i32; size];
        process.gather_into_root(&count, &mut counts[..]);
        let displs = displacements(&counts);
        let total: i32 = counts.iter().sum();
        let mut gathered = vec![0u8; total as usize];
        {
            let mut partition = PartitionMut::new(&mut gathered[..], &counts[..], &displs[..]);
            process.gather_varcount_into_root(&sent[..], &mut partition);
        }
        let parts = split_at(&gathered, &counts, &displs);
        Some(parts.into_iter().map(|mut p| p.split_off(1)).collect())
    }

    /// Aborts the whole job (`MPI_COMM_WORLD`), also from a group.
    pub(super) fn abort(&self, code: i32) -> ! {
        abort_world(code)
    }
}

/// Offsets of consecutive blocks of `counts` bytes.
fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |offset, &c| {
            let d = *offset;
            *offset += c;
            Some(d)
        })
        .collect()
}

/// The blocks of `gathered` at `displs`, `counts` long.
fn split_at(gathered: &[u8], counts: &[i32], displs: &[i32]) -> Vec<Vec<u8>> {
    counts
        .iter()
        .zip(displs)
        .map(|(&c, &d)| gathered[d as usize..(d + c) as usize].to_vec())
        .collect()
}
