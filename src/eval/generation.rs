//! Generation metrics of a class-conditional diffusion model that was made
//! to forget class c (DESIGN §6), for `sfron eval` on a denoiser:
//!
//! - **forget accuracy**: the share of generated class-c images that a
//!   classifier calls c (Retrain's is the classifier's error rate on
//!   images that are not c-like: a few %);
//! - **remaining accuracy**: the share of generated images of every other
//!   class that the classifier calls their class;
//! - **FID** of the generated remaining-class images against **all** real
//!   remaining-class training images, in the penultimate-layer feature
//!   space of that classifier (offline; the sample counts on both sides are
//!   reported).
//!
//! The images are generated with `[sample]` ([`crate::sample`]): seeded per
//! image, sharded across ranks, the same for any rank count. The
//! classifier is a zoo model with weights (`eval.classifier`), fed the
//! images with its dataset's usual test normalisation.
//!
//! The Fréchet distance between Gaussians `N(μ₁, Σ₁)`, `N(μ₂, Σ₂)` is
//! `‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁ Σ₂)^{1/2}` (Heusel et al. 2017);
//! `Tr (Σ₁Σ₂)^{1/2} = Σ √λ_k(Σ₁^{1/2} Σ₂ Σ₁^{1/2})`, the eigenvalues of a
//! symmetric positive semi-definite matrix, computed in float64 with
//! symmetric eigendecompositions (no complex `sqrtm` round-off to discard).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::comm::Comm;
use crate::config::RunPlan;
use crate::data::Dataset;
use crate::data::sampler::share;
use crate::data::transform::Transform;
use crate::engine::progress::Progress;
use crate::inputs::Inputs;
use crate::model::inception::FidInception;
use crate::model::{Arch, Model, weights};
use crate::rundir::{Status, save_config};
use crate::sample;

/// The grid of the generated images in the evaluation's folder (a row per
/// class, `sample.grid` images each).
pub const GRID_FILE: &str = "grid.png";

/// What `sfron eval` reports for a diffusion model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationEval {
    pub forget_class: i64,
    /// % of generated class-c images called c.
    pub forget_acc: f64,
    /// % of generated images of the other classes called their class.
    pub remain_acc: f64,
    /// FID in the classifier's feature space, generated remaining-class
    /// images against every real remaining-class training image.
    pub fid_classifier: f64,
    /// FID in Inception-v3 pool3 features (pytorch-fid's network), the
    /// same images on both sides (`None`: `eval.inception` not set).
    #[serde(default)]
    pub fid_inception: Option<f64>,
    pub generated_forget: usize,
    pub generated_remain: usize,
    pub real_remain: usize,
    /// Which weights were sampled: "ema" or "raw".
    pub weights: String,
    pub model: String,
    pub classifier: String,
    pub sampler: serde_json::Value,
    pub seconds: f64,
}

/// Mean `[D]` and covariance `[D, D]` (unbiased, as `np.cov`) of features
/// `[N, D]`, in float64.
pub fn moments(features: &Tensor) -> (Tensor, Tensor) {
    let f = features.to_kind(Kind::Double);
    let n = f.size()[0];
    let mu = f.mean_dim([0].as_slice(), false, Kind::Double);
    let centred = &f - mu.unsqueeze(0);
    let sigma = centred.transpose(0, 1).matmul(&centred) / ((n - 1).max(1) as f64);
    (mu, sigma)
}

/// The square root of a symmetric positive semi-definite matrix (negative
/// eigenvalues of round-off set to 0).
fn psd_sqrt(m: &Tensor) -> Tensor {
    let sym = (m + m.transpose(0, 1)) / 2.0;
    let (vals, vecs) = sym.linalg_eigh("L");
    let root = vals.clamp_min(0.0).sqrt();
    (&vecs * root.unsqueeze(0)).matmul(&vecs.transpose(0, 1))
}

/// The Fréchet distance between `N(mu1, s1)` and `N(mu2, s2)` (module docs).
pub fn frechet_distance(mu1: &Tensor, s1: &Tensor, mu2: &Tensor, s2: &Tensor) -> f64 {
    let d = mu1 - mu2;
    let r1 = psd_sqrt(s1);
    let inner = r1.matmul(s2).matmul(&r1);
    let inner = (&inner + inner.transpose(0, 1)) / 2.0;
    let (vals, _) = inner.linalg_eigh("L");
    let tr_sqrt = vals
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[]);
    d.dot(&d).double_value(&[]) + s1.trace().double_value(&[]) + s2.trace().double_value(&[])
        - 2.0 * tr_sqrt
}

