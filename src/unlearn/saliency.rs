//! Saliency masks. SFR-on's (DESIGN §1.1): diagonal empirical Fisher of
//! batch-mean cross-entropy gradients over the forget and remain sets, and
//! the mask. SalUn's (DESIGN §1.3): the top share of `|Σ_b ∇(−CE_b)|` over
//! the forget set.
//!
//! Each Fisher term is the square of one *global* batch's mean gradient: every
//! rank back-propagates the summed loss of its share, the engine all-reduces
//! the shares and divides by the global count, and only then is the result
//! squared. So the Fisher, and the mask, do not depend on the rank count.
//! The model is in eval mode (BatchNorm uses its running statistics) and the
//! inputs carry the training transforms, as released.
//!
//! The Fisher is cached as safetensors (`forget.<param>`, `remain.<param>`)
//! with a key of everything it depends on (original weights, split, batch,
//! cap, seed, transform, architecture); a cache with another key is
//! recomputed, never used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::json;
use tch::{Kind, Tensor};

use super::Session;
use crate::config::Saliency;
use crate::data::{BatchStream, Cursor, Sampler, Stream};
use crate::diffusion::draws::Purpose;
use crate::engine::Scale;
use crate::inputs::Inputs;
use crate::model::weights;

/// Metadata key of the cache's identity.
const KEY: &str = "sfron.fisher.key";
/// Added to both Fishers before the ratio (DESIGN §1.1).
const EPS: f64 = 1e-15;

/// Both diagonal Fishers, flat in the engine's parameter order.
pub struct Fisher {
    pub forget: Tensor,
    pub remain: Tensor,
    /// Global batches each average.
    pub batches: (u64, u64),
    pub reused: bool,
    pub seconds: f64,
}

/// The diagonal Fisher over `members`: `(1/N_b) Σ_b (∇ mean_{i∈b} CE_i)²`;
/// `None` when a stop was requested (all ranks agree in the reduction).
fn fisher(
    s: &mut Session,
    members: Vec<usize>,
    phase: &str,
    cap: Option<u64>,
) -> Result<Option<(Tensor, u64)>> {
    let batch = s.plan.sfron.fisher_batch;
    let sampler = Sampler::new(members, s.plan.seed, Stream::Eval, batch, true, false);
    let loader = Inputs::loader(s.plan, &s.inputs.train, &s.plan.data.train_transform);
    let mut stream = BatchStream::new(
        sampler,
        loader,
        Cursor::default(),
        s.comm.rank(),
        s.comm.size(),
    );
    // One pass, or `cap` batches (cycling through reshuffled epochs).
    let batches = cap.unwrap_or(stream.batches_per_epoch() as u64);
    let sum = Tensor::zeros(
        [s.engine.flat_grad().numel() as i64],
        (Kind::Float, s.device),
    );
    let purpose = if phase == "fisher_remain" {
        Purpose::FisherRemain
    } else {
        Purpose::Fisher
    };
    let clip = s.plan.sfron.fisher_clip;
    for k in 0..batches {
        let global = stream.next_global();
        s.trace(phase, k, &global)?;
        let b = stream.next_batch()?;
        s.engine.zero_grad();
        let local = s.task.backward_sum_guided(
            &mut s.engine,
            &s.model,
            &b,
            &global,
            (purpose, k),
            (false, s.plan.sfron.fisher_guidance),
        );
        if phase == "fisher_remain" && k == 0 {
            s.faults.in_fisher(s.comm.rank());
        }
        let out = s.engine.reduce(local, Scale::MeanOverCount)?;
        if out.stop {
            s.engine.zero_grad();
            return Ok(None);
        }
        if !out.applied {
            bail!("{phase} batch {k}: the loss or gradient is not finite (the original model?)");
        }
        let g = match clip {
            // clip_grad_norm_ before squaring (the DDPM release's Fisher).
            Some(c) => s.engine.flat_grad() * (c / (out.grad_norm + 1e-6)).min(1.0),
            None => s.engine.flat_grad(),
        };
        let _ = sum.shallow_clone().addcmul_(&g, &g);
    }
    s.engine.zero_grad();
    Ok(Some((sum / batches.max(1) as f64, batches)))
}

/// SalUn's mask, flat: 1 on the `⌊fraction · N⌋` weights with the largest
/// `|Σ_b ∇ mean_{i∈b} CE_i|` over the global forget batches `b` of `batch`
/// (eval mode, train transforms; ties broken by parameter order), 0
/// elsewhere. `None`: a stop was requested.
///
/// Equal for any rank count: a rank reads whole global batches (batch `k`
/// on rank `k mod world`), so each batch's gradient is computed the same
/// way whatever the rank count, and the batches' gradients are summed and
/// reduced in f64, where the order of the sum is far below the f32
/// gradients' precision.
pub fn top_gradient_mask(s: &mut Session, fraction: f64, batch: usize) -> Result<Option<Tensor>> {
    top_gradient_mask_with(s, fraction, batch, (0.0, None))
}

