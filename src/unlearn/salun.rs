//! SalUn (Fan et al., ICLR 2024; DESIGN §1.3): RL with every gradient
//! multiplied by a hard mask that keeps the `salun.fraction` of weights with
//! the largest `|Σ_b ∇(−CE_b)|` over the forget set (eval mode), computed
//! once from the original model (released: 20%, SGD 0.007, 10 epochs).
//!
//! Released behaviour kept: only the gradient is masked, so weight decay
//! and momentum still move masked weights (SalUn issue #32).
//! `salun.freeze_masked = true` keeps them exactly where they are.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::Tensor;

use super::rl::{self, Relabels};
use super::{Budget, Edit, Iteration, Method, Session, saliency};
use crate::config::SalunPlan;
use crate::engine::progress::Progress;

pub struct Salun {
    plan: SalunPlan,
    relabels: Option<Relabels>,
    mask: Option<Tensor>,
}

impl Salun {
    pub fn new(plan: SalunPlan) -> Self {
        Salun {
            plan,
            relabels: None,
            mask: None,
        }
    }
}

impl Method for Salun {
    fn budget(&mut self, s: &mut Session) -> Budget {
        rl::union_budget(&self.plan.budget, s)
    }

    fn prepare(&mut self, s: &mut Session, progress: &mut Progress) -> Result<bool> {
        let started = std::time::Instant::now();
        let Some(mask) = saliency::top_gradient_mask(s, self.plan.fraction, self.plan.mask_batch)?
        else {
            return Ok(false);
        };
        let mut meta = BTreeMap::new();
        meta.insert("salun.fraction".into(), self.plan.fraction.to_string());
        saliency::publish_mask(s, progress, (&mask, started, "SalUn mask"), meta)?;
        self.mask = Some(mask);
        self.relabels = Some(Relabels::draw(s)?);
        Ok(true)
    }

    fn iteration(&mut self, s: &mut Session, t: u64) -> Result<Iteration> {
        let edit = Edit {
            mask: self.mask.as_ref(),
            clip: None,
            freeze_masked: self.plan.freeze_masked,
            clip_first: false,
        };
        rl::union_step(
            s,
            t,
            self.relabels.as_ref().context("SalUn: not prepared")?,
            &edit,
        )
    }
}