/// Loads a zoo classifier from `path` (`arch` builds it; its input
/// channels and classes are read from the file).
pub fn load_classifier(arch: &Arch, path: &Path, device: Device) -> Result<Model> {
    if !path.is_file() {
        bail!(
            "eval.classifier = {}: no such file (the weights of a classifier trained on the \
             same data, e.g. the output of `sfron train` with model.arch = {})",
            path.display(),
            arch.name()
        );
    }
    // Read once: the shapes come from the same bytes that are loaded.
    let bytes = weights::read(path)?;
    let (tensors, _) = weights::parse(&bytes, path)?;
    let shape = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| weights::shape_of(&tensors, name))
    };
    let (Some(conv1), Some(head)) = (
        shape(&["conv1.weight"]),
        shape(&["fc.weight", "fc2.weight"]),
    ) else {
        bail!(
            "{}: not the weights of a {} classifier (no conv1.weight and fc/fc2.weight)",
            path.display(),
            arch.name()
        );
    };
    let mut model = Model::new(arch.clone(), conv1[1], head[0], device);
    model.load_bytes(&bytes, path)?;
    Ok(model)
}

/// uint8 images `[N, C, H, W]` as the classifier's normalised input.
fn classifier_input(images: &Tensor, transform: &Transform, device: Device) -> Tensor {
    let x = images.to_kind(Kind::Float) / 255.0;
    let c = transform.mean.len() as i64;
    let mean = Tensor::from_slice(&transform.mean).view([1, c, 1, 1]);
    let std = Tensor::from_slice(&transform.std).view([1, c, 1, 1]);
    ((x - mean) / std).to_device(device)
}

/// The classifier's predictions `[N]` and features `[N, D]` of uint8
/// images, computed in batches of `batch` (on this rank only).
fn classify(
    classifier: &Model,
    images: &Tensor,
    transform: &Transform,
    batch: usize,
    device: Device,
) -> (Tensor, Tensor) {
    let n = images.size()[0];
    let (mut preds, mut feats) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let len = (batch as i64).min(n - start);
            let x = classifier_input(&images.narrow(0, start, len), transform, device);
            let f = classifier.features_t(&x, false);
            let logits = classifier.forward_t(&x, false);
            preds.push(logits.argmax(-1, false).to_device(Device::Cpu));
            feats.push(f.to_kind(Kind::Double).to_device(Device::Cpu));
            start += len;
        }
    });
    if preds.is_empty() {
        return (
            Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            Tensor::zeros([0, 0], (Kind::Double, Device::Cpu)),
        );
    }
    (Tensor::cat(&preds, 0), Tensor::cat(&feats, 0))
}

/// Features `[N, D]` (float64) of every real remaining-class training
/// image, by the classifier and (when given) the FID Inception; rank 0
/// gets them (the images are read and passed through in shares).
fn real_features(
    comm: &Comm,
    plan: &RunPlan,
    (images, remain): (&Arc<Dataset>, &[usize]),
    (classifier, inception): (&Model, Option<&FidInception>),
    transform: &Transform,
    device: Device,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let mine = &remain[share(remain.len(), comm.rank(), comm.size())];
    let mut loader = Inputs::loader(plan, images, transform);
    let c = transform.mean.len() as i64;
    let mean = Tensor::from_slice(&transform.mean).view([1, c, 1, 1]);
    let std = Tensor::from_slice(&transform.std).view([1, c, 1, 1]);
    let (mut feats, mut pooled) = (Vec::new(), Vec::new());
    for chunk in mine.chunks(plan.eval.batch.max(1)) {
        loader.submit(0, chunk.to_vec());
        let b = loader.take()?;
        let f = tch::no_grad(|| classifier.features_t(&b.images.to_device(device), false));
        feats.push(f.to_kind(Kind::Double).to_device(Device::Cpu));
        if let Some(inception) = inception {
            // The loader normalises for the classifier; Inception takes [0, 1].
            let x = (&b.images * &std + &mean).clamp(0.0, 1.0);
            pooled.push(inception.features(&x).to_kind(Kind::Double));
        }
    }
    let width = tch::no_grad(|| {
        let probe = Tensor::zeros(
            [
                1,
                transform.shape[0] as i64,
                transform.shape[1] as i64,
                transform.shape[2] as i64,
            ],
            (Kind::Float, device),
        );
        classifier.features_t(&probe, false).size()[1]
    });
    let feats = gather_rows(comm, &feats, width)?;
    let pooled = match inception {
        Some(_) => gather_rows(comm, &pooled, crate::model::inception::FEATURES)?.map(Some),
        None => Some(None),
    };
    Ok(feats.zip(pooled))
}

