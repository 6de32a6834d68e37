//! RandAugment (Cubuk et al., 2020) as torchvision applies it to a uint8
//! image *tensor* (`torchvision/transforms/autoaugment.py` `RandAugment`,
//! its `_apply_op`, and the tensor kernels of `_functional_tensor.py`): the
//! SFR-on release's TinyImageNet training augmentation,
//! `RandAugment(num_ops=2, magnitude=2)` after the bicubic resize
//! (`Classification/dataset/tinyimagenet.py`).
//!
//! Each of `num_ops` rounds draws one of the 14 operations uniformly and,
//! for a signed one, a sign with probability ½; its strength is bin
//! `magnitude` of `bins` (31) of torchvision's ranges, evaluated as torch's
//! float32 `linspace` does. The draws come from sfron's keyed stream (the
//! sample's augmentation stream), not from torch's generator: the same
//! distribution, other numbers.
//!
//! The arithmetic follows the tensor kernels: blends in float32 truncated
//! to uint8 (`_blend`), the TF grey `0.2989 R + 0.587 G + 0.114 B`
//! truncated, the 3 × 3 smoothing of Sharpness rounded half to even with
//! the border kept, Equalize's integer lookup table, and the geometric
//! operations as `affine_grid` + `grid_sample(mode="nearest",
//! padding_mode="zeros", align_corners=False)` in float32 (nothing fills
//! the uncovered corners: RandAugment's `fill` is `None`).

use crate::data::dataset::Image;
use crate::rng::Rng;

/// torchvision's operations, in its `_augmentation_space` order (the draw
/// picks an index into this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

pub const OPS: [Op; 14] = [
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

impl Op {
    /// torchvision's name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
            Op::Rotate => "Rotate",
            Op::Brightness => "Brightness",
            Op::Color => "Color",
            Op::Contrast => "Contrast",
            Op::Sharpness => "Sharpness",
            Op::Posterize => "Posterize",
            Op::Solarize => "Solarize",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
        }
    }

    /// Whether the strength takes a random sign.
    pub fn signed(self) -> bool {
        matches!(
            self,
            Op::ShearX
                | Op::ShearY
                | Op::TranslateX
                | Op::TranslateY
                | Op::Rotate
                | Op::Brightness
                | Op::Color
                | Op::Contrast
                | Op::Sharpness
        )
    }

    /// Bin `index` of `bins` of the operation's strengths for an image of
    /// `height × width` (torchvision's `_augmentation_space`, as the double
    /// of its float32 value).
    pub fn magnitude(self, bins: usize, index: usize, (height, width): (usize, usize)) -> f64 {
        let span = |end: f64| f64::from(linspace_f32(0.0, end, bins, index));
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => 0.0,
            Op::ShearX | Op::ShearY => span(0.3),
            Op::TranslateX => span(150.0 / 331.0 * width as f64),
            Op::TranslateY => span(150.0 / 331.0 * height as f64),
            Op::Rotate => span(30.0),
            Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => span(0.9),
            // 8 − round(arange(bins) / ((bins − 1) / 4)), float32, half to even.
            Op::Posterize => {
                let q = index as f32 / ((bins - 1) as f32 / 4.0);
                8.0 - f64::from(q.round_ties_even())
            }
            Op::Solarize => f64::from(linspace_f32(255.0, 0.0, bins, index)),
        }
    }
}

/// Element `index` of torch's float32 `linspace(start, end, steps)` (the
/// CPU kernel: `start + step · i` below the halfway point, `end − step ·
/// (steps − 1 − i)` from it, with `step` in float32).
fn linspace_f32(start: f64, end: f64, steps: usize, index: usize) -> f32 {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return start;
    }
    let step = (end - start) / (steps - 1) as f32;
    if index < steps / 2 {
        start + step * index as f32
    } else {
        end - step * (steps - 1 - index) as f32
    }
}

/// `RandAugment(num_ops, magnitude, num_magnitude_bins = bins)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandAugment {
    pub num_ops: usize,
    pub magnitude: usize,
    pub bins: usize,
}

impl RandAugment {
    /// The release's `RandAugment(num_ops=2, magnitude=2)`.
    pub const RELEASED: RandAugment = RandAugment {
        num_ops: 2,
        magnitude: 2,
        bins: 31,
    };

