//! The step skeleton every training and unlearning method shares:
//! backward → one reduction → agree → edit (mask, clip) → optimizer step,
//! with the non-finite policy, the preemption flag and rank-0 authority.
//!
//! Distribution scheme (DESIGN §1.4): gradients and the step's statistics go
//! into one flat buffer that is summed across ranks bucket by bucket, each
//! bucket's reduction running while the next is filled
//! ([`crate::comm::buckets`]; `comm.bucket_mib = 0` makes it one call);
//! every rank then
//! applies the same update to the same weights with the same reduced
//! gradient, so weights stay bit-identical without sending them. Rank 0's
//! state is broadcast at start and resume, BatchNorm buffers (updated from
//! each rank's own batch) are broadcast from rank 0 after every step, and a
//! digest of every rank's state is compared at each checkpoint (and every
//! `train.verify_every` steps), so a divergence is caught, never carried.
//! Cost per step: one all-reduce of the gradient (the minimum any
//! data-parallel scheme pays) plus a broadcast of the BN buffers (0.04% of
//! ResNet-50's state); the reduce → rank-0 update → broadcast alternative
//! would add a full broadcast of the weights.
//!
//! Non-finite steps are decided on the *reduced* buffer: a NaN on one rank
//! reaches every rank through the sum, so all ranks skip together.

pub mod checkpoint;
pub mod ema;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod signals;

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Reduction, Tensor};

use crate::comm::Comm;
use crate::comm::buckets::{Reducer, Strategy};
use crate::config::BatchNormPlan;
use crate::config::raw::{BatchNormMode, CommSection};
use crate::data::Batch;
use crate::model::Model;
use crate::model::norm::{NormSync, StatSum};
use crate::model::recompute::{self, Recompute};
pub use optim::Optimizer;

/// Slots after the gradient in the flat buffer.
const TAIL: i64 = 4;

/// This rank's statistics of the batch it just back-propagated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local {
    pub loss_sum: f64,
    pub correct: f64,
    pub count: f64,
}

/// How the reduced gradient is scaled before the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// The backward pass was of a *sum* over samples: divide by the global
    /// sample count (the gradient of the mean over the global batch).
    MeanOverCount,
    /// The backward pass was already globally normalised: use the sum.
    Sum,
}

/// What is done to the reduced gradient before the optimizer step.
#[derive(Default)]
pub struct Edit<'a> {
    /// Multiply by this flat mask (or soft weights).
    pub mask: Option<&'a Tensor>,
    /// Then clip the global L2 norm to this, as `clip_grad_norm_` does.
    pub clip: Option<f64>,
    /// With `mask`: parameters the mask zeroes stay exactly where they are
    /// (weight decay and momentum do not move them either).
    pub freeze_masked: bool,
    /// Clip before masking (the DDPM release's SalUn step) instead of after.
    pub clip_first: bool,
}

/// PyTorch's `clip_grad_norm_` divides by `norm + 1e-6`.
const CLIP_EPS: f64 = 1e-6;

/// What a step did, as every rank agreed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Sum over ranks of [`Local`].
    pub loss_sum: f64,
    pub correct: f64,
    pub count: f64,
    /// The update was applied (false: non-finite, skipped).
    pub applied: bool,
    /// Some rank was asked to stop (SIGTERM/SIGUSR1).
    pub stop: bool,
    /// L2 norm of the reduced, scaled gradient before any edit.
    pub grad_norm: f64,
    /// L2 norm of the gradient the optimizer stepped with: after the mask
    /// and the clipping of [`Engine::finish`] (0 when the step was skipped).
    pub step_norm: f64,
}

impl Outcome {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1.0)
    }
}

/// Running sums of a stream's step outcomes between two metrics lines.
#[derive(Default)]
pub struct Window {
    pub loss: f64,
    pub correct: f64,
    /// Samples.
    pub count: f64,
    pub steps: u64,
    pub step_norm: f64,
}

