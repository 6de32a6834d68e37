//! Bucketed gradient reductions: the flat gradient buffer is cut into
//! buckets at parameter boundaries, and each bucket's sum starts as soon as
//! the bucket is filled, in place and non-blocking, while the next bucket is
//! being filled (PyTorch DDP's scheme, without autograd hooks: the buckets
//! are filled after the backward pass, so copying and reducing overlap, not
//! reducing and back-propagating).
//!
//! Buckets are made walking the parameters from last to first, the order in
//! which a backward pass produces their gradients: the first bucket is small
//! (1 MiB by default) so that the wire is busy early, the others are capped at
//! 25 MiB (DDP's defaults). A parameter larger than the cap is a bucket of its
//! own.
//!
//! Data planes: on the CPU the buffer itself is summed through MPI; on GPUs
//! NCCL sums the device buffer ([`super::nccl`]); without NCCL each bucket is
//! copied to a pinned host buffer, summed through MPI, and the whole buffer
//! copied back once.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::nccl::Nccl;
use super::{Comm, CommError, Request};
pub use crate::config::raw::GpuPlane;

/// How the flat buffer is reduced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// One blocking call for the whole buffer, after filling all of it.
    Single,
    /// One blocking call per parameter, right after filling it.
    PerTensor,
    /// Non-blocking calls per bucket (sizes in bytes).
    Buckets { first: usize, cap: usize },
}

impl Strategy {
    /// Buckets of `cap_mib` MiB after a first one of `first_mib` MiB; a cap
    /// of 0 means one call for everything.
    pub fn from_mib(first_mib: f64, cap_mib: f64) -> Self {
        if cap_mib <= 0.0 {
            return Strategy::Single;
        }
        let bytes = |mib: f64| (mib * 1024.0 * 1024.0) as usize;
        Strategy::Buckets {
            first: bytes(first_mib.min(cap_mib)).max(1),
            cap: bytes(cap_mib).max(1),
        }
    }
}

/// One bucket: the parameters in it and their elements in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices (into the flat order), last first.
    pub members: Vec<usize>,
    /// Whether the statistics after the last parameter ride in this bucket.
    pub tail: bool,
    pub range: Range<usize>,
}

/// Where each of consecutive blocks of `sizes` elements starts.
pub fn offsets(sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .scan(0, |o, &n| {
            let start = *o;
            *o += n;
            Some(start)
        })
        .collect()
}

/// The buckets of a flat buffer of `f32` holding parameters of `sizes`
/// elements in order, then `tail` more elements; in reduction order.
pub fn plan(sizes: &[usize], tail: usize, strategy: Strategy) -> Vec<Bucket> {
    let offsets = offsets(sizes);
    let total: usize = sizes.iter().sum::<usize>() + tail;
    let (first, cap) = match strategy {
        Strategy::Single => {
            return vec![Bucket {
                members: (0..sizes.len()).rev().collect(),
                tail: true,
                range: 0..total,
            }];
        }
        Strategy::PerTensor => (1, 1),
        Strategy::Buckets { first, cap } => (first, cap),
    };
    let mut buckets = Vec::new();
    let mut current = Bucket {
        members: Vec::new(),
        tail: true,
        range: total..total,
    };
    let bytes = |r: &Range<usize>| r.len() * std::mem::size_of::<f32>();
    for i in (0..sizes.len()).rev() {
        let limit = if buckets.is_empty() { first } else { cap };
        if !current.members.is_empty() && bytes(&current.range) + 4 * sizes[i] > limit {
            let start = current.range.start;
            buckets.push(std::mem::replace(
                &mut current,
                Bucket {
                    members: Vec::new(),
                    tail: false,
                    range: start..start,
                },
            ));
        }
        current.members.push(i);
        current.range.start = offsets[i];
    }
    current.range.start = 0;
    buckets.push(current);
    buckets
}

/// Where the sums are computed.
enum Plane {
    /// The buffer is in host memory: MPI sums it where it is.
    Host,
    /// GPU buffer, MPI through a pinned host copy.
    Staged { host: Tensor },
    /// GPU buffer, NCCL (shared with global BatchNorm's sums).
    Nccl(std::rc::Rc<Nccl>),
}

