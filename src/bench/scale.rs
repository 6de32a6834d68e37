//! ImageNet's cardinality without ImageNet.
//!
//! `sfron bench imagenet-shape` writes a dataset of ImageNet-1k's shape —
//! 1,000 classes of 732 to 1,300 training samples, 1,281,167 in all, and 50
//! validation samples per class, times `--scale` — as WebDataset tar shards
//! or as an ImageFolder, of tiny JPEGs (32 × 32, one per class reused: what
//! scales with the sample count is the bookkeeping, not the pixels). The
//! per-class counts are a seeded stand-in with ImageNet's total, minimum and
//! maximum (ImageNet's own list is not at hand offline); the costs measured
//! depend on the total and on the largest classes, which it matches.
//!
//! `sfron bench index` times, on the configured dataset, what grows with the
//! sample count: indexing (`Dataset::open`), reading and checking a split
//! manifest and deriving the remain set, and the sampler's epoch for each
//! of `--ranks` world sizes (rank 0's shares, and all ranks' in turn), with
//! the process's peak resident memory after each.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::config::RunPlan;
use crate::data::{Manifest, Part, Sampler, Stream};
use crate::inputs::Inputs;
use crate::rng::Rng;

/// ImageNet-1k's training samples, classes and validation samples per class.
pub const IMAGENET_TRAIN: usize = 1_281_167;
pub const IMAGENET_CLASSES: usize = 1000;
pub const IMAGENET_VAL_PER_CLASS: usize = 50;
/// ImageNet-1k's smallest and largest class.
const SMALLEST: usize = 732;
const LARGEST: usize = 1300;

/// Per-class training counts: ImageNet's total, between its smallest and
/// largest class, most classes at the largest (a seeded stand-in).
pub fn imagenet_counts() -> Vec<usize> {
    let mut counts = vec![LARGEST; IMAGENET_CLASSES];
    counts[0] = SMALLEST;
    let mut deficit = LARGEST * IMAGENET_CLASSES - IMAGENET_TRAIN - (LARGEST - SMALLEST);
    let mut rng = Rng::keyed(&[0x696d_6167_656e_6574]); // "imagenet"
    while deficit > 0 {
        let c = 1 + rng.below(IMAGENET_CLASSES as u64 - 1) as usize;
        let room = counts[c] - SMALLEST;
        let d = deficit.min(room).min(1 + rng.below(400) as usize);
        counts[c] -= d;
        deficit -= d;
    }
    counts
}

/// The counts at `scale` (each class at least one sample).
fn scaled(counts: &[usize], scale: f64) -> Vec<usize> {
    counts
        .iter()
        .map(|&n| ((n as f64 * scale).round() as usize).max(1))
        .collect()
}

/// A 32 × 32 JPEG whose colour and pattern depend on `class`.
fn tiny_jpeg(class: usize) -> Result<Vec<u8>> {
    let mut rng = Rng::keyed(&[class as u64, 32]);
    let (r, g, b) = (rng.below(256), rng.below(256), rng.below(256));
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        let s = ((x * 7 + y * 13 + class as u32) % 64) as u64;
        image::Rgb([(r + s) as u8, (g + 2 * s) as u8, (b + 3 * s) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&img)?;
    Ok(out)
}

/// Samples per tar shard (WebDataset's usual few thousand).
const PER_SHARD: usize = 5000;

/// The layout `generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeFormat {
    /// WebDataset tar shards (`data.format = "tar"`).
    Tar,
    /// One folder per class (`data.format = "imagefolder"`).
    Imagefolder,
}

impl ShapeFormat {
    pub fn name(self) -> &'static str {
        match self {
            ShapeFormat::Tar => "tar",
            ShapeFormat::Imagefolder => "imagefolder",
        }
    }
}

/// Marks a folder as this generator's (so that a rerun may replace it).
const OWNED: &str = ".sfron-imagenet-shape";

/// Writes an ImageNet-shaped dataset at `scale` under `root` (`train/`,
/// `val/`) in `format`; returns the training and validation sample counts.
/// A complete earlier copy is kept; an incomplete one of this generator is
/// replaced; any other non-empty folder is refused, untouched.
pub fn generate(root: &Path, scale: f64, format: ShapeFormat) -> Result<(usize, usize)> {
    if !(scale > 0.0 && scale <= 1.0) {
        bail!("--scale {scale}: must be in (0, 1]");
    }
    let train = scaled(&imagenet_counts(), scale);
    let val = scaled(&vec![IMAGENET_VAL_PER_CLASS; IMAGENET_CLASSES], scale);
    let totals = (train.iter().sum(), val.iter().sum());
    let marker = root.join(format!(
        ".complete-{}-{}-{}",
        format.name(),
        totals.0,
        totals.1
    ));
    if marker.exists() {
        return Ok(totals);
    }
    let occupied = std::fs::read_dir(root).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        if !root.join(OWNED).exists() {
            bail!(
                "--out {}: the folder exists and was not written by `sfron bench imagenet-shape`; \
                 give an empty or new folder",
                root.display()
            );
        }
        std::fs::remove_dir_all(root).with_context(|| format!("clearing {}", root.display()))?;
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    std::fs::write(root.join(OWNED), b"")?;
    let jpegs: Vec<Vec<u8>> = (0..IMAGENET_CLASSES)
        .map(tiny_jpeg)
        .collect::<Result<_>>()?;
    for (part, counts) in [("train", &train), ("val", &val)] {
        let dir = root.join(part);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        match format {
            ShapeFormat::Tar => write_shards(&dir, counts, &jpegs)?,
            ShapeFormat::Imagefolder => write_folders(&dir, counts, &jpegs)?,
        }
    }
    std::fs::write(&marker, b"")?;
    Ok(totals)
}