impl Window {
    pub fn add(&mut self, o: &Outcome) {
        self.loss += o.loss_sum;
        self.correct += o.correct;
        self.count += o.count;
        self.steps += 1;
        self.step_norm += o.step_norm;
    }

    /// Mean L2 norm of the gradients stepped with ([`Outcome::step_norm`]).
    pub fn grad_norm(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.step_norm / self.steps as f64)
    }

    pub fn loss(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.loss / self.count)
    }

    pub fn acc(&self) -> Option<f64> {
        (self.count > 0.0).then(|| 100.0 * self.correct / self.count)
    }
}

/// The model's parameters, the flat reduction buffer and the optimizer.
pub struct Engine<'a> {
    comm: &'a Comm,
    pub names: Vec<String>,
    pub params: Vec<Tensor>,
    /// Non-trainable state (BatchNorm running statistics).
    buffers: Vec<Tensor>,
    flat: Tensor,
    grads: Vec<Tensor>,
    /// This rank's gradients from [`Engine::backward`] since the last
    /// [`Engine::zero_grad`], per parameter (undefined: none reached it).
    local_grads: Vec<Tensor>,
    numel: i64,
    reducer: Reducer,
    pub optimizer: Optimizer,
    /// `Some(n)`: skip non-finite steps, fail after n in a row; `None`: fail at once.
    max_skips: Option<u32>,
    pub skips_in_row: u32,
    pub skips_total: u64,
    /// The configuration section of the non-finite policy, for messages.
    pub section: &'static str,
    stop: signals::StopFlag,
    /// Seconds spent filling and summing the gradient buffer and
    /// broadcasting the BatchNorm buffers (the distribution scheme's cost),
    /// since the engine was made.
    pub comm_seconds: f64,
    /// The model's BatchNorm sync while it is global (cleared on drop), and
    /// the count and bytes of its sums so far.
    global_norm: Option<(NormSync, std::sync::Arc<SumCounts>)>,
    /// The model's queue of deferred trunks, attached while the engine
    /// lives (detached on drop).
    recompute: Recompute,
}

/// Global BatchNorm's sums so far: calls and bytes.
#[derive(Default)]
pub struct SumCounts {
    pub calls: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl Drop for Engine<'_> {
    fn drop(&mut self) {
        if let Some((norm, _)) = &self.global_norm {
            norm.set(None);
        }
        self.recompute.detach();
    }
}

/// Global BatchNorm's cross-rank sums ([`StatSum`]): on the gradients' NCCL
/// communicator for CUDA tensors when that is their plane, else through MPI
/// (via host memory for CUDA tensors).
struct CommSum {
    comm: *const Comm,
    nccl: Option<std::rc::Rc<crate::comm::nccl::Nccl>>,
    counts: std::sync::Arc<SumCounts>,
}

// SAFETY: `comm` is the job's communicator, made in `app::run` before any
// model and dropped after every command returned: it outlives the engine
// that installs this (which clears it on drop) and any backward pass of a
// step the engine ran. The sums are made on the thread that runs the step's
// forward and backward passes (for CPU tensors the main thread; for CUDA,
// libtorch's device thread while the main thread waits in the backward),
// one at a time. `nccl` is cloned and dropped on the main thread only
// (made in Engine::new, dropped with the engine: NormSync::set(None)).
unsafe impl Send for CommSum {}
unsafe impl Sync for CommSum {}

impl StatSum for CommSum {
    fn sum(&self, t: &mut Tensor) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts.calls.fetch_add(1, Relaxed);
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        self.counts.bytes.fetch_add(bytes as u64, Relaxed);
        if let (Some(nccl), Device::Cuda(_)) = (&self.nccl, t.device()) {
            assert!(t.is_contiguous() && t.kind() == Kind::Double);
            // SAFETY: a contiguous double tensor on this rank's GPU, alive
            // until the stream reaches the sum (its owner reads it next).
            return unsafe { nccl.sum_f64(t.data_ptr() as *mut f64, t.numel()) };
        }
        // SAFETY: see the type's Send/Sync note.
        let comm = unsafe { &*self.comm };
        comm.sum_tensor(t).map_err(|e| e.to_string())
    }
}

