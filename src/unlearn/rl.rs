//! RL (Golatkar et al. 2020, as released with SalUn; DESIGN §1.3): every
//! forget sample gets, once, a wrong label drawn uniformly from the other
//! classes; then cross-entropy in train mode on remain ∪ forget shuffled
//! together (released: SGD 0.003, 10 epochs, cosine per epoch).
//!
//! The draw for sample `i` is keyed by `(run.seed, i)` alone, so it is the
//! same for any rank count and on resume; the labels are written to
//! `<run folder>/relabels.json`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::json;
use tch::Tensor;

use super::{Budget, Edit, Iteration, Method, Program, Rows, Session, Which, batches};
use crate::config::EpochPlan;
use crate::engine::progress::Progress;
use crate::rng::{Rng, tag};

/// The forget set's wrong labels.
pub struct Relabels(BTreeMap<usize, i64>);

impl Relabels {
    /// Draws the labels of the split's forget set and writes them to the
    /// run folder (rank 0).
    pub fn draw(s: &Session) -> Result<Self> {
        let classes = s.inputs.classes;
        let labels = &s.inputs.train.labels;
        let mut map = BTreeMap::new();
        for i in s.inputs.forget() {
            map.insert(i, wrong_label(s.plan.seed, i, labels[i], classes));
        }
        if s.comm.is_root() {
            let rows: Vec<_> = map
                .iter()
                .map(|(&i, &n)| json!([i, labels[i], n]))
                .collect();
            let doc = json!({"seed": s.plan.seed, "columns": ["index", "label", "new_label"], "rows": rows});
            crate::fsx::write_atomic(
                &s.plan.run_dir.join("relabels.json"),
                serde_json::to_string(&doc)?.as_bytes(),
            )?;
        }
        Ok(Relabels(map))
    }

    /// Cross-entropy of each row against its label, the wrong one for
    /// forget samples.
    pub fn ce(&self, logits: &Tensor, rows: &Rows) -> (Tensor, Tensor) {
        let (at, new): (Vec<i64>, Vec<i64>) = rows
            .indices
            .iter()
            .enumerate()
            .filter_map(|(k, i)| self.0.get(i).map(|&n| (k as i64, n)))
            .unzip();
        let targets = rows.labels.copy();
        if !at.is_empty() {
            let device = targets.device();
            let _ = targets.shallow_clone().index_put_(
                &[Some(Tensor::from_slice(&at).to_device(device))],
                &Tensor::from_slice(&new).to_device(device),
                false,
            );
        }
        let losses =
            logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::None, -100, 0.0);
        (losses, targets)
    }
}

/// A label other than `label`, uniform over the other `classes − 1`.
pub fn wrong_label(seed: u64, index: usize, label: i64, classes: i64) -> i64 {
    let r =
        Rng::keyed(&[seed, tag::RELABEL, index as u64]).below((classes - 1).max(1) as u64) as i64;
    if r >= label { r + 1 } else { r }
}

pub struct Rl {
    plan: EpochPlan,
    relabels: Option<Relabels>,
}

impl Rl {
    pub fn new(plan: EpochPlan) -> Self {
        Rl {
            plan,
            relabels: None,
        }
    }
}

/// RL's and SalUn's budget: passes over remain ∪ forget.
pub fn union_budget(plan: &EpochPlan, s: &mut Session) -> Budget {
    let union = batches(s, Which::Union);
    Program::new(plan, |_| vec![(Which::Union, union)]).budget()
}

/// One RL step on remain ∪ forget with `edit`.
pub fn union_step(s: &mut Session, t: u64, relabels: &Relabels, edit: &Edit) -> Result<Iteration> {
    let out = s.step(Which::Union, t, s.lr(t), true, edit, &mut |logits, rows| {
        relabels.ce(logits, rows)
    })?;
    Ok(Iteration::one(Which::Union, out))
}

impl Method for Rl {
    fn budget(&mut self, s: &mut Session) -> Budget {
        union_budget(&self.plan, s)
    }

    fn prepare(&mut self, s: &mut Session, _: &mut Progress) -> Result<bool> {
        self.relabels = Some(Relabels::draw(s)?);
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let relabels = self.relabels.as_ref().context("RL: not prepared")?;
        union_step(s, t, relabels, &Edit::default())
    }
}

#[cfg(test)]
mod tests {
    use super::wrong_label;

    #[test]
    fn wrong_labels_are_wrong_and_uniform() {
        let mut counts = [0u32; 10];
        for i in 0..20_000 {
            let n = wrong_label(7, i, 3, 10);
            assert_ne!(n, 3);
            assert!((0..10).contains(&n));
            counts[n as usize] += 1;
        }
        // 20000/9 ≈ 2222 each; 5 standard deviations ≈ 235.
        for (c, &k) in counts.iter().enumerate() {
            if c != 3 {
                assert!((k as i64 - 2222).abs() < 235, "class {c}: {k}");
            }
        }
        assert_eq!(wrong_label(7, 5, 3, 10), wrong_label(7, 5, 3, 10));
    }
}
