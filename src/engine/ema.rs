//! The exponential moving average of the weights that a denoiser samples
//! with: after every optimizer step, `ema ← d · ema + (1 − d) · θ` (the
//! release's `EMAHelper.update`, `d` its `ema_rate`), over the trainable
//! parameters; buffers are taken from the model as they are. Every rank
//! holds the same weights, so every rank's EMA is the same and nothing is
//! reduced.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::model::Model;

/// The file of the EMA weights in a run folder and in a checkpoint: a full
/// model state (parameters averaged, buffers as the model's), loadable as
/// any weights file.
pub const EMA_FILE: &str = "ema.safetensors";

pub struct Ema {
    decay: f64,
    /// Parameter names, sorted as [`Model::parameters`].
    names: Vec<String>,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// An EMA starting at the model's current parameters.
    pub fn new(decay: f64, model: &Model) -> Self {
        let (names, shadow) = model
            .parameters()
            .into_iter()
            .map(|(n, p)| (n, p.detach().copy()))
            .unzip();
        Ema {
            decay,
            names,
            shadow,
        }
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// One update from `params` (in [`Model::parameters`] order).
    pub fn update(&mut self, params: &[Tensor]) {
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                let _ = s.g_mul_scalar_(self.decay);
                let _ = s.g_add_(&(p.detach() * (1.0 - self.decay)));
            }
        });
    }

    /// The model's state with the parameters replaced by their averages,
    /// sorted by name (what [`EMA_FILE`] holds).
    pub fn state(&self, model: &Model) -> Vec<(String, Tensor)> {
        let averaged: BTreeMap<&str, &Tensor> = self
            .names
            .iter()
            .map(String::as_str)
            .zip(&self.shadow)
            .collect();
        model
            .state()
            .into_iter()
            .map(|(n, t)| match averaged.get(n.as_str()) {
                Some(s) => (n, s.shallow_clone()),
                None => (n, t),
            })
            .collect()
    }

    /// Takes the averages from a saved [`EMA_FILE`]'s tensors; names not
    /// there are an error naming the first.
    pub fn restore(&mut self, saved: &BTreeMap<String, Tensor>) -> Result<(), String> {
        tch::no_grad(|| {
            for (n, s) in self.names.iter().zip(&mut self.shadow) {
                let t = saved
                    .get(n)
                    .ok_or_else(|| format!("no {n} in the saved EMA"))?;
                if t.size() != s.size() {
                    return Err(format!("{n}: saved {:?}, model {:?}", t.size(), s.size()));
                }
                s.copy_(t);
            }
            Ok(())
        })
    }
}