impl<'a> Engine<'a> {
    /// An engine for `model` (its parameters, a flat gradient buffer, the
    /// optimizer). With `batchnorm` global and more than one rank, the
    /// model's BatchNorm layers normalise over the global batch from now on
    /// until the engine drops.
    pub fn new(
        comm: &'a Comm,
        model: &Model,
        optimizer: Optimizer,
        max_skips: Option<u32>,
        stop: signals::StopFlag,
        reduction: &CommSection,
        batchnorm: BatchNormPlan,
    ) -> Result<Self> {
        let (names, params): (Vec<String>, Vec<Tensor>) = model.parameters().into_iter().unzip();
        let buffers: Vec<Tensor> = model
            .state()
            .into_iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t)
            .collect();
        let numel: i64 = params.iter().map(Tensor::numel).sum::<usize>() as i64;
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let flat = Tensor::zeros([numel + TAIL], (Kind::Float, device));
        let mut offset = 0;
        let grads = params
            .iter()
            .map(|p| {
                let n = p.numel() as i64;
                let view = flat.narrow(0, offset, n).view(p.size().as_slice());
                offset += n;
                view
            })
            .collect();
        let sizes: Vec<usize> = params.iter().map(Tensor::numel).collect();
        let strategy = Strategy::from_mib(reduction.first_bucket_mib, reduction.bucket_mib);
        let reducer = Reducer::new(
            comm,
            &sizes,
            TAIL as usize,
            strategy,
            device,
            reduction.gpu_plane,
        )?;
        let global_norm = global_batchnorm(comm, model, batchnorm, &buffers, &reducer);
        let recompute = model.recompute_queue().clone();
        recompute.attach();
        Ok(Engine {
            comm,
            names,
            params,
            buffers,
            flat,
            grads,
            local_grads: Vec::new(),
            numel,
            reducer,
            optimizer,
            max_skips,
            skips_in_row: 0,
            skips_total: 0,
            section: "train",
            stop,
            comm_seconds: 0.0,
            global_norm,
            recompute,
        })
    }

    /// Global BatchNorm's sums so far (calls, bytes); `None`: BatchNorm is
    /// not global here.
    pub fn batchnorm_sums(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        self.global_norm
            .as_ref()
            .map(|(_, c)| (c.calls.load(Relaxed), c.bytes.load(Relaxed)))
    }

    /// The data plane of the gradient sums, for logs.
    pub fn data_plane(&self) -> &'static str {
        self.reducer.plane()
    }

    /// This rank was asked to stop (SIGTERM/SIGUSR1); ranks agree through a reduction.
    pub fn stop_requested(&self) -> bool {
        self.stop.is_set()
    }

    pub fn comm(&self) -> &Comm {
        self.comm
    }

    /// The reduced gradient, flat (valid between [`Engine::reduce`] and the step).
    pub fn flat_grad(&self) -> Tensor {
        self.flat.narrow(0, 0, self.numel)
    }

    /// The reduced gradient per parameter (views into the flat buffer).
    pub fn grads(&self) -> &[Tensor] {
        &self.grads
    }

    /// Forgets this rank's gradients (before a backward pass).
    /// Trunks deferred by forward passes never back-propagated are dropped.
    pub fn zero_grad(&mut self) {
        self.local_grads.clear();
        self.recompute.clear();
    }

    /// Back-propagates `loss` into this rank's gradients of the parameters.
    ///
    /// The gradients come back from the autograd engine as fresh tensors
    /// (`torch.autograd.grad`), never accumulated into `.grad`: no zeroing
    /// pass and no `grad += g` pass per step, which is what PyTorch's
    /// `zero_grad(set_to_none=True)` saves (about 12% of a ResNet-18 step
    /// on one CPU thread). A second call before [`Engine::zero_grad`] adds.
    ///
    /// Trunks the model's forward passes deferred (activation checkpointing,
    /// [`crate::model::recompute`]) are recomputed here.
    pub fn backward(&mut self, loss: &Tensor) {
        let fresh = self.recompute.backward(loss, &self.params);
        if self.local_grads.is_empty() {
            self.local_grads = fresh;
            return;
        }
        recompute::add_into(&mut self.local_grads, fresh);
    }

    /// This rank's gradient of parameter `i` from the backward passes since
    /// the last [`Engine::zero_grad`] (`None`: it got none).
    pub fn local_grad(&self, i: usize) -> Option<&Tensor> {
        defined_grad(&self.local_grads, i)
    }

    /// This rank's gradients since the last [`Engine::zero_grad`], flat in
    /// parameter order (zeros where a parameter got none).
    pub fn flat_local_grad(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match self.local_grad(i) {
                Some(g) => g.reshape([-1]),
                None => p.zeros_like().reshape([-1]),
            })
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Gathers this rank's gradients ([`Engine::backward`]) and `local` into the flat buffer and
    /// sums it across ranks bucket by bucket, then scales by `scale`.
    /// Parameters that got no gradient contribute zeros.
    pub fn reduce(&mut self, local: Local, scale: Scale) -> Result<Outcome> {
        let asked = self.stop.is_set();
        let tail = Tensor::from_slice(&[
            local.loss_sum as f32,
            local.correct as f32,
            local.count as f32,
            f32::from(u8::from(asked)),
        ]);
        let (local_grads, grads, flat, numel) =
            (&self.local_grads, &mut self.grads, &self.flat, self.numel);
        let t0 = std::time::Instant::now();
        tch::no_grad(|| {
            self.reducer.sum(self.comm, flat, |bucket| {
                for &i in &bucket.members {
                    match defined_grad(local_grads, i) {
                        Some(g) => grads[i].copy_(g),
                        None => {
                            let _ = grads[i].zero_();
                        }
                    }
                }
                if bucket.tail {
                    flat.narrow(0, numel, TAIL).copy_(&tail);
                }
            })
        })?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let tail: Vec<f32> = Vec::try_from(
            self.flat
                .narrow(0, self.numel, TAIL)
                .to_device(tch::Device::Cpu),
        )?;
        let mut out = Outcome {
            loss_sum: tail[0] as f64,
            correct: tail[1] as f64,
            count: tail[2] as f64,
            stop: tail[3] > 0.0,
            ..Outcome::default()
        };
        if scale == Scale::MeanOverCount && out.count > 0.0 {
            let _ = self.flat_grad().g_div_scalar_(out.count);
        }
        let sq = self.flat_grad().dot(&self.flat_grad()).double_value(&[]);
        out.grad_norm = sq.sqrt();
        out.applied = sq.is_finite() && out.loss_sum.is_finite();
        Ok(out)
    }

    /// Applies the optimizer step with the reduced (and possibly edited)
    /// gradient, or skips it under the non-finite policy. `what` names the
    /// step in messages.
    pub fn step(&mut self, outcome: &mut Outcome, lr: f64, what: &str) -> Result<()> {
        if !outcome.applied {
            self.skips_total += 1;
            self.skips_in_row += 1;
            let limit = match self.max_skips {
                None => bail!(
                    "{what}: the loss or gradient is not finite ({}.nonfinite = \"error\")",
                    self.section
                ),
                Some(limit) => limit,
            };
            tracing::warn!(
                step = what,
                in_a_row = self.skips_in_row,
                limit,
                "non-finite loss or gradient: step skipped, weights and optimizer untouched"
            );
            if self.skips_in_row >= limit {
                bail!(
                    "{what}: {} non-finite steps in a row ({}.max_skips = {limit}); \
                     the weights are those of the last good step",
                    self.skips_in_row,
                    self.section
                );
            }
            return Ok(());
        }
        self.skips_in_row = 0;
        self.optimizer.step(&self.params, &self.grads, lr);
        self.sync_buffers()?;
        Ok(())
    }

    /// After [`Engine::reduce`]: the reduced gradient is masked, then
    /// clipped to a global L2 norm, then the optimizer steps at `lr` (or the
    /// step is skipped under the non-finite policy). `what` names the step.
    pub fn finish(&mut self, out: &mut Outcome, edit: &Edit, lr: f64, what: &str) -> Result<()> {
        self.edit(out, edit);
        let frozen = match edit.mask {
            Some(mask) if edit.freeze_masked && out.applied => Some((mask, self.param_copies())),
            _ => None,
        };
        self.step(out, lr, what)?;
        if let Some((mask, before)) = frozen {
            // θ ← θ_before + M ⊙ (θ − θ_before): masked entries stay put.
            tch::no_grad(|| {
                let mut offset = 0;
                for (p, q) in self.params.iter().zip(&before) {
                    let n = p.numel() as i64;
                    let m = mask.narrow(0, offset, n).view(p.size().as_slice());
                    offset += n;
                    let kept = q + (p - q) * m;
                    p.shallow_clone().copy_(&kept);
                }
            });
        }
        Ok(())
    }

    /// The first half of [`Engine::finish`]: the reduced gradient masked and
    /// clipped as `edit` says, in place, and `out.step_norm` set; no step.
    pub fn edit(&mut self, out: &mut Outcome, edit: &Edit) {
        if out.applied {
            let g = self.flat_grad();
            let masked = |g: &Tensor| {
                if let Some(mask) = edit.mask {
                    let _ = g.shallow_clone().g_mul_(mask);
                }
            };
            if !edit.clip_first {
                masked(&g);
            }
            // After the mask, and after whatever the method added between
            // the reduction and here (ℓ1-sparse's penalty).
            out.step_norm = g.norm().double_value(&[]);
            if let Some(max_norm) = edit.clip {
                let coef = max_norm / (out.step_norm + CLIP_EPS);
                if coef < 1.0 {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                    out.step_norm *= coef;
                }
            }
            if edit.clip_first && edit.mask.is_some() {
                masked(&g);
                out.step_norm = g.norm().double_value(&[]);
            }
        }
    }

    /// Detached copies of the parameters (e.g. the slow weights' θ_prev).
    pub fn param_copies(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.detach().copy()).collect()
    }

    /// Puts back parameters saved by [`Engine::param_copies`].
    pub fn restore_params(&mut self, saved: &[Tensor]) {
        copy_all(&self.params, saved);
    }

    /// Copies of the BatchNorm running statistics.
    pub fn buffer_copies(&self) -> Vec<Tensor> {
        self.buffers.iter().map(Tensor::copy).collect()
    }

    /// Puts back statistics saved by [`Engine::buffer_copies`].
    pub fn restore_buffers(&mut self, saved: &[Tensor]) {
        copy_all(&self.buffers, saved);
    }

    /// Copies rank 0's BatchNorm buffers to every rank (rank 0 is the
    /// authority) under local BatchNorm; global BatchNorm's running
    /// statistics are the same on every rank by construction.
    pub fn sync_buffers(&mut self) -> Result<()> {
        if self.comm.size() == 1 || self.buffers.is_empty() || self.global_norm.is_some() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        broadcast_all(self.comm, &self.buffers)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Copies rank 0's whole state (parameters and buffers) to every rank;
    /// returns the seconds it took (what the reduce → rank-0 update →
    /// broadcast scheme would pay at every step on top of the reduction).
    pub fn broadcast_state(&mut self) -> Result<f64> {
        if self.comm.size() == 1 {
            return Ok(0.0);
        }
        let t0 = std::time::Instant::now();
        broadcast_all(self.comm, &self.params)?;
        broadcast_all(self.comm, &self.buffers)?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Fails unless every rank holds bit-identical parameters and buffers.
    pub fn verify_identical(&self, when: &str) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let digest = state_digest(self.params.iter().chain(&self.buffers));
        let all = self.comm.all_gather_bytes(digest.as_bytes());
        if let Some(rank) = all.iter().position(|d| d != &all[0]) {
            bail!("{when}: rank {rank}'s weights differ from rank 0's: the ranks diverged");
        }
        Ok(())
    }
}