fn write_shards(dir: &Path, counts: &[usize], jpegs: &[Vec<u8>]) -> Result<()> {
    let mut builder: Option<tar::Builder<std::io::BufWriter<std::fs::File>>> = None;
    let mut written = 0usize;
    for (class, &n) in counts.iter().enumerate() {
        for i in 0..n {
            if written.is_multiple_of(PER_SHARD) {
                if let Some(b) = builder.take() {
                    b.into_inner()?.flush()?;
                }
                let path = dir.join(format!("shard-{:06}.tar", written / PER_SHARD));
                let file = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                builder = Some(tar::Builder::new(std::io::BufWriter::new(file)));
            }
            let b = builder.as_mut().expect("a shard is open");
            let key = format!("n{class:08}_{i}");
            let label = class.to_string();
            for (ext, bytes) in [("jpg", &jpegs[class][..]), ("cls", label.as_bytes())] {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                b.append_data(&mut header, format!("{key}.{ext}"), bytes)?;
            }
            written += 1;
        }
    }
    if let Some(b) = builder.take() {
        b.into_inner()?.flush()?;
    }
    Ok(())
}

fn write_folders(dir: &Path, counts: &[usize], jpegs: &[Vec<u8>]) -> Result<()> {
    for (class, &n) in counts.iter().enumerate() {
        let folder = dir.join(format!("n{class:08}"));
        std::fs::create_dir_all(&folder)?;
        for i in 0..n {
            std::fs::write(folder.join(format!("n{class:08}_{i}.jpg")), &jpegs[class])?;
        }
    }
    Ok(())
}

/// This process's peak resident memory so far, in MiB.
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// `sfron bench index`: JSON lines of the costs that grow with the dataset.
pub fn index(
    plan: &RunPlan,
    split: Option<&Path>,
    ranks: &[usize],
) -> Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let train = Inputs::open_part(plan, Part::Train)?;
    rows.push(json!({
        "bench": "index", "what": "index", "format": plan.data.format.name(),
        "samples": train.len(), "classes": train.num_classes(),
        "seconds": t0.elapsed().as_secs_f64(), "peak_rss_mib": peak_rss_mib(),
    }));
    let mut members: Vec<usize> = (0..train.len()).collect();
    if let Some(path) = split {
        let t0 = Instant::now();
        let manifest = Manifest::load(path)?;
        let loaded = t0.elapsed().as_secs_f64();
        manifest.check(&train, path)?;
        members = manifest.remain();
        rows.push(json!({
            "bench": "index", "what": "split", "manifest_bytes": std::fs::metadata(path)?.len(),
            "forget": manifest.forget.len(), "load_seconds": loaded,
            "check_and_remain_seconds": t0.elapsed().as_secs_f64() - loaded,
            "peak_rss_mib": peak_rss_mib(),
        }));
    }
    for &world in ranks {
        let mut sampler = Sampler::new(
            members.clone(),
            plan.seed,
            Stream::Remain,
            plan.train.batch,
            true,
            false,
        );
        let batches = sampler.batches_per_epoch();
        let mut rank0 = 0.0;
        let t0 = Instant::now();
        let mut seen = 0usize;
        for rank in 0..world {
            let t = Instant::now();
            for k in 0..batches {
                seen += sampler.local_batch(0, k, rank, world).len();
            }
            if rank == 0 {
                rank0 = t.elapsed().as_secs_f64();
            }
        }
        if seen != members.len() {
            bail!(
                "the sampler's {world} ranks saw {seen} of {} samples",
                members.len()
            );
        }
        rows.push(json!({
            "bench": "index", "what": "sampler", "ranks": world, "batch": plan.train.batch,
            "batches": batches, "rank0_seconds": rank0, "all_ranks_seconds": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": peak_rss_mib(),
        }));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stand_in_has_imagenets_total_smallest_and_largest_class() {
        let counts = imagenet_counts();
        assert_eq!(counts.len(), IMAGENET_CLASSES);
        assert_eq!(counts.iter().sum::<usize>(), IMAGENET_TRAIN);
        assert_eq!(*counts.iter().min().unwrap(), SMALLEST);
        assert_eq!(*counts.iter().max().unwrap(), LARGEST);
        assert_eq!(scaled(&counts, 0.001).iter().sum::<usize>(), 1000);
    }

    #[test]
    fn a_foreign_folder_is_refused_untouched_and_a_complete_copy_is_kept() {
        let root = std::env::temp_dir().join(format!("sfron-shape-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("mine.txt"), b"keep").unwrap();
        let refused = format!("{:#}", generate(&root, 1e-4, ShapeFormat::Tar).unwrap_err());
        assert!(refused.contains("not written by"), "{refused}");
        assert_eq!(std::fs::read(root.join("mine.txt")).unwrap(), b"keep");
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            generate(&root, 1e-4, ShapeFormat::Imagefolder).unwrap(),
            (1000, 1000)
        );
        let shard = root.join("train/n00000000/n00000000_0.jpg");
        let before = std::fs::metadata(&shard).unwrap().modified().unwrap();
        assert_eq!(
            generate(&root, 1e-4, ShapeFormat::Imagefolder).unwrap(),
            (1000, 1000)
        );
        assert_eq!(
            std::fs::metadata(&shard).unwrap().modified().unwrap(),
            before
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
