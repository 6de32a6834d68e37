//! The denoising loss and its backward pass into the engine.

use tch::{Device, Kind, Tensor};

use super::draws::{Draws, Key};
use super::schedule::Schedule;
use crate::data::Batch;
use crate::engine::{Engine, Local};
use crate::model::Model;
use crate::model::unet::{Cond, Dropout};

/// What a denoising loss needs besides the model and the batch.
pub struct Denoising<'a> {
    pub schedule: &'a Schedule,
    /// Share of rows trained on the null class (0 in eval-mode losses).
    pub cond_drop: f64,
    /// The loss of the guided prediction `(1 + w) ε(c) − w ε(∅)` instead of
    /// `ε(c)` (eval mode only; the DDPM release's Fisher uses w = 2).
    pub guidance: f64,
}

/// One rank's rows of a global batch and their draws.
pub struct Rows {
    pub x0: Tensor,
    pub c: Tensor,
    pub draws: Draws,
}

impl Rows {
    /// The rows of `batch` at `pos` of their global batch.
    pub fn at(den: &Denoising, key: Key, batch: &Batch, pos: &[usize], device: Device) -> Self {
        let size = batch.images.size();
        let shape = [size[1], size[2], size[3]];
        let draws = Draws::new(
            key,
            pos,
            shape,
            den.schedule.steps(),
            den.schedule.antithetic(),
            den.cond_drop,
            device,
        );
        Rows {
            x0: batch.images.to_device(device),
            c: batch.labels.to_device(device),
            draws,
        }
    }

    pub fn len(&self) -> usize {
        self.draws.dropout.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-row losses `[N]` of the schedule's process
/// ([`Schedule::row_losses`]: the release's `‖ε − ε_θ(x_t, t, c)‖²` summed
/// over pixels, or ADM's); `train` turns on condition dropout and the
/// UNet's dropout (keyed per row); in eval mode `den.guidance` above 0
/// takes the loss of the guided output.
pub fn per_sample(model: &Model, den: &Denoising, rows: &Rows, train: bool) -> Tensor {
    let d = &rows.draws;
    let xt = den.schedule.noised(&rows.x0, &d.t, &d.noise);
    let out = if !train && den.guidance > 0.0 {
        model.denoise_guided(&xt, &d.t, &rows.c, den.guidance)
    } else {
        let keep = (train && den.cond_drop > 0.0).then_some(&d.keep);
        let cond = Cond {
            t: &d.t,
            c: &rows.c,
            keep,
        };
        let dropout = if train {
            Dropout::Keyed(&d.dropout)
        } else {
            Dropout::Off
        };
        model.denoise(&xt, &cond, &dropout)
    };
    den.schedule.row_losses(&out, &rows.x0, &xt, &d.t, &d.noise)
}

/// Back-propagates `scale ×` the *sum* of the rows' losses into `engine`
/// and returns this rank's statistics (the loss sum unscaled). An empty
/// share contributes nothing (GroupNorm has no cross-rank state).
pub fn backward_sum(
    engine: &mut Engine,
    model: &Model,
    den: &Denoising,
    rows: &Rows,
    train: bool,
    scale: f64,
) -> Local {
    if rows.is_empty() {
        return Local::default();
    }
    let losses = per_sample(model, den, rows, train);
    let sum = losses.sum(Kind::Float);
    engine.backward(&(&sum * scale));
    Local {
        loss_sum: sum.double_value(&[]),
        correct: 0.0,
        count: rows.len() as f64,
    }
}