/// [`top_gradient_mask`] where a denoiser's loss is that of its guided
/// prediction at `guidance` (> 0) and each batch's mean gradient is
/// clipped to `clip` before it is summed (the DDPM release's SalUn mask:
/// guidance 2, clip 1).
pub fn top_gradient_mask_with(
    s: &mut Session,
    fraction: f64,
    batch: usize,
    (guidance, clip): (f64, Option<f64>),
) -> Result<Option<Tensor>> {
    let (rank, world) = (s.comm.rank(), s.comm.size());
    let mut sampler = Sampler::new(
        s.inputs.forget(),
        s.plan.seed,
        Stream::Eval,
        batch,
        true,
        false,
    );
    let mut owned = Vec::new();
    let mut mine = Vec::new();
    for k in 0..sampler.batches_per_epoch() {
        let global = sampler.global_batch(0, k);
        s.trace("salun_mask", k as u64, &global)?;
        if k % world == rank {
            owned.extend(global);
            mine.push(k as u64);
        }
    }
    let loader = Inputs::loader(s.plan, &s.inputs.train, &s.plan.data.train_transform);
    let in_order = Sampler::new(owned, s.plan.seed, Stream::Eval, batch, false, false);
    let mut stream = BatchStream::new(in_order, loader, Cursor::default(), 0, 1);
    let numel = s.engine.flat_grad().numel() as i64;
    let mut sum = Tensor::zeros([numel], (Kind::Double, s.device));
    for &k in &mine {
        let b = stream.next_batch()?;
        s.engine.zero_grad();
        let local = s.task.backward_whole(
            &mut s.engine,
            &s.model,
            &b,
            (Purpose::Fisher, k),
            (false, guidance),
        );
        let mut mean = s.engine.flat_local_grad().to_kind(Kind::Double) / local.count.max(1.0);
        if let Some(c) = clip {
            let norm = mean.norm().double_value(&[]);
            mean *= (c / (norm + 1e-6)).min(1.0);
        }
        let _ = sum.g_add_(&mean);
    }
    if !s.end_pass(&mut sum)? {
        return Ok(None);
    }
    let score = sum.abs();
    if !bool::try_from(score.isfinite().all())? {
        bail!("the SalUn saliency pass: the gradient is not finite (the original model?)");
    }
    let k = (numel as f64 * fraction) as i64;
    let order = score.argsort_stable(true, 0, true);
    let mask = Tensor::zeros([numel], (Kind::Float, s.device));
    let _ = mask
        .shallow_clone()
        .index_fill_(0, &order.narrow(0, 0, k), 1.0);
    Ok(Some(mask))
}

/// Logs a SalUn mask computed since `started` (`what` names it), records
/// its kept share overall and per parameter in the metrics, and saves it
/// with `meta` ([`save_mask`]).
pub fn publish_mask(
    s: &Session,
    progress: &mut crate::engine::progress::Progress,
    (mask, started, what): (&Tensor, Instant, &str),
    meta: BTreeMap<String, String>,
) -> Result<()> {
    let share = mask.sum(Kind::Float).double_value(&[]) / mask.numel() as f64;
    tracing::info!(
        kept = format!("{:.2}%", 100.0 * share),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "{what}"
    );
    progress.record(json!({"event": "saliency", "step": 0, "kept": share,
        "seconds": started.elapsed().as_secs_f64(),
        "kept_per_param": kept(s, mask).into_iter()
            .map(|(n, f)| (n, json!(f))).collect::<serde_json::Map<_, _>>()}))?;
    save_mask(s, mask, meta)
}

/// Writes a flat mask as `<run folder>/mask.safetensors` (rank 0), one
/// tensor per parameter.
pub fn save_mask(s: &Session, mask: &Tensor, meta: BTreeMap<String, String>) -> Result<()> {
    if s.comm.is_root() {
        weights::save(
            &s.plan.run_dir.join("mask.safetensors"),
            &unflatten(s, mask, ""),
            &meta,
        )?;
    }
    Ok(())
}

/// What the Fisher depends on: a cache with another key is stale.
fn cache_key(s: &Session) -> String {
    let p = &s.plan.sfron;
    let mut key = json!({
        "from": s.from_hash,
        "split": s.inputs.split_hash(),
        "arch": s.model.arch.name(),
        "fisher_batch": p.fisher_batch,
        "remain_batches": p.fisher_remain_batches,
        "seed": s.plan.seed,
        "transform": format!("{:?}", s.plan.data.train_transform),
        "dataset": s.inputs.train.fingerprint,
    });
    // Settings added later enter the key only when set, so caches written
    // before them stay valid.
    if let Some(c) = p.fisher_clip {
        key["fisher_clip"] = json!(c);
    }
    if let Some(n) = p.fisher_forget_batches {
        key["forget_batches"] = json!(n);
    }
    if let Some(classes) = s.inputs.drawn_remain_classes(s.plan) {
        key["remain_classes"] = json!(classes);
    }
    if s.task.task() == crate::model::Task::Denoise {
        key["fisher_guidance"] = json!(p.fisher_guidance);
        key["diffusion"] = json!(s.plan.diffusion);
    }
    key.to_string()
}

