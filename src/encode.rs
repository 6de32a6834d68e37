//! `sfron encode`: a dataset's images through a VAE's encoder, once, into
//! a latent dataset ([`crate::data::latents`]) that a latent diffusion
//! model (DiT) then trains, unlearns and computes its Fisher on
//! (`data.format = "latents"`), as the released DiT code encodes each batch
//! on the fly (`vae.encode(x).latent_dist.sample().mul_(0.18215)`).
//!
//! Each image gets ADM's centre crop to `encode.image_size`
//! ([`crate::data::transform::adm_center_crop`]), `ToTensor` and
//! `Normalize(0.5, 0.5)` (pixels to [−1, 1]), then the encoder's posterior
//! moments of it and of its mirror image: the released `RandomHorizontalFlip`
//! runs before the encoder, and the posterior draw after it, so keeping both
//! moments lets every epoch draw both as the release does.
//!
//! Both parts of `data.root` (train and test) are encoded, to
//! `encode.out/train` and `encode.out/test`. The shards of a part are
//! spread over the ranks (shard k on rank k mod world), each written
//! atomically with the key of what it was made from: a rerun skips the
//! shards already written (a preempted job resumes), and rewrites a shard
//! made from other data, crop, VAE or sharding. Rank 0 writes a part's
//! `index.json` last; a part whose index exists and matches is skipped
//! whole, one that does not match is refused (exit 2) rather than mixed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};

use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::VaeSection;
use crate::data::latents::{self, FORMAT_TAG, INDEX_FILE, LatentIndex};
use crate::data::transform::adm_center_crop;
use crate::data::{Dataset, Format, Part};
use crate::engine::progress::Progress;
use crate::model::vae::{Vae, VaeSpec};
use crate::model::weights;
use crate::rundir::{Status, save_config};

/// The VAE of `[vae]` for images of `channels` channels.
pub fn vae_spec(v: &VaeSection, channels: i64) -> VaeSpec {
    VaeSpec {
        in_channels: channels,
        out_channels: channels,
        block_out: v.block_out.clone(),
        layers_per_block: v.layers_per_block,
        latent_channels: v.latent_channels,
        groups: v.groups,
        scaling_factor: v.scaling_factor,
    }
}

