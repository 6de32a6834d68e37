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