/// Reduces one flat `f32` buffer, bucket by bucket, on a fixed data plane.
pub struct Reducer {
    buckets: Vec<Bucket>,
    strategy: Strategy,
    plane: Plane,
}

impl Reducer {
    /// A reducer of flat buffers on `device` holding parameters of `sizes`
    /// elements and `tail` more, cut by `strategy` (see [`plan`]).
    /// Collective: every rank calls it.
    pub fn new(
        comm: &Comm,
        sizes: &[usize],
        tail: usize,
        strategy: Strategy,
        device: Device,
        gpu: GpuPlane,
    ) -> Result<Self, CommError> {
        let buckets = plan(sizes, tail, strategy);
        let numel = sizes.iter().sum::<usize>() + tail;
        let plane = match device {
            Device::Cuda(index) if comm.size() > 1 => {
                let nccl = match gpu {
                    GpuPlane::Mpi => Err("comm.gpu_plane = \"mpi\"".to_string()),
                    GpuPlane::Auto | GpuPlane::Nccl => Nccl::init(comm, index),
                };
                match nccl {
                    Ok(n) => {
                        if comm.is_root() {
                            tracing::info!(version = %n.version, "gradients summed by NCCL");
                        }
                        Plane::Nccl(std::rc::Rc::new(n))
                    }
                    Err(why) if gpu == GpuPlane::Nccl => {
                        return Err(CommError::Setup(format!(
                            "comm.gpu_plane = \"nccl\" but {why}; use \"auto\" to fall back \
                             to pinned host buffers through MPI"
                        )));
                    }
                    Err(why) => {
                        if comm.is_root() {
                            tracing::warn!(
                                reason = %why,
                                "gradients summed through MPI from pinned host buffers (no NCCL)"
                            );
                        }
                        let host = Tensor::zeros([numel as i64], (Kind::Float, Device::Cpu))
                            .pin_memory(device);
                        Plane::Staged { host }
                    }
                }
            }
            _ => Plane::Host,
        };
        Ok(Reducer {
            buckets,
            strategy,
            plane,
        })
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The NCCL communicator of the gradients, if that is the plane.
    pub fn nccl(&self) -> Option<std::rc::Rc<Nccl>> {
        match &self.plane {
            Plane::Nccl(n) => Some(n.clone()),
            _ => None,
        }
    }

    /// "host", "pinned host + MPI" or "nccl".
    pub fn plane(&self) -> &'static str {
        match self.plane {
            Plane::Host => "mpi",
            Plane::Staged { .. } => "pinned host + mpi",
            Plane::Nccl(_) => "nccl",
        }
    }