/// Installs global BatchNorm on `model` when asked, on more than one rank,
/// for a model with BatchNorm (`buffers`: its running statistics); says so
/// when the setting has no effect.
fn global_batchnorm(
    comm: &Comm,
    model: &Model,
    batchnorm: BatchNormPlan,
    buffers: &[Tensor],
    reducer: &Reducer,
) -> Option<(NormSync, std::sync::Arc<SumCounts>)> {
    if buffers.is_empty() {
        if batchnorm.explicit && comm.is_root() {
            tracing::info!(
                batchnorm = batchnorm.mode.as_str(),
                arch = %model.arch.name(),
                "model.batchnorm has no effect: the model has no BatchNorm"
            );
        }
        return None;
    }
    if batchnorm.mode != BatchNormMode::Global || comm.size() == 1 {
        return None;
    }
    let norm = model.norm_sync().clone();
    let counts = std::sync::Arc::new(SumCounts::default());
    norm.set(Some(Box::new(CommSum {
        comm: comm as *const Comm,
        nccl: reducer.nccl(),
        counts: counts.clone(),
    })));
    Some((norm, counts))
}

/// `grads[i]` when the backward pass reached parameter `i`.
fn defined_grad(grads: &[Tensor], i: usize) -> Option<&Tensor> {
    grads.get(i).filter(|g| g.defined())
}

