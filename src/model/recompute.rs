//! Activation checkpointing (recomputation), as `torch.utils.checkpoint`
//! does for a stack of blocks: the forward pass keeps only each block's
//! input, and the backward pass recomputes one block at a time from it, so
//! that a trunk of `L` blocks holds `L` block inputs instead of every
//! intermediate activation (DiT-XL/2 keeps about 2% of its activations).
//!
//! libtorch's C++ API has no checkpoint function and tch exposes no custom
//! autograd function, so the recomputation is a second backward pass that
//! the engine drives, as the global BatchNorm's sums are ([`super::norm`]):
//! - a model's forward pass runs the trunk without a graph from *leaves*
//!   (the trunk's input and the conditioning, detached, requiring grad),
//!   lets the rest of its graph start from a leaf holding the trunk's
//!   output, and queues a [`Deferred`];
//! - [`Recompute::backward`], the engine's backward pass, asks autograd for
//!   the gradients of the parameters *and* of the queued leaves; each
//!   deferred trunk then walks its blocks in reverse, recomputing each
//!   block with a graph and back-propagating the gradient of its output
//!   into its parameters and inputs (`Σ out ⊙ g` as the scalar: its
//!   gradient with respect to `out` is exactly `g`), and lastly back-
//!   propagates into the graph its leaves were cut from.
//!
//! The recomputed blocks run the same kernels on the same inputs (under the
//! same autocast), so every gradient is the one the full graph gives, bit
//! for bit on a CPU, except where a leaf feeds several blocks (the
//! conditioning): its gradient is summed here in the order autograd would
//! use (the last block first), which agrees up to float reassociation.
//!
//! A model only takes this path while an engine has attached its queue
//! ([`Recompute::attach`], until [`Recompute::detach`]), so that a forward pass nobody back-propagates
//! through the engine (a frozen copy, an evaluation in grad mode) keeps an
//! ordinary graph and nothing accumulates.

use std::sync::{Arc, Mutex};

use tch::Tensor;

/// Back-propagates the gradients of a trunk's leaves (in [`Deferred`]'s
/// order) into the parameters (`params`): their gradients, one per
/// parameter, undefined where none reached.
pub type TrunkBackward = Box<dyn FnOnce(Vec<Tensor>, &[Tensor]) -> Vec<Tensor> + Send>;

/// A trunk whose activations were not kept.
pub struct Deferred {
    /// The leaves the kept graph starts from (requiring grad).
    pub leaves: Vec<Tensor>,
    /// Recomputes the trunk and back-propagates through it.
    pub backward: TrunkBackward,
}

/// A model's queue of deferred trunks; attached while an engine drives it.
#[derive(Clone, Default)]
pub struct Recompute(Arc<Mutex<Queue>>);

#[derive(Default)]
struct Queue {
    /// Engines attached (a model may have several over its life, and one
    /// may be made before the last drops).
    engines: usize,
    pending: Vec<Deferred>,
}

impl Recompute {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An engine drives the queue from now on, until it calls
    /// [`Recompute::detach`]: forward passes in grad mode defer their trunk
    /// to [`Recompute::backward`].
    pub fn attach(&self) {
        self.queue().engines += 1;
    }

    /// An engine stops driving the queue; when none is left, what is queued
    /// is dropped and forward passes keep their activations again.
    pub fn detach(&self) {
        let mut q = self.queue();
        q.engines = q.engines.saturating_sub(1);
        if q.engines == 0 {
            q.pending.clear();
        }
    }

    /// Whether an engine drives the queue.
    pub fn is_attached(&self) -> bool {
        self.queue().engines > 0
    }

    /// Queues a trunk (called by the model's forward pass).
    pub fn defer(&self, d: Deferred) {
        self.queue().pending.push(d);
    }

    /// How many trunks wait for a backward pass.
    pub fn pending(&self) -> usize {
        self.queue().pending.len()
    }

    /// Drops the trunks queued by forward passes that were never
    /// back-propagated.
    pub fn clear(&self) {
        self.queue().pending.clear();
    }

    /// The gradients of `loss` with respect to `params`, one per parameter
    /// (undefined where none reached), as `torch.autograd.grad` gives them,
    /// through the trunks queued since the last call. A trunk `loss` does
    /// not depend on is dropped.
    pub fn backward(&self, loss: &Tensor, params: &[Tensor]) -> Vec<Tensor> {
        let pending = std::mem::take(&mut self.queue().pending);
        if pending.is_empty() {
            return Tensor::run_backward(&[loss], params, false, false);
        }
        let mut inputs: Vec<&Tensor> = params.iter().collect();
        inputs.extend(pending.iter().flat_map(|d| d.leaves.iter()));
        let mut grads = Tensor::run_backward(&[loss], &inputs, false, false);
        let mut leaf_grads = grads.split_off(params.len());
        // The last trunk first: a trunk queued later may feed one queued
        // earlier only through the model's own graph, never the reverse.
        for d in pending.into_iter().rev() {
            let mine = leaf_grads.split_off(leaf_grads.len() - d.leaves.len());
            if mine.iter().all(|g| !g.defined()) {
                continue;
            }
            add_into(&mut grads, (d.backward)(mine, params));
        }
        grads
    }
}

/// `have[i] += more[i]` where defined, outside autograd.
pub fn add_into(have: &mut [Tensor], more: Vec<Tensor>) {
    tch::no_grad(|| {
        for (h, m) in have.iter_mut().zip(more) {
            match (h.defined(), m.defined()) {
                (true, true) => *h = &*h + m,
                (false, true) => *h = m,
                _ => {}
            }
        }
    });
}

/// The gradients of `Σ out ⊙ grad` with respect to `params` and then
/// `inputs`: back-propagating the gradient `grad` of `out` (a block's
/// output) without a `grad_outputs` argument, which tch's `run_backward`
/// lacks. Exact: the scalar's gradient with respect to `out` is `grad`.
pub fn vjp(out: &Tensor, grad: &Tensor, params: &[Tensor], inputs: &[&Tensor]) -> Vec<Tensor> {
    let scalar = (out * grad).sum(tch::Kind::Float);
    let mut all: Vec<&Tensor> = params.iter().collect();
    all.extend_from_slice(inputs);
    Tensor::run_backward(&[scalar], &all, false, false)
}

/// A detached copy of `t` requiring grad: a leaf of a recomputed graph.
pub fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}