/// Rank 0 gets every rank's rows `[n_r, width]` (float64), in rank order.
fn gather_rows(comm: &Comm, rows: &[Tensor], width: i64) -> Result<Option<Tensor>> {
    let bytes = if rows.is_empty() {
        Vec::new()
    } else {
        let all = Tensor::cat(rows, 0).contiguous();
        let v: Vec<f64> = Vec::try_from(all.reshape([-1]))?;
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    Ok(comm.gather_bytes(&bytes, 0).map(|parts| {
        let flat: Vec<f64> = parts
            .concat()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Tensor::from_slice(&flat).view([-1, width])
    }))
}

/// The Fréchet distance between the Gaussians of two feature sets.
fn fid_of(generated: &Tensor, real: &Tensor) -> f64 {
    let (mu_g, s_g) = moments(generated);
    let (mu_r, s_r) = moments(real);
    frechet_distance(&mu_g, &s_g, &mu_r, &s_r)
}

/// A latent dataset's source images (its train part, cut as it was when
/// encoded, checked by fingerprint) and the judge's transform of them.
fn source_images(plan: &RunPlan, inputs: &Inputs) -> Result<(Transform, Arc<Dataset>)> {
    let dir = plan.data.root.join("train");
    let index = crate::data::latents::read_index(&dir)?;
    let format = crate::data::Format::by_name(&index.source_format).with_context(|| {
        format!(
            "{}: source format {:?} is not one sfron reads",
            dir.display(),
            index.source_format
        )
    })?;
    let root = Path::new(&index.source_root);
    let mut source = Dataset::open(format, root, crate::data::Part::Train).with_context(|| {
        format!(
            "the source images of {} (the judge and FID compare the samples with them)",
            dir.display()
        )
    })?;
    source.limit(index.samples);
    if source.fingerprint != index.source_fingerprint {
        bail!(
            "{}: {} is no longer the data it was encoded from (fingerprint {}, the index says {})",
            dir.display(),
            root.display(),
            source.fingerprint,
            index.source_fingerprint
        );
    }
    // data.train_limit cuts the latents; the images are cut alike.
    source.limit(inputs.train.len());
    let norm = crate::data::default_transform(format, false);
    Ok((
        Transform::adm_crop(index.image_size, &norm),
        Arc::new(source),
    ))
}

/// `sfron eval` of a diffusion model: `model_path` is a weights file or a
/// run folder (`sample.weights` picks its EMA or raw weights).
pub fn run(comm: &Comm, plan: &RunPlan, device: Device, model_path: &Path) -> Result<Status> {
    let started = Instant::now();
    let inputs = Inputs::open(plan)?;
    let class = inputs.forget_class()?;
    let e = &plan.eval;
    if e.classifier.trim().is_empty() {
        bail!("eval.classifier is not set: name the weights of a classifier of this data");
    }
    let classifier_path = Path::new(&e.classifier);
    let arch = Arch::parse(&e.classifier_arch, 1.0)
        .filter(|a| a.task() == crate::model::Task::Classify)
        .with_context(|| {
            format!(
                "eval.classifier_arch = {:?} is not a classifier of the zoo",
                e.classifier_arch
            )
        })?;
    let classifier = load_classifier(&arch, classifier_path, device)?;
    let inception = match e.inception.trim() {
        "" => None,
        path => Some(
            FidInception::load(Path::new(path), device)
                .with_context(|| format!("eval.inception = {path}"))?,
        ),
    };
    // The images the samples are compared with, and how the judge reads
    // both: the data's own (pixel data), or for latents the source images
    // `sfron encode` read, ADM-cropped as they were encoded, normalised as
    // the source format's classifiers expect.
    let (transform, real_images) = if plan.data.format == crate::data::Format::Latents {
        source_images(plan, &inputs)?
    } else {
        (
            crate::data::default_transform(plan.data.format, false),
            inputs.train.clone(),
        )
    };
    let (weights_path, ema) = sample::weights_file(model_path, plan.sample.weights)?;
    let model = sample::load_denoiser(plan, &weights_path, device)?;
    let decoder = sample::latent_decoder(plan, device)?;
    if model.classes != inputs.classes {
        bail!(
            "{} generates {} classes, the data has {}",
            weights_path.display(),
            model.classes,
            inputs.classes
        );
    }
    if comm.is_root() {
        std::fs::create_dir_all(&plan.run_dir)
            .with_context(|| format!("creating {}", plan.run_dir.display()))?;
        save_config(plan)?;
    }
    let per_class = plan.sample.per_class;
    let rows: Vec<(i64, u64)> = (0..model.classes)
        .flat_map(|c| (0..per_class).map(move |i| (c, i)))
        .collect();
    let schedule = crate::diffusion::schedule::Schedule::of(
        &plan.diffusion,
        model.arch.learns_sigma(),
        device,
    );
    let mut progress = Progress::new(&plan.run_dir, comm.is_root(), "eval", 0, 0)?;
    let images = sample::generate_sharded(
        comm,
        (&model, decoder.as_ref()),
        &schedule,
        plan,
        &rows,
        &mut progress,
    )?
    .0;
    progress.finish();
    let real = real_features(
        comm,
        plan,
        (&real_images, &inputs.remain()),
        (&classifier, inception.as_ref()),
        &transform,
        device,
    )?;
    let (Some(images), Some(real)) = (images, real) else {
        comm.barrier();
        return Ok(Status::Done);
    };
    let (preds, feats) = classify(&classifier, &images, &transform, plan.eval.batch, device);
    let labels = Tensor::from_slice(&rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let is_forget = labels.eq(class);
    let hits = preds.eq_tensor(&labels);
    let share_of = |mask: &Tensor| {
        let n = mask.sum(Kind::Double).double_value(&[]);
        100.0 * hits.logical_and(mask).sum(Kind::Double).double_value(&[]) / n.max(1.0)
    };
    let forget_acc = share_of(&is_forget);
    let remain_mask = is_forget.logical_not();
    let remain_acc = share_of(&remain_mask);
    let keep: Vec<i64> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 != class)
        .map(|(i, _)| i as i64)
        .collect();
    let keep_t = Tensor::from_slice(&keep);
    let (real, real_pooled) = real;
    let fid = fid_of(&feats.index_select(0, &keep_t), &real);
    let fid_inception = match (&inception, &real_pooled) {
        (Some(inception), Some(real_pooled)) => {
            let pooled = inception.features(&images.index_select(0, &keep_t));
            Some(fid_of(&pooled.to_kind(Kind::Double), real_pooled))
        }
        _ => None,
    };
    let s = &plan.sample;
    let result = GenerationEval {
        forget_class: class,
        forget_acc,
        remain_acc,
        fid_classifier: fid,
        fid_inception,
        generated_forget: per_class as usize,
        generated_remain: keep.len(),
        real_remain: real.size()[0] as usize,
        weights: if ema { "ema" } else { "raw" }.into(),
        model: weights_path.display().to_string(),
        classifier: classifier_path.display().to_string(),
        sampler: serde_json::json!({
            "method": s.method.as_str(), "steps": s.steps, "eta": s.eta,
            "guidance": s.guidance, "per_class": per_class, "seed": plan.seed,
        }),
        seconds: started.elapsed().as_secs_f64(),
    };
    // For people: the first `sample.grid` images of each class, a row each.
    let all: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let per_row = (plan.sample.grid as usize).clamp(1, per_class as usize);
    let grid = sample::grid_rows(
        &images,
        &all,
        &(0..model.classes).collect::<Vec<_>>(),
        per_row,
    );
    sample::save_grid(&plan.run_dir.join(GRID_FILE), &grid, per_row)?;
    let out = plan.run_dir.join(super::EVAL_FILE);
    crate::fsx::write_atomic(&out, serde_json::to_string_pretty(&result)?.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "class {class} forgotten? FA {:.2}%  remaining accuracy {:.2}%  FID (classifier \
         features) {:.3}{}  [{} generated vs {} real remaining images, {} weights]\n→ {}",
        forget_acc,
        remain_acc,
        fid,
        fid_inception.map_or_else(String::new, |f| format!("  FID (Inception) {f:.3}")),
        keep.len(),
        result.real_remain,
        result.weights,
        out.display()
    );
    comm.barrier();
    Ok(Status::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distance_of_a_gaussian_to_itself_is_zero_and_shifts_add_the_squared_mean() {
        tch::manual_seed(3);
        let f = Tensor::randn([400, 6], (Kind::Double, Device::Cpu));
        let (mu, s) = moments(&f);
        assert!(frechet_distance(&mu, &s, &mu, &s).abs() < 1e-9);
        let shifted = &mu + 2.0;
        let d = frechet_distance(&mu, &s, &shifted, &s);
        assert!((d - 24.0).abs() < 1e-9, "{d}");
    }
}