/// Copies `src` into `dst`, tensor by tensor, outside autograd.
fn copy_all(dst: &[Tensor], src: &[Tensor]) {
    tch::no_grad(|| {
        for (d, v) in dst.iter().zip(src) {
            d.shallow_clone().copy_(v);
        }
    });
}

/// Forward `batch` in train or eval mode (its rows' random choices from
/// `keys` when given: [`Model::forward_keyed`]), then back-propagate the
/// *sum* of the cross-entropy over its rows into `engine`; returns this
/// rank's statistics. An empty share contributes nothing (and must still join the
/// reduction, and under global BatchNorm in train mode the layers' sums).
pub fn backward_ce_sum(
    engine: &mut Engine,
    model: &Model,
    batch: &Batch,
    device: Device,
    train: bool,
    keys: Option<&[u64]>,
) -> Local {
    if !model.must_forward(batch.is_empty(), train) {
        return Local::default();
    }
    let x = batch.images.to_device(device);
    let y = batch.labels.to_device(device);
    let logits = match keys {
        Some(keys) => model.forward_keyed(&x, train, keys),
        None => model.forward_t(&x, train),
    };
    let loss = logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0);
    engine.backward(&loss);
    Local {
        loss_sum: loss.double_value(&[]),
        correct: correct(&logits, &y),
        count: batch.len() as f64,
    }
}

/// Correct predictions among `logits` rows.
pub fn correct(logits: &Tensor, labels: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .sum(Kind::Float)
        .double_value(&[])
}

/// SHA-256 of the tensors' bytes, in order.
pub fn state_digest<'t>(tensors: impl Iterator<Item = &'t Tensor>) -> String {
    let mut h = Sha256::new();
    for t in tensors {
        let host = t.to_device(tch::Device::Cpu).contiguous();
        let bytes = host.numel() * host.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor of `bytes` bytes, alive for the call.
        h.update(unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, bytes) });
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Broadcasts `tensors` from rank 0 through one flat buffer.
pub fn broadcast_all(comm: &Comm, tensors: &[Tensor]) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let mut flat = Tensor::cat(
        &tensors
            .iter()
            .map(|t| t.detach().to_kind(Kind::Float).reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    comm.broadcast_tensor(&mut flat, 0)?;
    let mut offset = 0;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel() as i64;
            let src = flat.narrow(0, offset, n).view(t.size().as_slice());
            t.shallow_clone().copy_(&src.to_kind(t.kind()));
            offset += n;
        }
    });
    Ok(())
}
