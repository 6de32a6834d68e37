//! Per-sample transforms: decoded bytes → normalised `C×H×W` floats.
//!
//! They follow torchvision's definitions so that numbers match PyTorch runs:
//! - MNIST: `ToTensor` + `Normalize((0.1307,), (0.3081,))`, train and test.
//! - CIFAR train: `RandomCrop(32, padding=4)` (zero padding) +
//!   `RandomHorizontalFlip` + normalise; test: normalise.
//! - ImageNet train: `RandomResizedCrop(224)` (scale 0.08–1, ratio 3/4–4/3,
//!   10 tries then the centre fallback) + flip; eval: `Resize(256)` (shorter
//!   side, bilinear with antialias as PIL) + `CenterCrop(224)`; normalise.
//!
//! Random choices come from an [`Rng`] keyed by (seed, epoch, sample), so they
//! do not depend on worker or rank counts. Resizing uses fast_image_resize's
//! convolution, which computes PIL's bilinear filter (support scaled by the
//! downscale factor) in fixed point as Pillow does.

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::dataset::Image;
use crate::rng::Rng;

pub const MNIST_MEAN: [f32; 1] = [0.1307];
pub const MNIST_STD: [f32; 1] = [0.3081];
/// The usual CIFAR-10 normalisation (the SalUn / Unlearn-Sparse lineage's
/// `NormalizeByChannelMeanStd`): the training set's per-channel statistics.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// The SFR-on authors' released CIFAR-10 normalisation
/// (`Classification/dataset/cifar10.py`): the same means, and the widely
/// copied stds (0.2023, 0.1994, 0.2010) of the per-image statistics.
pub const CIFAR10_RELEASED_MEAN: [f32; 3] = [0.491_400_8, 0.482_159, 0.446_530_94];
pub const CIFAR10_RELEASED_STD: [f32; 3] = [0.202_302_75, 0.199_413_1, 0.200_960_7];
pub const CIFAR100_MEAN: [f32; 3] = [0.5071, 0.4865, 0.4409];
pub const CIFAR100_STD: [f32; 3] = [0.2673, 0.2564, 0.2762];
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The recipe applied to each sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    /// Normalise only (MNIST, CIFAR test, any fixed-size data).
    Normalize,
    /// Zero-pad by `pad`, random crop back to the input size, random flip.
    PadCropFlip { pad: usize },
    /// RandomResizedCrop(`size`) + horizontal flip.
    RandomResizedCrop { size: usize },
    /// Resize the shorter side to `resize`, centre crop `crop`.
    ResizeCenterCrop { resize: usize, crop: usize },
    /// A latent dataset's sample ([`super::latents`]: both mirrors'
    /// posterior moments, float32 bytes): a random mirror (the released
    /// `RandomHorizontalFlip`, before the encoder), then a posterior draw
    /// `mean + exp(clamp(logvar, −30, 20) / 2) ε` times `scaling` (DiT's
    /// `vae.encode(x).latent_dist.sample().mul_(0.18215)`).
    Latent { scaling: f64 },
    /// ADM's centre crop to `size` ([`adm_center_crop`], what `sfron
    /// encode` feeds the VAE), then normalise: the real images a latent
    /// model's samples are compared with.
    AdmCrop { size: usize },
    /// torchvision's `Resize(size, interpolation=BICUBIC)` of a square
    /// uint8 tensor to `size × size` ([`tensor_bicubic_resize`]), then
    /// `augment` when given, then normalise: the SFR-on release's
    /// TinyImageNet transform (its images are pickled tensors, not PIL
    /// images).
    ResizeBicubic {
        size: usize,
        augment: Option<super::rand_augment::RandAugment>,
    },
}