    /// The `num_ops` operations and signed strengths drawn from `rng` for an
    /// image of `height × width`.
    pub fn draw(&self, rng: &mut Rng, size: (usize, usize)) -> Vec<(Op, f64)> {
        (0..self.num_ops)
            .map(|_| {
                let op = OPS[rng.below(OPS.len() as u64) as usize];
                let m = op.magnitude(self.bins, self.magnitude, size);
                let negative = op.signed() && rng.chance(0.5);
                (op, if negative { -m } else { m })
            })
            .collect()
    }

    /// `img` after `num_ops` operations drawn from `rng`.
    pub fn apply(&self, img: &Image, rng: &mut Rng) -> Image {
        let mut out = img.clone();
        for (op, m) in self.draw(rng, (img.height, img.width)) {
            out = apply_op(&out, op, m);
        }
        out
    }
}

/// `_apply_op(img, op, magnitude)` on a uint8 image (`height × width ×
/// channels`, 1 or 3 channels).
pub fn apply_op(img: &Image, op: Op, magnitude: f64) -> Image {
    match op {
        Op::Identity => img.clone(),
        Op::ShearX => affine(img, shear_matrix(img, magnitude, 0.0)),
        Op::ShearY => affine(img, shear_matrix(img, 0.0, magnitude)),
        Op::TranslateX => affine(
            img,
            inverse_affine((0.0, 0.0), 0.0, (magnitude.trunc(), 0.0), (0.0, 0.0)),
        ),
        Op::TranslateY => affine(
            img,
            inverse_affine((0.0, 0.0), 0.0, (0.0, magnitude.trunc()), (0.0, 0.0)),
        ),
        // F.rotate: the inverse matrix of −angle about the centre.
        Op::Rotate => affine(
            img,
            inverse_affine((0.0, 0.0), -magnitude, (0.0, 0.0), (0.0, 0.0)),
        ),
        Op::Brightness => map_blend(img, 1.0 + magnitude, |_, _| 0.0),
        Op::Color => {
            if img.channels == 1 {
                return img.clone();
            }
            let grey = grey(img);
            map_blend(img, 1.0 + magnitude, |p, _| f32::from(grey[p]))
        }
        Op::Contrast => {
            let grey = if img.channels == 3 {
                grey(img)
            } else {
                img.data.clone()
            };
            // float32 sum of integers below 2^24 (exact), then the division.
            let sum: u64 = grey.iter().map(|&v| u64::from(v)).sum();
            let mean = sum as f32 / grey.len() as f32;
            map_blend(img, 1.0 + magnitude, |_, _| mean)
        }
        Op::Sharpness => sharpness(img, 1.0 + magnitude),
        Op::Posterize => {
            let mask = !((1u16 << (8 - magnitude as u32).min(8)) - 1) as u8;
            map(img, |v| v & mask)
        }
        Op::Solarize => {
            let threshold = magnitude as f32;
            map(img, |v| {
                if f32::from(v) >= threshold {
                    255 - v
                } else {
                    v
                }
            })
        }
        Op::AutoContrast => autocontrast(img),
        Op::Equalize => equalize(img),
    }
}

fn map(img: &Image, f: impl Fn(u8) -> u8) -> Image {
    Image {
        data: img.data.iter().map(|&v| f(v)).collect(),
        ..img.clone()
    }
}

/// `_blend(img, other, ratio)`: `ratio · x + (1 − ratio) · y` in float32,
/// clamped to 0..=255 and truncated, with `y = other(pixel, channel)`.
fn map_blend(img: &Image, ratio: f64, other: impl Fn(usize, usize) -> f32) -> Image {
    let (r, s) = (ratio as f32, (1.0 - ratio) as f32);
    let c = img.channels;
    let data = img
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| (r * f32::from(v) + s * other(i / c, i % c)).clamp(0.0, 255.0) as u8)
        .collect();
    Image {
        data,
        ..img.clone()
    }
}

