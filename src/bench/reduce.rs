//! `sfron bench reduce`: all-reduce times against the ring model.
//!
//! The model: a ring all-reduce of `n` bytes over `p` ranks moves
//! `2(p−1)/p · n` bytes through each rank (reduce-scatter, then all-gather)
//! and adds `(p−1)/p · n` bytes, after a fixed start-up cost, so
//!
//! `T(n) = L + 2(p−1)/p · n / B_copy + (p−1)/p · n / B_add`
//!
//! with `L` the time of a 4-byte reduction, `B_copy` the bandwidth of a
//! memcpy loop and `B_add` that of an `a += b` loop, all measured in the same
//! run with every rank copying or adding at once (ranks on one host share
//! the memory bus). On one host, memory is the wire.
//!
//! Rows: buffer sizes from 1 KiB to 128 MiB, each summed in place in one
//! call, through the old scratch copy, and in place in segments; then the
//! gradient buffers of ResNet-18 and ResNet-50 filled from their
//! parameters' gradients and summed in one call, one call per tensor, and
//! in buckets (the fill is part of those times, not of the model's).

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::comm::buckets::{self, GpuPlane, Reducer, Strategy};
use crate::comm::{Comm, ReduceOp};
use crate::model::{Arch, Model};

/// One timed configuration.
#[derive(Debug, serde::Serialize)]
pub struct ReduceRow {
    pub bench: &'static str,
    pub ranks: usize,
    /// Buffer size in bytes.
    pub bytes: usize,
    /// What was summed: `buffer` or a model's gradients.
    pub what: String,
    /// Buffers: `one_call` (in place), `scratch` (the old copy-and-reduce),
    /// `segmented` ([`Comm::reduce`]: in place, in pieces); gradients:
    /// `one_call`, `per_tensor` (a blocking call per parameter), `buckets`.
    pub how: &'static str,
    pub ms: f64,
    pub model_ms: f64,
    /// ms / model_ms (goal ≤ 1.1).
    pub ratio: f64,
    /// Algorithm bandwidth: bytes / time.
    pub gb_per_s: f64,
}

/// The ring model's constants, measured.
#[derive(Debug, serde::Serialize)]
pub struct RingModel {
    pub bench: &'static str,
    pub ranks: usize,
    /// Seconds of a 4-byte sum.
    pub latency_s: f64,
    pub copy_bytes_per_s: f64,
    pub add_bytes_per_s: f64,
}

impl RingModel {
    pub fn seconds(&self, bytes: usize) -> f64 {
        let p = self.ranks as f64;
        let n = bytes as f64;
        self.latency_s
            + 2.0 * (p - 1.0) / p * n / self.copy_bytes_per_s
            + (p - 1.0) / p * n / self.add_bytes_per_s
    }
}

