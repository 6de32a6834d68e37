//! `sfron bench`: measurements reported as rates and ratios, never asserted
//! in tests. `launch/bench` runs them all in one go, with PyTorch beside
//! them, and prints the ratios BENCHMARKS.md records.
//!
//! - `bench step` ([`step`]): the SFR-on iteration against bare libtorch.
//! - `bench reduce` ([`reduce`]): reductions against the ring model.
//! - `bench data` times the input pipeline on an ImageFolder (generated with
//!   ImageNet-like JPEGs when asked): images per second for the train
//!   transform (RandomResizedCrop 224 + flip) and the eval transform (Resize
//!   256 + CenterCrop 224), for each requested worker count.
//!   `launch/bench-data` runs the same measurement for torchvision's
//!   ImageFolder + DataLoader and writes the ratios into BENCHMARKS.md.
//! - `bench imagenet-shape` and `bench index` ([`scale`]): ImageNet's
//!   cardinality without ImageNet (`launch/bench-imagenet`).

pub mod reduce;
pub mod scale;
pub mod step;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::data::{CorruptPolicy, Dataset, Format, Loader, LoaderOptions, Part, Transform};
use crate::rng::Rng;

/// One measured configuration.
#[derive(Debug, serde::Serialize)]
pub struct DataRate {
    pub transform: &'static str,
    pub workers: usize,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Writes `count` JPEGs of ImageNet-like sizes (200–500 px a side, quality
/// 90) into `root/train/class_XX/`, unless a complete set is there already.
pub fn generate_image_folder(root: &Path, count: usize, classes: usize) -> Result<()> {
    let marker = root.join(format!(".complete-{count}"));
    if marker.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(root);
    let mut rng = Rng::keyed(&[2024, count as u64]);
    for i in 0..count {
        let (w, h) = (200 + rng.below(301) as u32, 200 + rng.below(301) as u32);
        let (fx, fy, phase) = (
            rng.uniform_in(5.0, 40.0),
            rng.uniform_in(5.0, 40.0),
            rng.uniform() * std::f64::consts::TAU,
        );
        let mut noise = Rng::keyed(&[i as u64]);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (xf, yf) = (x as f64, y as f64);
            let base = 128.0 + 90.0 * ((xf / fx + phase).sin() * (yf / fy).cos());
            let n = (noise.below(41) as f64) - 20.0;
            let px = |v: f64| v.clamp(0.0, 255.0) as u8;
            image::Rgb([
                px(base + n),
                px(255.0 * xf / w as f64 + n),
                px(255.0 - base + n),
            ])
        });
        let dir = root.join("train").join(format!("class_{:02}", i % classes));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("img_{i:05}.jpg"));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        image::codecs::jpeg::JpegEncoder::new_with_quality(file, 90)
            .encode_image(&img)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(&marker, b"")?;
    Ok(())
}

/// Images per second of the loader over the first `images` samples.
pub fn data_rates(
    root: &Path,
    images: usize,
    batch: usize,
    workers: &[usize],
) -> Result<Vec<DataRate>> {
    let ds = Arc::new(Dataset::open(Format::ImageFolder, root, Part::Train)?);
    if ds.len() < images {
        bail!(
            "{} holds {} images, fewer than the {images} to time",
            root.display(),
            ds.len()
        );
    }
    let mut rates = Vec::new();
    for (name, transform) in [
        ("train", Transform::imagenet(true)),
        ("eval", Transform::imagenet(false)),
    ] {
        for &w in workers {
            let options = LoaderOptions {
                workers: w,
                prefetch: 2 * w.max(1),
                on_corrupt: CorruptPolicy::Error,
                seed: 0,
                pin_memory: false,
            };
            let mut loader = Loader::new(ds.clone(), transform.clone(), options);
            let order: Vec<usize> = (0..images).collect();
            let chunks: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
            let start = Instant::now();
            let mut seen = 0;
            let mut next = chunks.into_iter();
            let ahead = 2 * w.max(1);
            for chunk in next.by_ref().take(ahead) {
                loader.submit(0, chunk);
            }
            while loader.in_flight() > 0 {
                seen += loader.take()?.len();
                if let Some(chunk) = next.next() {
                    loader.submit(0, chunk);
                }
            }
            let seconds = start.elapsed().as_secs_f64();
            let rate = DataRate {
                transform: name,
                workers: w,
                images: seen,
                seconds,
                images_per_second: seen as f64 / seconds,
            };
            tracing::info!(
                transform = name,
                workers = w,
                images_per_second = rate.images_per_second,
                "measured"
            );
            rates.push(rate);
        }
    }
    Ok(rates)
}