/// Runs `sfron encode`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device) -> Result<Status> {
    let e = &plan.encode;
    if plan.data.format == Format::Latents {
        bail!(
            "data.format = \"latents\": sfron encode reads images (imagefolder, tar, mnist, cifar) \
             and writes latents"
        );
    }
    if e.vae.trim().is_empty() {
        bail!(
            "encode.vae (--vae) names no VAE weights file ({})",
            crate::model::vae::EXPORT_HINT
        );
    }
    if e.out.trim().is_empty() {
        bail!("encode.out (--out) names no folder for the latent dataset");
    }
    for (key, v) in [
        ("encode.image_size", e.image_size),
        ("encode.shard_size", e.shard_size),
        ("encode.batch", e.batch),
    ] {
        if v == 0 {
            bail!("{key} must be at least 1");
        }
    }
    let vae_path = PathBuf::from(&e.vae);
    let out = PathBuf::from(&e.out);
    // Everything is read and checked before anything is written.
    let parts = [Part::Train, Part::Test]
        .into_iter()
        .map(|part| crate::inputs::Inputs::open_part(plan, part).map(|ds| (part, ds)))
        .collect::<Result<Vec<_>>>()?;
    let channels = parts[0].1.load(0).map(|img| img.channels as i64)?;
    let spec = vae_spec(&plan.vae, channels);
    spec.check()
        .map_err(|why| anyhow::anyhow!("[vae]: {why}"))?;
    let size = e.image_size as i64;
    if size % spec.downsampling() != 0 {
        bail!(
            "encode.image_size = {size} is not a multiple of the VAE's downsampling {} (DiT: \
             256 or 512)",
            spec.downsampling()
        );
    }
    let vae = Vae::load(&vae_path, &spec, device)?;
    let digest = vae.digest.clone();
    let mut plans = Vec::new();
    for (part, ds) in &parts {
        let index = LatentIndex {
            format: FORMAT_TAG.into(),
            source_format: plan.data.format.name().into(),
            source_root: std::fs::canonicalize(&plan.data.root)
                .unwrap_or_else(|_| plan.data.root.clone())
                .display()
                .to_string(),
            source_part: latents::part_dir(*part).into(),
            source_fingerprint: ds.fingerprint.clone(),
            classes: ds.classes.clone(),
            samples: ds.len(),
            shard_size: e.shard_size as usize,
            image_size: e.image_size as usize,
            latent_channels: spec.latent_channels as usize,
            latent_side: (size / spec.downsampling()) as usize,
            scaling_factor: spec.scaling_factor,
            vae_file: std::fs::canonicalize(&vae_path)
                .unwrap_or_else(|_| vae_path.clone())
                .display()
                .to_string(),
            vae_digest: digest.clone(),
            vae_spec: serde_json::to_value(&spec)?,
        };
        let dir = out.join(latents::part_dir(*part));
        let done = match latents::read_index(&dir) {
            Ok(found) if found.key() == index.key() => true,
            Ok(found) => bail!(
                "{}: a latent dataset of other data, crop, VAE or sharding ({} samples from {}, \
                 crop {}, VAE {}): choose another encode.out or remove it",
                dir.join(INDEX_FILE).display(),
                found.samples,
                found.source_root,
                found.image_size,
                found.vae_file
            ),
            Err(_) => false,
        };
        plans.push((ds, dir, index, done));
    }
    if comm.is_root() {
        std::fs::create_dir_all(&plan.run_dir)
            .with_context(|| format!("creating {}", plan.run_dir.display()))?;
        save_config(plan)?;
    }
    let todo: usize = plans
        .iter()
        .filter(|p| !p.3)
        .map(|p| p.2.shards().div_ceil(comm.size()))
        .sum();
    let progress = Progress::new(&plan.run_dir, comm.is_root(), "encode", todo as u64, 0)?;
    let mut step = 0u64;
    let mut written = 0usize;
    let started = std::time::Instant::now();
    for (ds, dir, index, done) in &plans {
        if *done {
            tracing::info!(part = %index.source_part, "already encoded");
            continue;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for k in (comm.rank()..index.shards()).step_by(comm.size()) {
            let path = dir.join(latents::shard_file(k));
            let n = index.shard_len(k);
            let complete = latents::read_shard(&path, n, index.floats_per_sample())
                .is_ok_and(|layout| layout.key == index.key());
            if !complete {
                let first = k * index.shard_size;
                write_shard(ds, &vae, index, first..first + n, e.batch as usize, &path)?;
                written += 1;
            }
            step += 1;
            progress.show(
                step,
                &format!(
                    "{} shard {} of {}",
                    index.source_part,
                    k + 1,
                    index.shards()
                ),
            );
        }
        comm.barrier();
        if comm.is_root() {
            let text = serde_json::to_string_pretty(index)? + "\n";
            crate::fsx::write_atomic(&dir.join(INDEX_FILE), text.as_bytes())
                .with_context(|| format!("writing {}", dir.join(INDEX_FILE).display()))?;
        }
        comm.barrier();
    }
    progress.finish();
    if comm.is_root() {
        let summary = serde_json::json!({
            "command": "encode",
            "out": out.display().to_string(),
            "vae": vae_path.display().to_string(),
            "vae_digest": digest,
            "image_size": e.image_size,
            "parts": plans.iter().map(|p| serde_json::json!({
                "part": p.2.source_part, "samples": p.2.samples, "shards": p.2.shards(),
                "already_encoded": p.3,
            })).collect::<Vec<_>>(),
            "shards_written_by_rank_0": written,
            "seconds": started.elapsed().as_secs_f64(),
        });
        crate::fsx::write_atomic(
            &plan.run_dir.join("encode.json"),
            (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
        )?;
        println!(
            "encode: {} → {} ({} train and {} test samples, {}x{} latents of {} channels)",
            plan.data.root.display(),
            out.display(),
            plans[0].2.samples,
            plans[1].2.samples,
            plans[0].2.latent_side,
            plans[0].2.latent_side,
            plans[0].2.latent_channels
        );
    }
    Ok(Status::Done)
}

/// Images `range` of `ds` cropped, scaled to [−1, 1] and encoded with their
/// mirrors; written to `path` as one shard.
fn write_shard(
    ds: &Dataset,
    vae: &Vae,
    index: &LatentIndex,
    range: std::ops::Range<usize>,
    batch: usize,
    path: &Path,
) -> Result<()> {
    let size = index.image_size;
    let mut moments = Vec::new();
    let ids: Vec<&str> = range.clone().map(|i| ds.ids[i].as_str()).collect();
    let labels: Vec<i64> = range.clone().map(|i| ds.labels[i]).collect();
    let indices: Vec<usize> = range.collect();
    for chunk in indices.chunks(batch) {
        let mut images = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let img = ds.load(i)?;
            let crop = adm_center_crop(&img, size)
                .map_err(|why| anyhow::anyhow!("{}: {why}", ds.describe(i)))?;
            let c = crop.channels as i64;
            let x = Tensor::from_slice(&crop.data)
                .view([size as i64, size as i64, c])
                .permute([2, 0, 1])
                .to_kind(Kind::Float)
                / 255.0;
            images.push((x - 0.5) / 0.5);
        }
        let x = Tensor::stack(&images, 0).to_device(vae.device());
        let m = tch::no_grad(|| {
            let plain = vae.net.encode_moments(&x);
            let mirrored = vae.net.encode_moments(&x.flip([3]));
            Tensor::stack(&[plain, mirrored], 1)
        });
        moments.push(m.to_device(Device::Cpu).flatten(1, -1));
    }
    let moments = Tensor::cat(&moments, 0).contiguous();
    let mut meta = BTreeMap::new();
    meta.insert("key".to_string(), index.key());
    meta.insert("ids".to_string(), serde_json::to_string(&ids)?);
    let tensors = vec![
        ("moments".to_string(), moments),
        ("labels".to_string(), Tensor::from_slice(&labels)),
    ];
    weights::save(path, &tensors, &meta)?;
    Ok(())
}
