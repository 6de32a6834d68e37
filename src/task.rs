//! The loss a model is trained with, chosen by its architecture's task
//! ([`crate::model::Task`]): cross-entropy for a classifier, the denoising
//! loss for a diffusion model. `train`, the unlearning harness and the
//! Fisher passes call [`TaskLoss::backward_sum`] at the one place of the
//! step skeleton where the tasks differ; the reduction, the edits and the
//! optimizer step around it are the engine's, the same for both.

use tch::Device;

use crate::config::RunPlan;
use crate::data::Batch;
use crate::diffusion::draws::{Key, Purpose, row_keys};
use crate::diffusion::loss::{self, Denoising, Rows};
use crate::diffusion::schedule::Schedule;
use crate::engine::{Engine, Local, backward_ce_sum};
use crate::model::{Model, Task};

/// A model's loss, with what it needs (a denoiser's schedule).
pub struct TaskLoss {
    task: Task,
    schedule: Option<Schedule>,
    cond_drop: f64,
    seed: u64,
    device: Device,
}

impl TaskLoss {
    /// The loss of `model`'s task under `plan`, on `device`.
    pub fn new(plan: &RunPlan, model: &Model, device: Device) -> Self {
        let task = model.task();
        let d = &plan.diffusion;
        TaskLoss {
            task,
            schedule: (task == Task::Denoise)
                .then(|| Schedule::of(d, model.arch.learns_sigma(), device)),
            cond_drop: d.cond_drop,
            seed: plan.seed,
            device,
        }
    }

    pub fn task(&self) -> Task {
        self.task
    }

    /// A denoiser's loss settings (`None` for a classifier); `train` turns
    /// condition dropout on.
    pub fn denoising(&self, train: bool) -> Option<Denoising<'_>> {
        self.schedule.as_ref().map(|schedule| Denoising {
            schedule,
            cond_drop: if train { self.cond_drop } else { 0.0 },
            guidance: 0.0,
        })
    }

    /// Where the draws of `(purpose, step)` come from.
    fn key(&self, purpose: Purpose, step: u64) -> Key {
        Key {
            seed: self.seed,
            purpose,
            step,
        }
    }

    /// The keys of a classifier's rows of `batch`, this rank's share of
    /// `global`, for the train-mode draws of `(purpose, step)`
    /// ([`crate::model::Model::forward_keyed`]).
    pub fn row_keys(
        &self,
        engine: &Engine,
        batch: &Batch,
        global: &[usize],
        purpose: Purpose,
        step: u64,
    ) -> Vec<u64> {
        row_keys(
            self.key(purpose, step),
            &share_positions(engine, batch, global),
        )
    }

    /// A denoiser's rows of `batch` with the draws of `(purpose, step)`
    /// (`global`: the global batch's dataset indices).
    pub fn rows(
        &self,
        engine: &Engine,
        batch: &Batch,
        global: &[usize],
        purpose: Purpose,
        step: u64,
        train: bool,
    ) -> Option<Rows> {
        self.rows_at(
            batch,
            &share_positions(engine, batch, global),
            purpose,
            step,
            train,
        )
    }

    /// A denoiser's rows of `batch` at `positions` of their global batch.
    pub fn rows_at(
        &self,
        batch: &Batch,
        positions: &[usize],
        purpose: Purpose,
        step: u64,
        train: bool,
    ) -> Option<Rows> {
        let den = self.denoising(train)?;
        Some(Rows::at(
            &den,
            self.key(purpose, step),
            batch,
            positions,
            self.device,
        ))
    }

    /// Back-propagates the sum of the task's loss over a *whole* global
    /// batch held by this rank alone (rows at positions 0, 1, …), as
    /// [`TaskLoss::backward_sum_guided`] does over a share.
    pub fn backward_whole(
        &self,
        engine: &mut Engine,
        model: &Model,
        batch: &Batch,
        key: (Purpose, u64),
        mode: (bool, f64),
    ) -> Local {
        let positions: Vec<usize> = (0..batch.len()).collect();
        self.backward_at(engine, model, batch, &positions, key, mode)
    }

    /// Back-propagates the *sum* over this rank's rows of `batch` of the
    /// task's per-sample loss into `engine` (train or eval mode) and returns
    /// the rank's statistics. `global` is the global batch's dataset
    /// indices and `(purpose, step)` keys a denoiser's draws and a
    /// classifier's stochastic depth.
    pub fn backward_sum(
        &self,
        engine: &mut Engine,
        model: &Model,
        batch: &Batch,
        global: &[usize],
        key: (Purpose, u64),
        train: bool,
    ) -> Local {
        self.backward_sum_guided(engine, model, batch, global, key, (train, 0.0))
    }

    /// [`TaskLoss::backward_sum`] where a denoiser in eval mode may be
    /// judged on its guided prediction at scale `guidance` (> 0).
    pub fn backward_sum_guided(
        &self,
        engine: &mut Engine,
        model: &Model,
        batch: &Batch,
        global: &[usize],
        key: (Purpose, u64),
        mode: (bool, f64),
    ) -> Local {
        let positions = share_positions(engine, batch, global);
        self.backward_at(engine, model, batch, &positions, key, mode)
    }

    /// The loss's backward pass over `batch`, whose rows a denoiser draws
    /// for at `positions` of their global batch; `(train, guidance)` as
    /// [`TaskLoss::backward_sum_guided`] takes them.
    fn backward_at(
        &self,
        engine: &mut Engine,
        model: &Model,
        batch: &Batch,
        positions: &[usize],
        (purpose, step): (Purpose, u64),
        (train, guidance): (bool, f64),
    ) -> Local {
        match self.task {
            Task::Classify => {
                let keys = row_keys(self.key(purpose, step), positions);
                backward_ce_sum(engine, model, batch, self.device, train, Some(&keys))
            }
            Task::Denoise => {
                let rows = self
                    .rows_at(batch, positions, purpose, step, train)
                    .expect("a denoiser has a schedule");
                let den = Denoising {
                    guidance,
                    ..self.denoising(train).expect("a denoiser has a schedule")
                };
                loss::backward_sum(engine, model, &den, &rows, train, 1.0)
            }
        }
    }
}

/// Where the rows of `batch`, this rank's share of `global`, sit in it.
fn share_positions(engine: &Engine, batch: &Batch, global: &[usize]) -> Vec<usize> {
    let comm = engine.comm();
    let share = crate::data::sampler::share(global.len(), comm.rank(), comm.size());
    crate::diffusion::draws::positions(global, share, &batch.indices)
}