/// A posterior draw of a latent sample (see [`Recipe::Latent`]): `img`
/// holds `4 c` planes of `h × w` float32 (little-endian): the mean and
/// log-variance of the image, then of its mirror.
fn latent_draw(
    img: &Image,
    [c, h, w]: [usize; 3],
    scaling: f64,
    rng: &mut Rng,
    out: &mut [f32],
) -> Result<(), String> {
    let plane = h * w;
    if (img.channels, img.height, img.width) != (4 * c, h, w) || img.data.len() != 16 * c * plane {
        return Err(format!(
            "holds {} planes of {}x{}, the latent transform expects {} of {h}x{w}",
            img.channels,
            img.height,
            img.width,
            4 * c
        ));
    }
    let mirror = usize::from(rng.chance(0.5));
    let at = |k: usize| {
        let b = &img.data[4 * k..4 * k + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    let base = mirror * 2 * c * plane;
    for (i, o) in out.iter_mut().enumerate() {
        let mean = at(base + i);
        let logvar = at(base + c * plane + i).clamp(-30.0, 20.0);
        let eps = rng.normal() as f32;
        *o = ((mean + (0.5 * logvar).exp() * eps) as f64 * scaling) as f32;
    }
    Ok(())
}

/// A recipe plus the normalisation and output shape it produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Transform {
    pub recipe: Recipe,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Output `[channels, height, width]`.
    pub shape: [usize; 3],
}

impl Transform {
    pub fn mnist() -> Self {
        Transform {
            recipe: Recipe::Normalize,
            mean: MNIST_MEAN.to_vec(),
            std: MNIST_STD.to_vec(),
            shape: [1, 28, 28],
        }
    }

    pub fn cifar(train: bool, hundred: bool) -> Self {
        let (mean, std) = if hundred {
            (CIFAR100_MEAN, CIFAR100_STD)
        } else {
            (CIFAR10_MEAN, CIFAR10_STD)
        };
        let recipe = if train {
            Recipe::PadCropFlip { pad: 4 }
        } else {
            Recipe::Normalize
        };
        Transform {
            recipe,
            mean: mean.to_vec(),
            std: std.to_vec(),
            shape: [3, 32, 32],
        }
    }

    /// A denoiser's data (the release's `data_transform` with `rescaled`):
    /// pixels `x` in [0, 1] become `2x − 1` (mean 0.5, std 0.5), with a
    /// random horizontal flip when `flip`; images of `shape`.
    pub fn diffusion(shape: [usize; 3], flip: bool) -> Self {
        let channels = shape[0];
        Transform {
            recipe: if flip {
                Recipe::PadCropFlip { pad: 0 }
            } else {
                Recipe::Normalize
            },
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
            shape,
        }
    }

    /// [`Transform::cifar`] of CIFAR-10 with the released normalisation, so
    /// that weights trained by the released code evaluate as they did there.
    pub fn cifar10_released(train: bool) -> Self {
        Transform {
            mean: CIFAR10_RELEASED_MEAN.to_vec(),
            std: CIFAR10_RELEASED_STD.to_vec(),
            ..Transform::cifar(train, false)
        }
    }

    /// The SFR-on release's TinyImageNet transform
    /// (`Classification/dataset/tinyimagenet.py`): `Resize(224, BICUBIC)`
    /// of the 64 × 64 images, in training then `RandAugment(num_ops=2,
    /// magnitude=2)` ([`super::rand_augment`]), ImageNet's mean and std.
    pub fn tinyimagenet(train: bool) -> Self {
        Transform {
            recipe: Recipe::ResizeBicubic {
                size: 224,
                augment: train.then_some(super::rand_augment::RandAugment::RELEASED),
            },
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            shape: [3, 224, 224],
        }
    }

    pub fn imagenet(train: bool) -> Self {
        let recipe = if train {
            Recipe::RandomResizedCrop { size: 224 }
        } else {
            Recipe::ResizeCenterCrop {
                resize: 256,
                crop: 224,
            }
        };
        Transform {
            recipe,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            shape: [3, 224, 224],
        }
    }

    /// A latent dataset's draws: `L` channels of `side × side`, scaled.
    pub fn latent(channels: usize, side: usize, scaling: f64) -> Self {
        Transform {
            recipe: Recipe::Latent { scaling },
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
            shape: [channels, side, side],
        }
    }

    /// ADM's centre crop to `size` with `norm`'s normalisation.
    pub fn adm_crop(size: usize, norm: &Transform) -> Self {
        Transform {
            recipe: Recipe::AdmCrop { size },
            mean: norm.mean.clone(),
            std: norm.std.clone(),
            shape: [norm.mean.len(), size, size],
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Applies the transform, writing `C×H×W` normalised floats to `out`.
    pub fn apply(
        &self,
        img: &Image,
        rng: &mut Rng,
        resizer: &mut Resizer,
        out: &mut [f32],
    ) -> Result<(), String> {
        let [c, h, w] = self.shape;
        if let Recipe::Latent { scaling } = self.recipe {
            return latent_draw(img, [c, h, w], scaling, rng, out);
        }
        if img.channels != c {
            return Err(format!(
                "has {} channel(s), the transform expects {c}",
                img.channels
            ));
        }
        match self.recipe {
            Recipe::Normalize => {
                if (img.height, img.width) != (h, w) {
                    return Err(format!("is {}x{}, expected {h}x{w}", img.height, img.width));
                }
                self.normalize(&img.data, w, 0, 0, false, out);
            }
            Recipe::PadCropFlip { pad } => {
                if (img.height, img.width) != (h, w) {
                    return Err(format!("is {}x{}, expected {h}x{w}", img.height, img.width));
                }
                // torchvision RandomCrop: top, left uniform in [0, 2·pad], then flip.
                let top = rng.int_in(0, 2 * pad as i64) as isize - pad as isize;
                let left = rng.int_in(0, 2 * pad as i64) as isize - pad as isize;
                let flip = rng.chance(0.5);
                self.pad_crop(img, top, left, flip, out);
            }
            Recipe::RandomResizedCrop { size } => {
                let (top, left, ch, cw) = random_resized_crop_box(img.width, img.height, rng);
                let flip = rng.chance(0.5);
                let resized = resize_crop(img, (left, top, cw, ch), size, size, resizer)?;
                self.normalize(&resized, size, 0, 0, flip, out);
            }
            Recipe::ResizeCenterCrop { resize, crop } => {
                let (rw, rh) = shorter_side_to(img.width, img.height, resize);
                let resized = resize_crop(img, (0, 0, img.width, img.height), rw, rh, resizer)?;
                if rw < crop || rh < crop {
                    return Err(format!(
                        "resized to {rw}x{rh}, smaller than the {crop} crop"
                    ));
                }
                // torchvision CenterCrop: int(round((h - crop) / 2)), Python's round (ties to even).
                let top = ((rh - crop) as f64 / 2.0).round_ties_even() as usize;
                let left = ((rw - crop) as f64 / 2.0).round_ties_even() as usize;
                self.normalize(&resized, rw, top, left, false, out);
            }
            Recipe::Latent { .. } => unreachable!("drawn above"),
            Recipe::AdmCrop { size } => {
                let crop = adm_center_crop(img, size)?;
                self.normalize(&crop.data, size, 0, 0, false, out);
            }
            Recipe::ResizeBicubic { size, augment } => {
                if img.width != img.height || img.width == 0 {
                    return Err(format!(
                        "is {}x{}: this transform resizes square images to {size}x{size}",
                        img.width, img.height
                    ));
                }
                let mut resized = tensor_bicubic_resize(img, size, size);
                if let Some(augment) = augment {
                    resized = augment.apply(&resized, rng);
                }
                self.normalize(&resized.data, size, 0, 0, false, out);
            }
        }
        Ok(())
    }

    /// The normalised value of each byte in channel `ch`: ToTensor's x/255,
    /// then Normalize's (x − mean)/std, computed once per batch sample.
    fn lut(&self, ch: usize) -> [f32; 256] {
        let (mean, inv_std) = (self.mean[ch], 1.0 / self.std[ch]);
        std::array::from_fn(|v| (v as f32 / 255.0 - mean) * inv_std)
    }

    /// Normalises the `h×w` window at (top, left) of an HWC image of row
    /// width `src_w` into CHW, optionally mirrored.
    fn normalize(
        &self,
        src: &[u8],
        src_w: usize,
        top: usize,
        left: usize,
        flip: bool,
        out: &mut [f32],
    ) {
        let [c, h, w] = self.shape;
        for ch in 0..c {
            let lut = self.lut(ch);
            let plane = &mut out[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let row = ((top + y) * src_w + left) * c;
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x };
                    plane[y * w + x] = lut[src[row + sx * c + ch] as usize];
                }
            }
        }
    }

    /// Crop of the zero-padded image at (top, left) (may be negative).
    fn pad_crop(&self, img: &Image, top: isize, left: isize, flip: bool, out: &mut [f32]) {
        let [c, h, w] = self.shape;
        for ch in 0..c {
            let lut = self.lut(ch);
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x };
                    let (iy, ix) = (top + y as isize, left + sx as isize);
                    let inside = iy >= 0
                        && ix >= 0
                        && (iy as usize) < img.height
                        && (ix as usize) < img.width;
                    let byte = if inside {
                        img.data[(iy as usize * img.width + ix as usize) * c + ch]
                    } else {
                        0
                    };
                    out[ch * h * w + y * w + x] = lut[byte as usize];
                }
            }
        }
    }
}

