//! The MPI backend of [`super::Comm`]; compiled with the `mpi` feature.
//!
//! Every collective here runs on the main thread (MPI_THREAD_FUNNELED).
//! Reductions are in place from the caller's point of view: rsmpi has no
//! `MPI_IN_PLACE`, so each chunk of at most [`super::REDUCE_CHUNK`] elements is
//! copied to a scratch buffer and reduced back into the caller's slice.

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{CommError, REDUCE_CHUNK, ReduceOp, Scalar, Topology};

pub(super) struct MpiWorld {
    // Dropping the universe finalises MPI; keep it last to drop after `world`.
    world: SimpleCommunicator,
    topology: Topology,
    _universe: Universe,
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
            _universe: universe,
        })
    }

    pub(super) fn topology(&self) -> Topology {
        self.topology.clone()
    }

    pub(super) fn barrier(&self) {
        self.world.barrier();
    }

    pub(super) fn all_reduce<T: Scalar>(&self, buf: &mut [T], op: ReduceOp) {
        let op = match op {
            ReduceOp::Sum => SystemOperation::sum(),
            ReduceOp::Max => SystemOperation::max(),
            ReduceOp::Min => SystemOperation::min(),
        };
        let mut scratch: Vec<T> = Vec::with_capacity(buf.len().min(REDUCE_CHUNK));
        for chunk in buf.chunks_mut(REDUCE_CHUNK) {
            scratch.clear();
            scratch.extend_from_slice(chunk);
            self.world.all_reduce_into(&scratch[..], chunk, op);
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

    pub(super) fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
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
