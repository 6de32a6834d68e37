//! `sfron sample`: images from a diffusion model, per class, seeded and
//! sharded across ranks.
//!
//! The images are the rows `(class, index)` for each class of
//! `sample.classes` and index `0..per_class`, in that order; rank r of W
//! generates its contiguous share of them in batches of `sample.batch`.
//! Each image draws its noise from its own key `(seed, class, index)`
//! ([`crate::diffusion::sample`]), so the images do not depend on the
//! rank count or the batch size. Rank 0 gathers them and writes, in the run
//! folder:
//! - `samples.safetensors`: `images` uint8 `[N, C, H, W]` (the model's
//!   [−1, 1] mapped to 0..255 as the release's `torch2hwcuint8` and
//!   `save_image` do: `round(255 · clamp((x + 1)/2, 0, 1))`), `labels`
//!   int64 `[N]`, and in its metadata which weights were sampled;
//! - `samples.npz`: the same images for standard FID tools (`arr_0` uint8
//!   `[N, H, W, C]`, `arr_1` the labels, as guided-diffusion's `sample_ddp`);
//!   with `sample.png_files`, each image as `samples/<class>-<index>.png`;
//! - `grid.png`: one row per class, the first `sample.grid` images of it;
//! - `sample.json`: what was generated, with what, in how long.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::comm::Comm;
use crate::config::RunPlan;
use crate::config::raw::{SampleMethod, SampleWeights};
use crate::data::sampler::share;
use crate::diffusion::sample::{self, Method, Plan};
use crate::diffusion::schedule::Schedule;
use crate::engine::ema::EMA_FILE;
use crate::engine::progress::Progress;
use crate::model::vae::{Vae, VaeSpec};
use crate::model::{Model, weights};
use crate::rng::{Rng, tag};
use crate::rundir::{EMA_DECAY, MODEL_FILE, Status, save_config};

/// The file of the generated images in the run folder.
pub const SAMPLES_FILE: &str = "samples.safetensors";

/// Which weights file `sample.from` names, and whether it holds an EMA.
pub fn weights_file(from: &Path, which: SampleWeights) -> Result<(PathBuf, bool)> {
    if from.as_os_str().is_empty() {
        bail!("sample.from is not set: name a weights file or a run folder (--from PATH)");
    }
    if from.is_dir() {
        let name = match which {
            SampleWeights::Ema => EMA_FILE,
            SampleWeights::Raw => MODEL_FILE,
        };
        let path = from.join(name);
        if !path.is_file() {
            bail!(
                "{} has no {name} (sample.weights = {:?}): not a finished run folder of a \
                 diffusion model{}",
                from.display(),
                which.as_str(),
                if which == SampleWeights::Ema {
                    ", or one trained with diffusion.ema_decay = 0 (use sample.weights = \"raw\")"
                } else {
                    ""
                }
            );
        }
        return Ok((path, which == SampleWeights::Ema));
    }
    if !from.is_file() {
        bail!("sample.from = {}: no such file or folder", from.display());
    }
    let (_, meta) = weights::load(from)?;
    Ok((from.to_path_buf(), meta.contains_key(EMA_DECAY)))
}

/// The EMA file beside the weights file `path` when `which` asks for EMA
/// weights and there is one (`None`: sample `path` itself).
pub fn ema_beside(path: &Path, which: SampleWeights) -> Option<PathBuf> {
    let ema = path.with_file_name(EMA_FILE);
    (which == SampleWeights::Ema && ema.is_file()).then_some(ema)
}

/// Builds the configured denoiser and loads `path` into it; image channels
/// and classes are read from the file ([`crate::model::Arch::denoiser_shape_keys`]).
pub fn load_denoiser(plan: &RunPlan, path: &Path, device: Device) -> Result<Model> {
    // Read once: the shapes come from the same bytes that are loaded.
    let bytes = weights::read(path)?;
    let (tensors, _) = weights::parse(&bytes, path)?;
    let shape = |name: &str| {
        weights::shape_of(&tensors, name).with_context(|| {
            format!(
                "{}: no {name}: not the weights of a diffusion model ({})",
                path.display(),
                plan.model.arch.name()
            )
        })
    };
    let (channels_key, classes_key, extra_rows) = plan
        .model
        .arch
        .denoiser_shape_keys()
        .context("not a denoiser")?;
    let (channels, classes) = (shape(channels_key)?, shape(classes_key)?);
    let classes = classes[0] - extra_rows;
    let mut model = Model::new(plan.model.arch.clone(), channels[1], classes, device);
    model.load_bytes(&bytes, path)?;
    model
        .set_compute(plan.compute())
        .map_err(anyhow::Error::msg)?;
    Ok(model)
}