/// `rgb_to_grayscale`: `(0.2989 R + 0.587 G + 0.114 B)` in float32,
/// truncated, one value per pixel.
fn grey(img: &Image) -> Vec<u8> {
    img.data
        .chunks(3)
        .map(|p| {
            let [r, g, b] = [p[0], p[1], p[2]].map(f32::from);
            (0.2989f32 * r + 0.587f32 * g + 0.114f32 * b) as u8
        })
        .collect()
}

/// `adjust_sharpness`: a blend with the image smoothed by
/// `[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13` (float32, rounded half to
/// even; the border pixels kept).
fn sharpness(img: &Image, factor: f64) -> Image {
    let (h, w, c) = (img.height, img.width, img.channels);
    if h <= 2 || w <= 2 {
        return img.clone();
    }
    let (edge, centre) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let mut blurred = img.data.clone();
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for ch in 0..c {
                let at = |yy: usize, xx: usize| f32::from(img.data[(yy * w + xx) * c + ch]);
                let mut acc = 0f32;
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        let k = if yy == y && xx == x { centre } else { edge };
                        acc += at(yy, xx) * k;
                    }
                }
                blurred[(y * w + x) * c + ch] = acc.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    map_blend(img, factor, |p, ch| f32::from(blurred[p * c + ch]))
}