fn cache_path(s: &Session) -> PathBuf {
    s.plan
        .sfron
        .fisher_cache
        .clone()
        .unwrap_or_else(|| s.plan.run_dir.join("fisher.safetensors"))
}

/// Reads a cache whose key matches, split into the flat forget and remain Fishers.
fn read_cache(path: &Path, key: &str, s: &Session) -> Result<Option<(Tensor, Tensor)>> {
    if !path.is_file() {
        return Ok(None);
    }
    let (tensors, meta) = weights::load(path)?;
    if meta.get(KEY).map(String::as_str) != Some(key) {
        tracing::warn!(
            cache = %path.display(),
            "the Fisher cache was made for other weights, split or settings: recomputing"
        );
        return Ok(None);
    }
    let by_name: BTreeMap<_, _> = tensors.into_iter().collect();
    let flat = |prefix: &str| -> Result<Tensor> {
        let parts = s
            .engine
            .names
            .iter()
            .zip(&s.engine.params)
            .map(|(n, p)| match by_name.get(&format!("{prefix}.{n}")) {
                Some(t) if t.size() == p.size() => Ok(t.to_kind(Kind::Float).reshape([-1])),
                _ => bail!(
                    "{}: no {prefix}.{n} of shape {:?}",
                    path.display(),
                    p.size()
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0).to_device(s.device))
    };
    Ok(Some((flat("forget")?, flat("remain")?)))
}

/// Splits a flat tensor into named tensors of the parameters' shapes.
pub fn unflatten(s: &Session, flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
    let mut offset = 0;
    s.engine
        .names
        .iter()
        .zip(&s.engine.params)
        .map(|(n, p)| {
            let len = p.numel() as i64;
            let t = flat.narrow(0, offset, len).view(p.size().as_slice());
            offset += len;
            (format!("{prefix}{n}"), t)
        })
        .collect()
}

/// The Fisher over the forget and remain sets: from a matching cache (rank 0
/// reads it, every rank receives it), else computed and cached. `None`: a
/// stop was requested during the passes (nothing is cached; a rerun
/// computes them again).
pub fn fisher_pair(s: &mut Session) -> Result<Option<Fisher>> {
    let started = Instant::now();
    let key = cache_key(s);
    let path = cache_path(s);
    let cached = if s.comm.is_root() {
        match read_cache(&path, &key, s) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cache = %path.display(), "unreadable Fisher cache, recomputing: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let mut hit = [u8::from(cached.is_some())];
    s.comm.broadcast(&mut hit, 0);
    if hit[0] == 1 {
        let n = s.engine.flat_grad().numel() as i64;
        let (mut forget, mut remain) = cached.unwrap_or_else(|| {
            let z = || Tensor::zeros([n], (Kind::Float, s.device));
            (z(), z())
        });
        s.comm.broadcast_tensor(&mut forget, 0)?;
        s.comm.broadcast_tensor(&mut remain, 0)?;
        tracing::info!(cache = %path.display(), "reusing the Fisher cache (same weights, split and settings)");
        return Ok(Some(Fisher {
            forget,
            remain,
            batches: (0, 0),
            reused: true,
            seconds: started.elapsed().as_secs_f64(),
        }));
    }
    let (forget_set, remain_set) = (s.inputs.forget(), s.inputs.unlearn_remain(s.plan));
    let cap = s.plan.sfron.fisher_remain_batches;
    let forget_cap = s.plan.sfron.fisher_forget_batches;
    let Some((forget, nf)) = fisher(s, forget_set, "fisher_forget", forget_cap)? else {
        return Ok(None);
    };
    let Some((remain, nr)) = fisher(s, remain_set, "fisher_remain", cap)? else {
        return Ok(None);
    };
    if s.comm.is_root() {
        let mut tensors = unflatten(s, &forget, "forget.");
        tensors.extend(unflatten(s, &remain, "remain."));
        let mut meta = BTreeMap::new();
        meta.insert(KEY.to_string(), key);
        meta.insert(
            "sfron.fisher.batches".into(),
            format!("{nf} forget, {nr} remain"),
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        weights::save(&path, &tensors, &meta)?;
    }
    Ok(Some(Fisher {
        forget,
        remain,
        batches: (nf, nr),
        reused: false,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// The mask (or soft weights) of `rule`, flat; `None` for `Saliency::None`.
/// `S = (F_f + 1e-15) / (F_r + 1e-15)`.
pub fn mask(fisher: &Fisher, rule: Saliency) -> Option<Tensor> {
    let ratio = || (&fisher.forget + EPS) / (&fisher.remain + EPS);
    match rule {
        Saliency::Hard { gamma } => Some(ratio().ge(gamma).to_kind(Kind::Float)),
        Saliency::Soft { max } => Some(ratio().clamp_max(max)),
        Saliency::None => None,
    }
}

/// Per-parameter fraction of mask entries that are non-zero (the kept share).
pub fn kept(s: &Session, mask: &Tensor) -> Vec<(String, f64)> {
    unflatten(s, mask, "")
        .into_iter()
        .map(|(n, t)| {
            let nz = t.ne(0.0).sum(Kind::Float).double_value(&[]);
            (n, nz / t.numel().max(1) as f64)
        })
        .collect()
}