/// The sampler `[sample]` asks for.
pub fn sampler_plan(plan: &RunPlan) -> Plan {
    let s = &plan.sample;
    Plan {
        method: match s.method {
            SampleMethod::Ddim => Method::Ddim { eta: s.eta },
            SampleMethod::Ddpm => Method::Ddpm,
        },
        steps: s.steps,
        guidance: s.guidance,
        // Pixels live in [−1, 1]; DiT's sample.py does not clamp latents.
        clip: plan.data.format != crate::data::Format::Latents,
    }
}

/// The key of image `index` of `class`.
pub fn image_key(seed: u64, class: i64, index: u64) -> u64 {
    Rng::keyed(&[seed, tag::SAMPLE, class as u64, index]).next_u64()
}

/// `[−1, 1]` floats to uint8 pixels.
pub fn to_pixels(x: &Tensor) -> Tensor {
    ((x + 1.0) / 2.0)
        .clamp(0.0, 1.0)
        .g_mul_scalar(255.0)
        .round()
        .to_kind(Kind::Uint8)
}

/// Generates `rows` (class, index) across the ranks, decoding latents with
/// `decoder` ([`latent_decoder`], resolved by the caller before it writes
/// anything); rank 0 gets every image as uint8 `[N, C, H, W]` in row order
/// (other ranks `None`). Also
/// the fastest visited timestep on this rank in seconds (a whole sampling
/// step of a batch: the guided forward passes, the update, the keyed
/// noise; infinite when the rank had no rows).
pub fn generate_sharded(
    comm: &Comm,
    (model, decoder): (&Model, Option<&(Vae, [i64; 3])>),
    schedule: &Schedule,
    plan: &RunPlan,
    rows: &[(i64, u64)],
    progress: &mut Progress,
) -> Result<(Option<Tensor>, f64)> {
    let mut fastest = f64::INFINITY;
    let sampler = sampler_plan(plan);
    let shape = match decoder {
        Some((_, pixels)) => *pixels,
        None => model.image_shape().context("not a denoiser")?,
    };
    let mine = &rows[share(rows.len(), comm.rank(), comm.size())];
    let per_batch = plan.sample.batch as usize;
    let mut done = 0u64;
    let mut local = Vec::new();
    for chunk in mine.chunks(per_batch) {
        let classes: Vec<i64> = chunk.iter().map(|r| r.0).collect();
        let keys: Vec<u64> = chunk
            .iter()
            .map(|&(c, i)| image_key(plan.seed, c, i))
            .collect();
        let finished = local.len() * per_batch;
        let mut last = Instant::now();
        let x = sample::generate(model, schedule, &sampler, &classes, &keys, || {
            fastest = fastest.min(last.elapsed().as_secs_f64());
            last = Instant::now();
            done += 1;
            progress.show(done, &format!("{finished} of {} images", mine.len()));
        });
        let x = match &decoder {
            Some((vae, _)) => tch::no_grad(|| vae.net.decode_scaled(&x)),
            None => x,
        };
        local.push(to_pixels(&x).to_device(Device::Cpu));
    }
    let bytes: Vec<u8> = if local.is_empty() {
        Vec::new()
    } else {
        let all = Tensor::cat(&local, 0).contiguous();
        Vec::<u8>::try_from(all.reshape([-1])).context("uint8 images")?
    };
    let gathered = comm.gather_bytes(&bytes, 0);
    let images = gathered.map(|parts| {
        let flat: Vec<u8> = parts.concat();
        Tensor::from_slice(&flat).view([rows.len() as i64, shape[0], shape[1], shape[2]])
    });
    Ok((images, fastest))
}

