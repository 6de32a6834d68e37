//! What a training or unlearning run reads before it computes anything: the
//! datasets, the split manifest and the loaders. Everything is checked here,
//! before the run folder is touched, so bad input writes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::RunPlan;
use crate::data::{Dataset, Loader, LoaderOptions, Manifest, Part, Transform};

pub struct Inputs {
    pub train: Arc<Dataset>,
    pub test: Arc<Dataset>,
    /// The split and the file it came from.
    pub split: Option<(Manifest, PathBuf)>,
    pub in_channels: i64,
    pub classes: i64,
}

impl Inputs {
    pub fn open(plan: &RunPlan) -> Result<Self> {
        let d = &plan.data;
        let train = Self::open_part(plan, Part::Train)?;
        let test = Self::open_part(plan, Part::Test)?;
        let split = match &d.split {
            None => None,
            Some(path) => {
                let m = Manifest::load(path)?;
                m.check(&train, path)?;
                Some((m, path.clone()))
            }
        };
        Ok(Inputs {
            in_channels: d.train_transform.shape[0] as i64,
            classes: train.num_classes() as i64,
            train: Arc::new(train),
            test: Arc::new(test),
            split,
        })
    }

    /// One part of the plan's dataset, cut to its `data.*_limit`.
    pub fn open_part(plan: &RunPlan, part: Part) -> Result<Dataset> {
        let d = &plan.data;
        let mut ds = Dataset::open(d.format, &d.root, part).with_context(|| {
            format!(
                "opening the {} {part:?} data at {} (data.root)",
                d.format.name(),
                d.root.display()
            )
        })?;
        let limit = match part {
            Part::Train => d.train_limit,
            Part::Test => d.test_limit,
        };
        if let Some(n) = limit {
            ds.limit(n);
        }
        Ok(ds)
    }

    /// What identifies the training data a run learns from (for recipe hashes).
    pub fn identity(&self, plan: &RunPlan) -> serde_json::Value {
        serde_json::json!({
            "format": plan.data.format.name(),
            "transform": format!("{:?}", plan.data.train_transform),
            "fingerprint": self.train.fingerprint,
        })
    }

    /// The split's hash, or "none".
    pub fn split_hash(&self) -> String {
        self.split
            .as_ref()
            .map_or_else(|| "none".into(), |(m, _)| m.hash())
    }

    /// The remain set (every training index without a split).
    pub fn remain(&self) -> Vec<usize> {
        match &self.split {
            Some((m, _)) => m.remain(),
            None => (0..self.train.len()).collect(),
        }
    }

    /// The remain samples an unlearning run draws from: every remain sample,
    /// or with `unlearn.remain_classes = N` those of N of the remaining
    /// classes (a seeded choice, [`Inputs::drawn_remain_classes`]).
    pub fn unlearn_remain(&self, plan: &RunPlan) -> Vec<usize> {
        let remain = self.remain();
        match self.drawn_remain_classes(plan) {
            None => remain,
            Some(keep) => remain
                .into_iter()
                .filter(|&i| keep.binary_search(&self.train.labels[i]).is_ok())
                .collect(),
        }
    }

    /// The classes `unlearn.remain_classes` keeps, ascending (`None`: all):
    /// the remaining classes shuffled by `[seed, REMAIN_CLASSES]`, the first N.
    pub fn drawn_remain_classes(&self, plan: &RunPlan) -> Option<Vec<i64>> {
        let n = plan.unlearn.remain_classes? as usize;
        let labels = &self.train.labels;
        let mut classes: Vec<i64> = self.remain().iter().map(|&i| labels[i]).collect();
        classes.sort_unstable();
        classes.dedup();
        crate::rng::Rng::keyed(&[plan.seed, crate::rng::tag::REMAIN_CLASSES]).shuffle(&mut classes);
        classes.truncate(n);
        classes.sort_unstable();
        Some(classes)
    }

    /// What `train.on = all` learns: every training sample the split does
    /// not exclude (every sample without a split).
    pub fn trainable(&self) -> Vec<usize> {
        let excluded = self.excluded();
        (0..self.train.len())
            .filter(|i| excluded.binary_search(i).is_err())
            .collect()
    }

    /// The samples the split leaves out of both sets (empty without a split).
    pub fn excluded(&self) -> Vec<usize> {
        self.split
            .as_ref()
            .map_or_else(Vec::new, |(m, _)| m.excluded.clone())
    }

    /// The forget set (empty without a split).
    pub fn forget(&self) -> Vec<usize> {
        self.split
            .as_ref()
            .map_or_else(Vec::new, |(m, _)| m.forget.clone())
    }

    /// The class a class split forgets (a diffusion model forgets a whole
    /// class): an error naming the manifest when the split is missing,
    /// empty, or not one class exactly.
    pub fn forget_class(&self) -> anyhow::Result<i64> {
        let Some((_, path)) = &self.split else {
            anyhow::bail!(
                "a diffusion model needs a class split: pass --split MANIFEST (sfron split \
                 --scenario class:C)"
            );
        };
        let forget = self.forget();
        let labels = &self.train.labels;
        let Some(class) = forget.first().map(|&i| labels[i]) else {
            anyhow::bail!("{}: the split forgets nothing", path.display());
        };
        if forget.iter().any(|&i| labels[i] != class)
            || self.remain().iter().any(|&i| labels[i] == class)
        {
            anyhow::bail!(
                "{}: not a class split (a diffusion model forgets a whole class: sfron split \
                 --scenario class:C)",
                path.display()
            );
        }
        Ok(class)
    }

    /// A loader over `dataset` with the plan's workers and policies.
    pub fn loader(plan: &RunPlan, dataset: &Arc<Dataset>, transform: &Transform) -> Loader {
        let d = &plan.data;
        Loader::new(
            dataset.clone(),
            transform.clone(),
            LoaderOptions {
                workers: d.workers,
                prefetch: d.prefetch,
                on_corrupt: d.on_corrupt,
                seed: plan.seed,
                pin_memory: false,
            },
        )
    }
}