/// Median seconds of `f` over `reps` runs, each started together on every
/// rank; the slowest rank's median.
fn time(comm: &Comm, reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm: pages touched, MPI's paths set up
    let mut xs: Vec<f64> = (0..reps)
        .map(|_| {
            comm.barrier();
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    xs.sort_by(f64::total_cmp);
    let mut m = [xs[xs.len() / 2]];
    comm.reduce(&mut m, ReduceOp::Max);
    m[0]
}

/// `f` with reductions in one call (no segments), the way a plain
/// `MPI_Allreduce` loop would run.
fn one_call<R>(comm: &Comm, f: impl FnOnce() -> R) -> R {
    let segment = comm.segment_bytes();
    comm.set_segment_bytes(0);
    let r = f();
    comm.set_segment_bytes(segment);
    r
}

/// Repetitions for a buffer of `bytes`: about 0.5 GB moved, 5 to 200 runs.
fn reps(bytes: usize) -> usize {
    (500_000_000 / bytes.max(1)).clamp(5, 200)
}

/// Measures the ring model's constants on this job.
pub fn ring_model(comm: &Comm) -> RingModel {
    let mut one = [1.0f32];
    let latency_s = time(comm, 500, || comm.sum(&mut one));
    const N: usize = 16 << 20; // 64 MiB of f32
    let src = vec![1.0f32; N];
    let mut dst = vec![0.0f32; N];
    let copy = time(comm, 10, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    });
    let add = time(comm, 10, || {
        for (d, s) in dst.iter_mut().zip(&src) {
            *d += *s;
        }
        std::hint::black_box(&dst);
    });
    let bytes = (N * 4) as f64;
    RingModel {
        bench: "ring_model",
        ranks: comm.size(),
        latency_s,
        copy_bytes_per_s: bytes / copy,
        add_bytes_per_s: bytes / add,
    }
}

fn row(model: &RingModel, bytes: usize, what: String, how: &'static str, s: f64) -> ReduceRow {
    let model_s = model.seconds(bytes);
    ReduceRow {
        bench: "reduce",
        ranks: model.ranks,
        bytes,
        what,
        how,
        ms: 1e3 * s,
        model_ms: 1e3 * model_s,
        ratio: s / model_s,
        gb_per_s: bytes as f64 / s / 1e9,
    }
}

/// Sums a plain buffer of every size in `sizes` (bytes) three ways.
pub fn buffers(comm: &Comm, model: &RingModel, sizes: &[usize]) -> Result<Vec<ReduceRow>> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        let n = (bytes / 4).max(1);
        let mut buf = vec![1.0f32; n];
        let r = reps(bytes);
        let s = one_call(comm, || time(comm, r, || comm.sum(&mut buf)));
        rows.push(row(model, bytes, "buffer".into(), "one_call", s));
        let s = time(comm, r, || comm.sum_via_scratch(&mut buf));
        rows.push(row(model, bytes, "buffer".into(), "scratch", s));
        let s = time(comm, r, || comm.sum(&mut buf));
        rows.push(row(model, bytes, "buffer".into(), "segmented", s));
    }
    Ok(rows)
}

/// Fills a model's flat gradient buffer from per-parameter gradients and
/// sums it: one call, one call per tensor, buckets.
pub fn gradients(
    comm: &Comm,
    model: &RingModel,
    arch: Arch,
    classes: i64,
    strategy: Strategy,
) -> Result<Vec<ReduceRow>> {
    let net = Model::new(arch.clone(), 3, classes, Device::Cpu);
    let grads: Vec<Tensor> = net
        .parameters()
        .iter()
        .map(|(_, p)| Tensor::randn(p.size(), (Kind::Float, Device::Cpu)))
        .collect();
    let sizes: Vec<usize> = grads.iter().map(Tensor::numel).collect();
    let total: usize = sizes.iter().sum();
    let bytes = 4 * total;
    let what = format!("{} gradients", arch.name());
    let flat = Tensor::zeros([total as i64], (Kind::Float, Device::Cpu));
    let offsets = buckets::offsets(&sizes);
    let mut rows = Vec::new();
    for (how, strategy, segmented) in [
        ("one_call", Strategy::Single, false),
        ("per_tensor", Strategy::PerTensor, false),
        ("buckets", strategy, true),
    ] {
        let mut reducer = Reducer::new(comm, &sizes, 0, strategy, Device::Cpu, GpuPlane::Mpi)?;
        let mut sum = || {
            time(comm, reps(bytes).min(20), || {
                reducer
                    .sum(comm, &flat, |b| {
                        for &i in &b.members {
                            flat.narrow(0, offsets[i] as i64, sizes[i] as i64)
                                .copy_(&grads[i].reshape([-1]));
                        }
                    })
                    .expect("host reduction");
            })
        };
        let s = if segmented {
            sum()
        } else {
            one_call(comm, sum)
        };
        rows.push(row(model, bytes, what.clone(), how, s));
    }
    Ok(rows)
}