/// The VAE that decodes a latent denoiser's samples (data.format =
/// "latents"): the one its latent dataset was encoded with (the index's
/// file, checked by digest), with the `[C, H, W]` of the images it
/// decodes to; `None` for pixel data.
pub fn latent_decoder(plan: &RunPlan, device: Device) -> Result<Option<(Vae, [i64; 3])>> {
    if plan.data.format != crate::data::Format::Latents {
        return Ok(None);
    }
    let dir = plan.data.root.join("train");
    let index = crate::data::latents::read_index(&dir)?;
    let spec: VaeSpec = serde_json::from_value(index.vae_spec.clone()).with_context(|| {
        format!(
            "{}: its vae_spec is not a VAE's shape",
            dir.join(crate::data::latents::INDEX_FILE).display()
        )
    })?;
    let path = PathBuf::from(&index.vae_file);
    let vae = Vae::load_verified(&path, &spec, device, |digest| {
        if digest != index.vae_digest {
            bail!(
                "{}: not the VAE {} was encoded with (digest {digest}, the index says {}): the \
                 samples would decode wrongly",
                path.display(),
                dir.display(),
                index.vae_digest
            );
        }
        Ok(())
    })?;
    let side = (index.latent_side as i64) * spec.downsampling();
    Ok(Some((vae, [spec.out_channels, side, side])))
}

/// The samples for standard FID tools (ADM's evaluator, pytorch-fid's
/// `.npz` input): `arr_0` uint8 `[N, H, W, C]`, `arr_1` int64 labels, as
/// guided-diffusion's `sample_ddp` writes them.
pub const NPZ_FILE: &str = "samples.npz";

/// The folder of the per-image PNGs (`sample.png_files`).
pub const PNG_DIR: &str = "samples";