/// torchvision `Resize(size)` with an int: the shorter side becomes `size`,
/// the longer `int(size * long / short)`.
pub fn shorter_side_to(width: usize, height: usize, size: usize) -> (usize, usize) {
    if width <= height {
        (size, (size as f64 * height as f64 / width as f64) as usize)
    } else {
        ((size as f64 * width as f64 / height as f64) as usize, size)
    }
}

/// torchvision `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio
/// (3/4, 4/3): (top, left, height, width).
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    rng: &mut Rng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.uniform_in(0.08, 1.0);
        let aspect = rng.uniform_in(log_lo, log_hi).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.int_in(0, (height - h) as i64) as usize;
            let left = rng.int_in(0, (width - w) as i64) as usize;
            return (top, left, h, w);
        }
    }
    // Fallback: the whole image, clamped to the ratio range, centred.
    let ratio = width as f64 / height as f64;
    let (w, h) = if ratio < 3.0 / 4.0 {
        (
            width,
            (width as f64 / (3.0 / 4.0)).round_ties_even() as usize,
        )
    } else if ratio > 4.0 / 3.0 {
        (
            (height as f64 * (4.0 / 3.0)).round_ties_even() as usize,
            height,
        )
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Crops `(left, top, width, height)` of an RGB image and resizes it to
/// `out_w × out_h` with PIL-style bilinear (antialiased) convolution.
pub fn resize_crop(
    img: &Image,
    (left, top, cw, ch): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
    resizer: &mut Resizer,
) -> Result<Vec<u8>, String> {
    let pixel = match img.channels {
        1 => PixelType::U8,
        3 => PixelType::U8x3,
        c => return Err(format!("has {c} channels")),
    };
    let src = ImageRef::new(img.width as u32, img.height as u32, &img.data, pixel)
        .map_err(|e| e.to_string())?;
    let mut dst = FirImage::new(out_w as u32, out_h as u32, pixel);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(left as f64, top as f64, cw as f64, ch as f64);
    resizer
        .resize(&src, &mut dst, &options)
        .map_err(|e| e.to_string())?;
    Ok(dst.into_vec())
}

/// ADM's `center_crop_arr` (guided-diffusion's `image_datasets.py`, which
/// DiT's training and the SFR-on DiT release apply before the VAE): while
/// the shorter side is at least `2 size`, halve both sides (integer
/// division) with PIL's BOX filter; then scale by `size / shorter side`
/// (sides rounded half to even, as Python's `round`) with PIL's BICUBIC;
/// then the centre `size × size` (offsets `(side − size) // 2`). The
/// resizes are Pillow's own arithmetic ([`pil_resize`]), so the crop is
/// PIL's to the bit.
pub fn adm_center_crop(img: &Image, size: usize) -> Result<Image, String> {
    if img.width == 0 || img.height == 0 || size == 0 {
        return Err(format!("is {}x{}, nothing to crop", img.width, img.height));
    }
    let mut cur = img.clone();
    while cur.width.min(cur.height) >= 2 * size {
        cur = pil_resize(&cur, cur.width / 2, cur.height / 2, PilFilter::Box);
    }
    let scale = size as f64 / cur.width.min(cur.height) as f64;
    let (w, h) = (
        (cur.width as f64 * scale).round_ties_even() as usize,
        (cur.height as f64 * scale).round_ties_even() as usize,
    );
    let resized = pil_resize(&cur, w, h, PilFilter::Bicubic);
    if w < size || h < size {
        return Err(format!("resized to {w}x{h}, smaller than the {size} crop"));
    }
    let (top, left, c) = ((h - size) / 2, (w - size) / 2, cur.channels);
    let mut data = Vec::with_capacity(size * size * c);
    for y in top..top + size {
        let row = (y * w + left) * c;
        data.extend_from_slice(&resized.data[row..row + size * c]);
    }
    Ok(Image {
        width: size,
        height: size,
        channels: c,
        data,
    })
}

/// Pillow's resampling filters used by [`adm_center_crop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PilFilter {
    /// `Image.BOX`: support 0.5.
    Box,
    /// `Image.BICUBIC`: the cubic convolution with a = −0.5, support 2.
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Box => 0.5,
            PilFilter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            PilFilter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's fixed-point precision of 8-bit resampling (`PRECISION_BITS`).
const PIL_PRECISION: u32 = 32 - 8 - 2;

/// The normalised filter weights of one axis, per output position: the
/// first input index and the weights (Pillow's `precompute_coeffs`, which
/// libtorch's antialiased interpolation computes the same way).
fn filter_weights(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero; both bounds are clamped as there.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let weights = weights
                .iter()
                .map(|&w| if total != 0.0 { w / total } else { w })
                .collect();
            (xmin, weights)
        })
        .collect()
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for one axis:
/// per output position, the first input index and the fixed-point weights.
fn pil_coefficients(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<(usize, Vec<i64>)> {
    filter_weights(in_size, out_size, filter)
        .into_iter()
        .map(|(xmin, weights)| {
            let fixed = weights
                .iter()
                .map(|&w| {
                    let v = w * (1u64 << PIL_PRECISION) as f64;
                    (if w < 0.0 { v - 0.5 } else { v + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// torchvision's `Resize(interpolation=BICUBIC)` of a uint8 *tensor*
/// (`F.interpolate(x.float(), mode="bicubic", antialias=True)`, rounded
/// half to even and clamped to 0..=255): Pillow's bicubic weights, but
/// both passes in floating point with one rounding at the end, where
/// Pillow rounds each pass to 8 bits (they differ by up to ~20 levels on
/// noisy images).
pub fn tensor_bicubic_resize(img: &Image, out_w: usize, out_h: usize) -> Image {
    let c = img.channels;
    let (w, h) = (img.width, img.height);
    let across = filter_weights(w, out_w, PilFilter::Bicubic);
    let down = filter_weights(h, out_h, PilFilter::Bicubic);
    let mut rows = vec![0f64; out_w * h * c];
    for y in 0..h {
        for (xx, (xmin, k)) in across.iter().enumerate() {
            for ch in 0..c {
                rows[(y * out_w + xx) * c + ch] = k
                    .iter()
                    .enumerate()
                    .map(|(j, kj)| f64::from(img.data[(y * w + xmin + j) * c + ch]) * kj)
                    .sum();
            }
        }
    }
    let mut data = vec![0u8; out_w * out_h * c];
    for (yy, (ymin, k)) in down.iter().enumerate() {
        for x in 0..out_w {
            for ch in 0..c {
                let v: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, kj)| rows[((ymin + j) * out_w + x) * c + ch] * kj)
                    .sum();
                data[(yy * out_w + x) * c + ch] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Image {
        width: out_w,
        height: out_h,
        channels: c,
        data,
    }
}

/// Pillow's `clip8`: the accumulator's integer part, clamped to 0..=255.
fn pil_clip8(acc: i64) -> u8 {
    (acc >> PIL_PRECISION).clamp(0, 255) as u8
}

/// `Image.resize((out_w, out_h), filter)` on 8-bit data as Pillow computes
/// it (`ImagingResample`): a horizontal pass when the width changes, then a
/// vertical pass when the height changes, each rounding to 8 bits.
pub fn pil_resize(img: &Image, out_w: usize, out_h: usize, filter: PilFilter) -> Image {
    let c = img.channels;
    let (mut w, h) = (img.width, img.height);
    let mut data = img.data.clone();
    if out_w != w {
        let coeffs = pil_coefficients(w, out_w, filter);
        let mut out = vec![0u8; out_w * h * c];
        for y in 0..h {
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for ch in 0..c {
                    let mut acc: i64 = 1 << (PIL_PRECISION - 1);
                    for (j, &kj) in k.iter().enumerate() {
                        acc += i64::from(data[(y * w + xmin + j) * c + ch]) * kj;
                    }
                    out[(y * out_w + xx) * c + ch] = pil_clip8(acc);
                }
            }
        }
        data = out;
        w = out_w;
    }
    if out_h != h {
        let coeffs = pil_coefficients(h, out_h, filter);
        let mut out = vec![0u8; w * out_h * c];
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..w {
                for ch in 0..c {
                    let mut acc: i64 = 1 << (PIL_PRECISION - 1);
                    for (j, &kj) in k.iter().enumerate() {
                        acc += i64::from(data[((ymin + j) * w + x) * c + ch]) * kj;
                    }
                    out[(yy * w + x) * c + ch] = pil_clip8(acc);
                }
            }
        }
        data = out;
    }
    Image {
        width: w,
        height: out_h,
        channels: c,
        data,
    }
}
