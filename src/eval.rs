//! Distributed evaluation: each rank scores its share of a sample list in
//! eval mode; the counts are summed across ranks.

use anyhow::Result;
use tch::Device;

use crate::comm::Comm;
use crate::data::sampler::{Sampler, Stream};
use crate::data::{Batch, Loader};
use crate::engine::correct;
use crate::model::Model;

/// Loss and accuracy of a sample list, summed over every rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub loss_sum: f64,
    pub correct: f64,
    pub count: f64,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct / self.count.max(1.0)
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1.0)
    }
}

/// Scores `indices` (eval mode, the loader's transform) over all ranks.
pub fn score(
    comm: &Comm,
    model: &Model,
    loader: &mut Loader,
    indices: &[usize],
    batch: usize,
    device: Device,
) -> Result<Score> {
    let mut sampler = Sampler::new(indices.to_vec(), 0, Stream::Eval, batch, false, false);
    let batches = sampler.batches_per_epoch();
    let mut local = [0f64; 3];
    let ahead = 4;
    let mut submitted = 0;
    for k in 0..batches {
        while submitted < batches && submitted < k + ahead {
            loader.submit(
                0,
                sampler.local_batch(0, submitted, comm.rank(), comm.size()),
            );
            submitted += 1;
        }
        let b: Batch = loader.take()?;
        if b.is_empty() {
            continue;
        }
        tch::no_grad(|| {
            let logits = model.forward_t(&b.images.to_device(device), false);
            let labels = b.labels.to_device(device);
            let loss = logits.cross_entropy_for_logits(&labels) * b.len() as f64;
            local[0] += loss.double_value(&[]);
            local[1] += correct(&logits, &labels);
            local[2] += b.len() as f64;
        });
    }
    comm.sum(&mut local);
    Ok(Score {
        loss_sum: local[0],
        correct: local[1],
        count: local[2],
    })
}