/// One `.npy` (format 1.0) of `shape` and numpy `descr` holding `data`.
fn npy(descr: &str, shape: &[i64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6), version (2), header length (2), header: a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes [`NPZ_FILE`] at `path` (atomically) from uint8 `[N, C, H, W]`
/// images and their labels.
pub fn write_npz(path: &Path, images: &Tensor, labels: &[i64]) -> Result<()> {
    use std::io::Write;
    let nhwc = images.permute([0, 2, 3, 1]).contiguous();
    let shape = nhwc.size();
    let pixels = Vec::<u8>::try_from(nhwc.reshape([-1])).context("uint8 images")?;
    let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(pixels.len() > u32::MAX as usize / 2);
    for (name, bytes) in [
        ("arr_0.npy", npy("|u1", &shape, &pixels)),
        (
            "arr_1.npy",
            npy("<i8", &[labels.len() as i64], &label_bytes),
        ),
    ] {
        zip.start_file(name, stored)?;
        zip.write_all(&bytes)?;
    }
    let bytes = zip.finish()?.into_inner();
    crate::fsx::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes each image as `dir/<class>-<index>.png` (`sample.png_files`).
fn write_pngs(dir: &Path, images: &Tensor, rows: &[(i64, u64)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, c, h, w) = images.size4().context("NCHW images")?;
    let color = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    for (k, &(class, index)) in rows.iter().enumerate() {
        let hwc = images.get(k as i64).permute([1, 2, 0]).contiguous();
        let bytes = Vec::<u8>::try_from(hwc.reshape([-1])).context("uint8 image")?;
        let path = dir.join(format!("{class:04}-{index:06}.png"));
        image::save_buffer_with_format(
            &path,
            &bytes,
            w as u32,
            h as u32,
            color,
            image::ImageFormat::Png,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A PNG of `images` uint8 `[N, C, H, W]` laid out `rows × cols` (row-major,
/// missing cells black), 2-pixel gaps.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let (n, c, h, w) = images.size4().context("NCHW images")?;
    let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
    let rows = n.div_ceil(cols.max(1)).max(1);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let mut canvas = image::RgbImage::new(gw as u32, gh as u32);
    let pixels: Vec<u8> = Vec::try_from(images.contiguous().reshape([-1]))?;
    for k in 0..n {
        let (r, q) = (k / cols, k % cols);
        let base = k * c * h * w;
        for y in 0..h {
            for x in 0..w {
                let at = |ch: usize| pixels[base + ch * h * w + y * w + x];
                let rgb = if c == 1 {
                    [at(0); 3]
                } else {
                    [at(0), at(1), at(2)]
                };
                let (px, py) = (gap + q * (w + gap) + x, gap + r * (h + gap) + y);
                canvas.put_pixel(px as u32, py as u32, image::Rgb(rgb));
            }
        }
    }
    let mut bytes = Vec::new();
    canvas
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
    crate::fsx::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// The first `per_row` images of each class, one class per grid row.
pub fn grid_rows(images: &Tensor, labels: &[i64], classes: &[i64], per_row: usize) -> Tensor {
    let mut picked = Vec::new();
    for &c in classes {
        let idx: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == c)
            .map(|(i, _)| i as i64)
            .take(per_row)
            .collect();
        for &i in &idx {
            picked.push(images.get(i));
        }
        for _ in idx.len()..per_row {
            picked.push(images.get(0).zeros_like());
        }
    }
    Tensor::stack(&picked, 0)
}

/// Runs `sfron sample`.
pub fn run(comm: &Comm, plan: &RunPlan, device: Device) -> Result<Status> {
    let s = &plan.sample;
    let (path, ema) = weights_file(Path::new(&s.from), s.weights)?;
    let model = load_denoiser(plan, &path, device)?;
    let decoder = latent_decoder(plan, device)?;
    let classes: Vec<i64> = if s.classes.is_empty() {
        (0..model.classes).collect()
    } else {
        s.classes.clone()
    };
    if let Some(c) = classes.iter().find(|&&c| c >= model.classes) {
        bail!(
            "sample.classes: class {c} is not in {} (its model has {} classes, 0 to {})",
            path.display(),
            model.classes,
            model.classes - 1
        );
    }
    let rows: Vec<(i64, u64)> = classes
        .iter()
        .flat_map(|&c| (0..s.per_class).map(move |i| (c, i)))
        .collect();
    let schedule = Schedule::of(&plan.diffusion, model.arch.learns_sigma(), device);
    let visits = sample::visits(&schedule, s.steps) as u64;
    let local_rows = share(rows.len(), comm.rank(), comm.size()).len();
    let total = visits * local_rows.div_ceil(s.batch as usize) as u64;
    if comm.is_root() {
        std::fs::create_dir_all(&plan.run_dir)
            .with_context(|| format!("creating {}", plan.run_dir.display()))?;
        save_config(plan)?;
    }
    let mut progress = Progress::new(&plan.run_dir, comm.is_root(), "sample", total, 0)?;
    tracing::info!(
        images = rows.len(),
        classes = classes.len(),
        weights = %path.display(),
        ema,
        steps = visits,
        guidance = s.guidance,
        "sample"
    );
    let started = Instant::now();
    let (images, fastest) = generate_sharded(
        comm,
        (&model, decoder.as_ref()),
        &schedule,
        plan,
        &rows,
        &mut progress,
    )?;
    progress.finish();
    if let Some(images) = images {
        let labels: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let which = if ema { "ema" } else { "raw" };
        let mut meta = BTreeMap::new();
        meta.insert("sfron.sampled_weights".into(), which.to_string());
        meta.insert("sfron.sampled_from".into(), path.display().to_string());
        meta.insert("sfron.arch".into(), model.arch.name());
        let tensors = [
            ("images".to_string(), images.shallow_clone()),
            ("labels".to_string(), Tensor::from_slice(&labels)),
        ];
        weights::save(&plan.run_dir.join(SAMPLES_FILE), &tensors, &meta)?;
        write_npz(&plan.run_dir.join(NPZ_FILE), &images, &labels)?;
        if s.png_files {
            write_pngs(&plan.run_dir.join(PNG_DIR), &images, &rows)?;
        }
        let grid = grid_rows(&images, &labels, &classes, s.grid as usize);
        save_grid(&plan.run_dir.join("grid.png"), &grid, s.grid as usize)?;
        let summary = json!({
            "command": "sample", "images": rows.len(), "classes": classes,
            "per_class": s.per_class, "weights": which, "from": path.display().to_string(),
            "method": s.method.as_str(), "process": plan.diffusion.process.as_str(), "steps": visits, "eta": s.eta, "guidance": s.guidance,
            "seed": plan.seed, "ranks": comm.size(), "seconds": started.elapsed().as_secs_f64(),
            // Rank 0's fastest sampling step (its batch of `sample.batch` at most).
            "fastest_step_s": fastest.is_finite().then_some(fastest),
        });
        let out = plan.run_dir.join("sample.json");
        crate::fsx::write_atomic(&out, serde_json::to_string_pretty(&summary)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
        tracing::info!(path = %plan.run_dir.join(SAMPLES_FILE).display(), "sample done");
    }
    comm.barrier();
    Ok(Status::Done)
}