/// `autocontrast`: each channel stretched from its range to 0..=255 in
/// float32 (a flat channel kept), truncated; the scale is torch's
/// `255 / (max − min)`, a reciprocal times 255.
fn autocontrast(img: &Image) -> Image {
    let c = img.channels;
    let mut out = img.clone();
    for ch in 0..c {
        let values = img.data.iter().skip(ch).step_by(c);
        let (lo, hi) = values.fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (min, scale) = if hi == lo {
            (0.0f32, 1.0f32)
        } else {
            // `bound / tensor` is `tensor.reciprocal() * bound` in torch.
            (
                f32::from(lo),
                (1.0f32 / (f32::from(hi) - f32::from(lo))) * 255.0,
            )
        };
        for v in out.data.iter_mut().skip(ch).step_by(c) {
            *v = ((f32::from(*v) - min) * scale).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `equalize`: per channel, torchvision's lookup table from the histogram
/// (`step = ⌊Σ nonzero bins but the last / 255⌋`; none when 0;
/// `lut[i] = ⌊(cumsum[i − 1] + ⌊step / 2⌋) / step⌋`, `lut[0] = 0`).
fn equalize(img: &Image) -> Image {
    let c = img.channels;
    let mut out = img.clone();
    for ch in 0..c {
        let mut hist = [0u64; 256];
        for &v in img.data.iter().skip(ch).step_by(c) {
            hist[v as usize] += 1;
        }
        let nonzero: Vec<u64> = hist.iter().copied().filter(|&n| n != 0).collect();
        let step = nonzero[..nonzero.len().saturating_sub(1)]
            .iter()
            .sum::<u64>()
            / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cum = 0u64;
        for i in 0..256 {
            lut[i] = ((cum + step / 2) / step).min(255) as u8;
            cum += hist[i];
        }
        for v in out.data.iter_mut().skip(ch).step_by(c) {
            *v = lut[*v as usize];
        }
    }
    out
}

/// The inverse affine matrix of `F.affine`/`F.rotate` on a tensor
/// (`_get_inverse_affine_matrix` with scale 1): rotation `angle` and shear
/// `(sx, sy)` in degrees about the centre offset `(cx, cy)`, then the
/// translation `(tx, ty)`, in float64 as Python computes it.
fn inverse_affine(
    (cx, cy): (f64, f64),
    angle: f64,
    (tx, ty): (f64, f64),
    (shear_x, shear_y): (f64, f64),
) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear_x.to_radians(), shear_y.to_radians());
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// ShearX/ShearY: shear `atan(magnitude)` in degrees about the top-left
/// corner (`center=[0, 0]`, i.e. the offset `(−w/2, −h/2)` from the centre).
fn shear_matrix(img: &Image, mx: f64, my: f64) -> [f64; 6] {
    let centre = (-(img.width as f64) * 0.5, -(img.height as f64) * 0.5);
    let shear = (mx.atan().to_degrees(), my.atan().to_degrees());
    inverse_affine(centre, 0.0, (0.0, 0.0), shear)
}

/// `F_t.affine(img, matrix, "nearest")`: `_gen_affine_grid` and
/// `grid_sample` in float32; a source pixel outside the image gives 0.
fn affine(img: &Image, matrix: [f64; 6]) -> Image {
    let (h, w, c) = (img.height, img.width, img.channels);
    let theta = matrix.map(|v| v as f32);
    let (half_w, half_h) = (0.5 * w as f32, 0.5 * h as f32);
    // rescaled_theta = theta^T / [0.5 w, 0.5 h] (columns: x, y).
    let r = [
        [theta[0] / half_w, theta[3] / half_h],
        [theta[1] / half_w, theta[4] / half_h],
        [theta[2] / half_w, theta[5] / half_h],
    ];
    let (sw, sh) = (w as f32 / 2.0, h as f32 / 2.0);
    let mut data = vec![0u8; h * w * c];
    for oy in 0..h {
        let y = linspace_f32(-(h as f64) * 0.5 + 0.5, h as f64 * 0.5 - 0.5, h, oy);
        for ox in 0..w {
            let x = linspace_f32(-(w as f64) * 0.5 + 0.5, w as f64 * 0.5 - 0.5, w, ox);
            let gx = x * r[0][0] + y * r[1][0] + r[2][0];
            let gy = x * r[0][1] + y * r[1][1] + r[2][1];
            // grid_sample's unnormalisation (align_corners=False), nearest.
            let ix = ((gx + 1.0) * sw - 0.5).round_ties_even();
            let iy = ((gy + 1.0) * sh - 0.5).round_ties_even();
            if ix >= 0.0 && iy >= 0.0 && (ix as usize) < w && (iy as usize) < h {
                let (src, dst) = (((iy as usize) * w + ix as usize) * c, (oy * w + ox) * c);
                data[dst..dst + c].copy_from_slice(&img.data[src..src + c]);
            }
        }
    }
    Image {
        data,
        ..img.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_released_strengths() {
        let size = (224, 224);
        let m = |op: Op| op.magnitude(31, 2, size);
        assert!((m(Op::ShearX) - 0.02).abs() < 1e-7);
        assert!((m(Op::Rotate) - 2.0).abs() < 1e-6);
        assert_eq!(m(Op::TranslateX).trunc(), 6.0);
        assert!((m(Op::Brightness) - 0.06).abs() < 1e-7);
        // Magnitude 2 of 31 keeps all 8 bits: Posterize is the identity.
        assert_eq!(m(Op::Posterize), 8.0);
        assert!((m(Op::Solarize) - 238.0).abs() < 1e-4);
    }

    #[test]
    fn a_sample_draws_its_operations_from_its_key() {
        let ra = RandAugment::RELEASED;
        let size = (224, 224);
        assert_eq!(
            ra.draw(&mut Rng::keyed(&[1, 2]), size),
            ra.draw(&mut Rng::keyed(&[1, 2]), size)
        );
        // Uniform over the 14 operations, a fair sign for the signed ones:
        // 7,000 keys × 2 draws, 1,000 per operation expected (sd ≈ 31).
        let mut counts = [0usize; 14];
        let (mut signed, mut negative) = (0, 0);
        for k in 0..7000u64 {
            for (op, m) in ra.draw(&mut Rng::keyed(&[k]), size) {
                counts[OPS.iter().position(|o| *o == op).unwrap()] += 1;
                if op.signed() {
                    signed += 1;
                    negative += usize::from(m < 0.0);
                }
            }
        }
        assert!(
            counts.iter().all(|&n| (850..=1150).contains(&n)),
            "{counts:?}"
        );
        let share = negative as f64 / signed as f64;
        assert!((share - 0.5).abs() < 0.03, "{share}");
    }

    #[test]
    fn identity_matrices_leave_the_image_alone() {
        let img = Image {
            width: 5,
            height: 4,
            channels: 3,
            data: (0..60).map(|v| v as u8 * 4).collect(),
        };
        assert_eq!(apply_op(&img, Op::TranslateX, 0.0), img);
        assert_eq!(apply_op(&img, Op::Rotate, 0.0), img);
        assert_eq!(apply_op(&img, Op::Brightness, 0.0), img);
        assert_eq!(apply_op(&img, Op::Posterize, 8.0), img);
    }
}
