//! Bad Teacher (Chundawat et al., AAAI 2023; DESIGN §1.3): the student (the
//! original, trained in train mode) is distilled on remain ∪ forget batches
//! from the frozen original on remain samples and from an incompetent
//! teacher, a freshly initialised model of the same architecture, on forget
//! samples (both teachers in eval mode; released: T = 1, SGD 0.02, 10
//! epochs).
//!
//! The released loss is `F.kl_div(log_softmax(s/T), p_teacher)` with its
//! default reduction, the mean over batch × classes: each row's KL divided
//! by the number of classes. The incompetent teacher is drawn from
//! libtorch's generator seeded by `run.seed` on rank 0, sent to every rank
//! and written to `<run folder>/bad_teacher.safetensors`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::rl;
use super::{
    Budget, Edit, Iteration, Method, Session, Which, frozen_copy, kl_rows, teacher_logits,
};
use crate::config::BadTeacherPlan;
use crate::engine::broadcast_all;
use crate::engine::progress::Progress;
use crate::model::Model;
use crate::rng::{Rng, tag};

pub struct BadTeacher {
    plan: BadTeacherPlan,
    /// (competent, incompetent)
    teachers: Option<(Model, Model)>,
    /// The forget set, sorted.
    forget: Vec<usize>,
}

impl BadTeacher {
    pub fn new(plan: BadTeacherPlan) -> Self {
        BadTeacher {
            plan,
            teachers: None,
            forget: Vec::new(),
        }
    }
}

/// A freshly initialised model, the same on every rank.
fn incompetent(s: &Session) -> Result<Model> {
    let seed = Rng::keyed(&[s.plan.seed, tag::TEACHER]).next_u64() >> 1;
    tch::manual_seed(seed as i64);
    let mut model = Model::new(
        s.model.arch.clone(),
        s.model.in_channels,
        s.model.classes,
        s.device,
    );
    model
        .set_compute(s.model.compute())
        .map_err(anyhow::Error::msg)?;
    let state: Vec<Tensor> = model.state().into_iter().map(|(_, t)| t).collect();
    broadcast_all(s.comm, &state)?;
    model.vs.freeze();
    Ok(model)
}

impl Method for BadTeacher {
    fn budget(&mut self, s: &mut Session) -> Budget {
        rl::union_budget(&self.plan.budget, s)
    }

    fn prepare(&mut self, s: &mut Session, _: &mut Progress) -> Result<bool> {
        let bad = incompetent(s)?;
        if s.comm.is_root() {
            let mut meta = BTreeMap::new();
            meta.insert("sfron.role".into(), "bad_teacher".into());
            bad.save(&s.plan.run_dir.join("bad_teacher.safetensors"), meta)?;
        }
        self.teachers = Some((frozen_copy(s)?, bad));
        let mut forget = s.inputs.forget();
        forget.sort_unstable();
        self.forget = forget;
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let (good, bad) = self
            .teachers
            .as_ref()
            .context("Bad Teacher: not prepared")?;
        let temp = self.plan.temperature;
        let forget = &self.forget;
        let classes = s.model.classes as f64;
        let out = s.step(
            Which::Union,
            t,
            s.lr(t),
            true,
            &Edit::default(),
            &mut |logits, rows| {
                let is_forget: Vec<f32> = rows
                    .indices
                    .iter()
                    .map(|i| f32::from(u8::from(forget.binary_search(i).is_ok())))
                    .collect();
                let f = Tensor::from_slice(&is_forget)
                    .to_device(logits.device())
                    .unsqueeze(1);
                let good_p = (teacher_logits(good, &rows.x) / temp).softmax(-1, Kind::Float);
                let bad_p = (teacher_logits(bad, &rows.x) / temp).softmax(-1, Kind::Float);
                let target = &f * bad_p + (1.0 - &f) * good_p;
                (
                    kl_rows(logits, &target, temp) / classes,
                    rows.labels.shallow_clone(),
                )
            },
        )?;
        Ok(Iteration::one(Which::Union, out))
    }
}