    /// Sums `flat` (contiguous `f32`, on the reducer's device) across ranks
    /// in place: for each bucket in order `fill(bucket)` writes its values,
    /// then its sum starts. Returns when every sum has completed (on NCCL:
    /// when every sum is enqueued on the stream libtorch's kernels use).
    pub fn sum(
        &mut self,
        comm: &Comm,
        flat: &Tensor,
        mut fill: impl FnMut(&Bucket),
    ) -> Result<(), CommError> {
        assert!(flat.is_contiguous() && flat.kind() == Kind::Float);
        if comm.size() == 1 {
            self.buckets.iter().for_each(&mut fill);
            return Ok(());
        }
        // PerTensor stands for the classic loop of one blocking call per tensor.
        let blocking = self.strategy == Strategy::PerTensor;
        let mut pending: Vec<Request> = Vec::new();
        // SAFETY (both MPI planes): `base` is a contiguous f32 host tensor
        // that outlives this call; buckets are disjoint ranges of it, `fill`
        // writes only its own bucket, so no range under reduction is
        // touched; every request is completed before returning (and a
        // request waits when dropped, should `fill` panic).
        let start = |pending: &mut Vec<Request>, base: *mut f32, b: &Bucket| unsafe {
            comm.start_sum(base.add(b.range.start), b.range.len(), pending);
            if blocking {
                pending.drain(..).for_each(Request::wait);
            }
        };
        match &self.plane {
            Plane::Host => {
                let base = flat.data_ptr() as *mut f32;
                for b in &self.buckets {
                    fill(b);
                    start(&mut pending, base, b);
                }
            }
            Plane::Staged { host } => {
                let base = host.data_ptr() as *mut f32;
                for b in &self.buckets {
                    fill(b);
                    let (at, len) = (b.range.start as i64, b.range.len() as i64);
                    host.narrow(0, at, len).copy_(&flat.narrow(0, at, len));
                    start(&mut pending, base, b);
                }
                pending.drain(..).for_each(Request::wait);
                flat.shallow_clone().copy_(host);
            }
            Plane::Nccl(nccl) => {
                let base = flat.data_ptr() as *mut f32;
                for b in &self.buckets {
                    fill(b);
                    // SAFETY: `flat` is contiguous f32 device memory on this
                    // rank's GPU, alive beyond the enqueued reduction (it is
                    // the engine's long-lived buffer).
                    unsafe { nccl.sum_f32(base.add(b.range.start), b.range.len()) }.map_err(
                        |what| CommError::Collective {
                            rank: comm.rank(),
                            what,
                        },
                    )?;
                }
            }
        }
        pending.drain(..).for_each(Request::wait);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(b: &[Bucket]) -> Vec<(Vec<usize>, Range<usize>, bool)> {
        b.iter()
            .map(|b| (b.members.clone(), b.range.clone(), b.tail))
            .collect()
    }

    #[test]
    fn buckets_walk_from_the_last_parameter_with_a_small_first_one() {
        // Parameters of 100, 300, 50, 200, 10 floats; tail of 4.
        let sizes = [100, 300, 50, 200, 10];
        let b = plan(
            &sizes,
            4,
            Strategy::Buckets {
                first: 4 * 20,
                cap: 4 * 400,
            },
        );
        assert_eq!(
            ranges(&b),
            vec![
                (vec![4], 650..664, true),
                (vec![3, 2], 400..650, false),
                (vec![1, 0], 0..400, false),
            ]
        );
        // Every element is in exactly one bucket.
        let covered: usize = b.iter().map(|b| b.range.len()).sum();
        assert_eq!(covered, 664);
    }

    #[test]
    fn a_parameter_larger_than_the_cap_is_a_bucket_of_its_own() {
        let b = plan(&[10, 1000, 10], 0, Strategy::Buckets { first: 4, cap: 400 });
        assert_eq!(
            ranges(&b),
            vec![
                (vec![2], 1010..1020, true),
                (vec![1], 10..1010, false),
                (vec![0], 0..10, false),
            ]
        );
    }

    #[test]
    fn single_and_per_tensor_strategies() {
        let single = plan(&[3, 4], 2, Strategy::Single);
        assert_eq!(ranges(&single), vec![(vec![1, 0], 0..9, true)]);
        let per = plan(&[3, 4], 2, Strategy::PerTensor);
        assert_eq!(
            ranges(&per),
            vec![(vec![1], 3..9, true), (vec![0], 0..3, false)]
        );
        assert_eq!(Strategy::from_mib(1.0, 0.0), Strategy::Single);
        assert_eq!(
            Strategy::from_mib(1.0, 25.0),
            Strategy::Buckets {
                first: 1 << 20,
                cap: 25 << 20
            }
        );
    }

    #[test]
    fn one_rank_fills_every_bucket_in_order() {
        let comm = Comm::local();
        let mut reducer = Reducer::new(
            &comm,
            &[3, 4, 5],
            1,
            Strategy::PerTensor,
            Device::Cpu,
            GpuPlane::Auto,
        )
        .unwrap();
        let flat = Tensor::zeros([13], (Kind::Float, Device::Cpu));
        let mut order = Vec::new();
        reducer
            .sum(&comm, &flat, |b| order.push(b.members.clone()))
            .unwrap();
        assert_eq!(order, vec![vec![2], vec![1], vec![0]]);
        assert_eq!(reducer.plane(), "mpi");
    }
}
