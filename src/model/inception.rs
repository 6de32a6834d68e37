//! The FID Inception: the Inception-v3 pool3 feature network of standard FID
//! (`pytorch_fid.inception.InceptionV3` with its defaults: output block 3,
//! `resize_input`, `normalize_input`, `use_fid_inception`), evaluation only,
//! from a weights file the user supplies.
//!
//! **Weights.** pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (its
//! `FID_WEIGHTS_URL`: the TensorFlow FID graph's weights ported to
//! torchvision's `Inception3` names), exported once to safetensors on a
//! machine that has it ([`EXPORT_HINT`]). The names are torchvision's:
//! `Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.{weight, bias,
//! running_mean, running_var}`, `Mixed_5b.branch1x1.conv.weight`, …,
//! `Mixed_7c.branch_pool.bn.running_var`. Every one of them must be in the
//! file with its shape; the classifier `fc.weight` `[1008, 2048]` and
//! `fc.bias` (1008 classes: the TensorFlow graph's) and any
//! `num_batches_tracked` are ignored. Anything else (torchvision's own
//! ImageNet weights bring `AuxLogits.*` and a 1000-class `fc`) is refused:
//! those weights give another feature space, not standard FID.
//!
//! **Structure**, as pytorch-fid builds it from torchvision's `Inception3`
//! (channel counts and kernels in the code below, which follows
//! `torchvision/models/inception.py`):
//!
//! - every convolution is a `BasicConv2d`: convolution without bias,
//!   BatchNorm with eps 0.001 (running statistics: evaluation mode), ReLU;
//! - block 0: `Conv2d_1a_3x3` (stride 2), `Conv2d_2a_3x3`, `Conv2d_2b_3x3`
//!   (padding 1), max-pool 3 stride 2;
//! - block 1: `Conv2d_3b_1x1`, `Conv2d_4a_3x3`, max-pool 3 stride 2;
//! - block 2: `Mixed_5b`, `5c`, `5d` (InceptionA), `Mixed_6a` (InceptionB),
//!   `Mixed_6b` … `6e` (InceptionC, 7×7 widths 128, 160, 160, 192);
//! - block 3: `Mixed_7a` (InceptionD), `Mixed_7b`, `Mixed_7c` (InceptionE),
//!   then the average over the remaining 8×8 positions: `[N, 2048]`.
//!
//! **The FID network is not torchvision's Inception3** in two places, both
//! kept here (pytorch-fid's `FIDInceptionA`, `FIDInceptionC`,
//! `FIDInceptionE_1`, `FIDInceptionE_2`): the 3×3 stride-1 average pools of
//! the pool branches of `Mixed_5b` … `5d`, `Mixed_6b` … `6e` and `Mixed_7b`
//! do not count the zero padding (`count_include_pad = False`, TensorFlow's
//! average pool), and `Mixed_7c`'s pool branch takes a 3×3 stride-1
//! **max**-pool (padding 1) where torchvision averages.
//!
//! **Input**, as pytorch-fid's with `resize_input` and `normalize_input`:
//! images `[N, C, H, W]` with values in [0, 1] (uint8 images are divided by
//! 255 first, as torchvision's `ToTensor` does), resized bilinearly to
//! 299×299 (`align_corners = False`, no antialiasing: `F.interpolate`'s
//! defaults), then mapped to [−1, 1] by `2x − 1`. pytorch-fid requires RGB;
//! one-channel images (MNIST) are repeated to three channels first, which
//! is what FID on grayscale images customarily does.
//!
//! The features are computed in batches of at most [`BATCH`] images (as
//! pytorch-fid's default batch size; [`FidInception::with_batch`] changes
//! it), without gradients, in float32.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor, nn};

use super::weights;

/// How to make the weights file from pytorch-fid's, on a machine with
/// internet and pytorch-fid's `.pth`.
pub const EXPORT_HINT: &str = "download pytorch-fid's FID weights \
     (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth) \
     and export them to safetensors: python -c \"import torch, safetensors.torch as s; \
     s.save_file({k: v.contiguous() for k, v in \
     torch.load('pt_inception-2015-12-05-6726825d.pth').items()}, 'pt_inception.safetensors')\"";

/// Images per forward pass by default (pytorch-fid's default batch size).
pub const BATCH: usize = 50;

/// The width of the pool3 features.
pub const FEATURES: i64 = 2048;

/// The side the images are resized to.
const SIDE: i64 = 299;

/// The FID Inception with its weights (see the module docs).
pub struct FidInception {
    vs: nn::VarStore,
    net: Net,
    batch: usize,
}

impl std::fmt::Debug for FidInception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FidInception(on {:?})", self.vs.device())
    }
}

impl FidInception {
    /// Loads the FID Inception from the safetensors file at `path` onto
    /// `device` (see the module docs for what the file must hold). Errors
    /// name the file, and every missing, unexpected or mis-shaped tensor.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.is_file() {
            bail!(
                "{}: no such file (the FID Inception weights; {EXPORT_HINT})",
                path.display()
            );
        }
        let bytes = weights::read(path)?;
        let (tensors, _) = weights::parse(&bytes, path).with_context(|| {
            format!(
                "{} is not the FID Inception weights as safetensors ({EXPORT_HINT})",
                path.display()
            )
        })?;
        if let Some(fc) = weights::shape_of(&tensors, "fc.weight")
            && fc != [1008, FEATURES]
        {
            bail!(
                "{}: fc.weight is {fc:?}, the FID Inception's is [1008, 2048]: these are not \
                 pytorch-fid's FID weights (torchvision's ImageNet Inception-v3 gives \
                 another feature space, not standard FID; {EXPORT_HINT})",
                path.display()
            );
        }
        let kept: Vec<(String, Tensor)> = tensors
            .into_iter()
            .filter(|(name, _)| !name.starts_with("fc."))
            .collect();
        let vs = nn::VarStore::new(device);
        let net = Net::new(&vs.root());
        weights::copy_into(&vs, &kept, path)?;
        Ok(FidInception {
            vs,
            net,
            batch: BATCH,
        })
    }

    /// The same network computing at most `batch` images per forward pass
    /// (at least 1).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The pool3 features `[N, 2048]` (float32, on the CPU) of images
    /// `[N, C, H, W]`, `C` 1 or 3, any `H`, `W`: uint8 (0 to 255) or
    /// floating point in [0, 1], on any device. Panics on another shape or
    /// dtype (a caller's error).
    pub fn features(&self, images: &Tensor) -> Tensor {
        let size = images.size();
        assert!(
            size.len() == 4 && (size[1] == 1 || size[1] == 3),
            "FID Inception input must be [N, 1 or 3, H, W], got {size:?}"
        );
        let kind = images.kind();
        assert!(
            matches!(
                kind,
                Kind::Uint8 | Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
            ),
            "FID Inception input must be uint8 or floating point, got {kind:?}"
        );
        let n = size[0];
        let mut out = Vec::new();
        tch::no_grad(|| {
            let mut start = 0;
            while start < n {
                let len = (self.batch as i64).min(n - start);
                let x = images.narrow(0, start, len).to_device(self.vs.device());
                out.push(self.net.forward(&input(&x)).to_device(Device::Cpu));
                start += len;
            }
        });
        if out.is_empty() {
            return Tensor::zeros([0, FEATURES], (Kind::Float, Device::Cpu));
        }
        Tensor::cat(&out, 0)
    }
}

/// pytorch-fid's input of images (see the module docs): [0, 1], three
/// channels, 299×299 bilinear, `2x − 1`.
fn input(images: &Tensor) -> Tensor {
    let x = if images.kind() == Kind::Uint8 {
        images.to_kind(Kind::Float) / 255.0
    } else {
        images.to_kind(Kind::Float)
    };
    let x = if x.size()[1] == 1 {
        x.repeat([1, 3, 1, 1])
    } else {
        x
    };
    let x = x.upsample_bilinear2d([SIDE, SIDE], false, None, None);
    x * 2.0 - 1.0
}

/// torchvision's `BasicConv2d` in evaluation mode.
struct BasicConv {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

/// BasicConv2d's BatchNorm eps.
const BN_EPS: f64 = 0.001;

impl BasicConv {
    /// `cin → cout` with a `kernel` `[h, w]`, `stride` and `padding` `[h, w]`.
    fn new(
        p: &nn::Path,
        cin: i64,
        cout: i64,
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Self {
        let conv = p / "conv";
        let bn = p / "bn";
        BasicConv {
            weight: conv.zeros_no_train("weight", &[cout, cin, kernel[0], kernel[1]]),
            bn_weight: bn.ones_no_train("weight", &[cout]),
            bn_bias: bn.zeros_no_train("bias", &[cout]),
            running_mean: bn.zeros_no_train("running_mean", &[cout]),
            running_var: bn.ones_no_train("running_var", &[cout]),
            stride,
            padding,
        }
    }

    /// A square `k`×`k` kernel, stride 1, no padding.
    fn k(p: &nn::Path, cin: i64, cout: i64, k: i64) -> Self {
        Self::new(p, cin, cout, [k, k], 1, [0, 0])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            self.padding,
            [1, 1],
            1,
        )
        .batch_norm(
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.1,
            BN_EPS,
            true,
        )
        .relu_()
    }
}

/// A 3×3 stride-1 pad-1 average pool that ignores the padding (TensorFlow's).
fn avg_pool_3x3(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

/// A `k`×`k` max-pool of stride `s`, padding `pad`.
fn max_pool(x: &Tensor, k: i64, s: i64, pad: i64) -> Tensor {
    x.max_pool2d([k, k], [s, s], [pad, pad], [1, 1], false)
}

/// Runs `convs` one after the other.
fn chain(convs: &[BasicConv], x: &Tensor) -> Tensor {
    let (first, rest) = convs.split_first().expect("a branch has a conv");
    rest.iter().fold(first.forward(x), |h, c| c.forward(&h))
}

/// FIDInceptionA (`Mixed_5b` … `5d`): 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 |
/// average pool (padding not counted) → 1×1.
struct InceptionA {
    branch1x1: BasicConv,
    branch5x5: [BasicConv; 2],
    branch3x3dbl: [BasicConv; 3],
    branch_pool: BasicConv,
}

impl InceptionA {
    fn new(p: &nn::Path, cin: i64, pool_features: i64) -> Self {
        InceptionA {
            branch1x1: BasicConv::k(&(p / "branch1x1"), cin, 64, 1),
            branch5x5: [
                BasicConv::k(&(p / "branch5x5_1"), cin, 48, 1),
                BasicConv::new(&(p / "branch5x5_2"), 48, 64, [5, 5], 1, [2, 2]),
            ],
            branch3x3dbl: [
                BasicConv::k(&(p / "branch3x3dbl_1"), cin, 64, 1),
                BasicConv::new(&(p / "branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1]),
                BasicConv::new(&(p / "branch3x3dbl_3"), 96, 96, [3, 3], 1, [1, 1]),
            ],
            branch_pool: BasicConv::k(&(p / "branch_pool"), cin, pool_features, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                self.branch1x1.forward(x),
                chain(&self.branch5x5, x),
                chain(&self.branch3x3dbl, x),
                self.branch_pool.forward(&avg_pool_3x3(x)),
            ],
            1,
        )
    }
}

/// InceptionB (`Mixed_6a`, 35×35 → 17×17): 3×3 stride 2 | 1×1 → 3×3 → 3×3
/// stride 2 | max-pool 3 stride 2.
struct InceptionB {
    branch3x3: BasicConv,
    branch3x3dbl: [BasicConv; 3],
}

impl InceptionB {
    fn new(p: &nn::Path, cin: i64) -> Self {
        InceptionB {
            branch3x3: BasicConv::new(&(p / "branch3x3"), cin, 384, [3, 3], 2, [0, 0]),
            branch3x3dbl: [
                BasicConv::k(&(p / "branch3x3dbl_1"), cin, 64, 1),
                BasicConv::new(&(p / "branch3x3dbl_2"), 64, 96, [3, 3], 1, [1, 1]),
                BasicConv::new(&(p / "branch3x3dbl_3"), 96, 96, [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                self.branch3x3.forward(x),
                chain(&self.branch3x3dbl, x),
                max_pool(x, 3, 2, 0),
            ],
            1,
        )
    }
}

/// FIDInceptionC (`Mixed_6b` … `6e`): 1×1 | 1×1 → 1×7 → 7×1 | 1×1 → 7×1 →
/// 1×7 → 7×1 → 1×7 | average pool (padding not counted) → 1×1.
struct InceptionC {
    branch1x1: BasicConv,
    branch7x7: [BasicConv; 3],
    branch7x7dbl: [BasicConv; 5],
    branch_pool: BasicConv,
}

impl InceptionC {
    fn new(p: &nn::Path, cin: i64, c7: i64) -> Self {
        let row = |name: &str, i, o| BasicConv::new(&(p / name), i, o, [1, 7], 1, [0, 3]);
        let col = |name: &str, i, o| BasicConv::new(&(p / name), i, o, [7, 1], 1, [3, 0]);
        InceptionC {
            branch1x1: BasicConv::k(&(p / "branch1x1"), cin, 192, 1),
            branch7x7: [
                BasicConv::k(&(p / "branch7x7_1"), cin, c7, 1),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            branch7x7dbl: [
                BasicConv::k(&(p / "branch7x7dbl_1"), cin, c7, 1),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            branch_pool: BasicConv::k(&(p / "branch_pool"), cin, 192, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                self.branch1x1.forward(x),
                chain(&self.branch7x7, x),
                chain(&self.branch7x7dbl, x),
                self.branch_pool.forward(&avg_pool_3x3(x)),
            ],
            1,
        )
    }
}

/// InceptionD (`Mixed_7a`, 17×17 → 8×8): 1×1 → 3×3 stride 2 | 1×1 → 1×7 →
/// 7×1 → 3×3 stride 2 | max-pool 3 stride 2.
struct InceptionD {
    branch3x3: [BasicConv; 2],
    branch7x7x3: [BasicConv; 4],
}

impl InceptionD {
    fn new(p: &nn::Path, cin: i64) -> Self {
        InceptionD {
            branch3x3: [
                BasicConv::k(&(p / "branch3x3_1"), cin, 192, 1),
                BasicConv::new(&(p / "branch3x3_2"), 192, 320, [3, 3], 2, [0, 0]),
            ],
            branch7x7x3: [
                BasicConv::k(&(p / "branch7x7x3_1"), cin, 192, 1),
                BasicConv::new(&(p / "branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3]),
                BasicConv::new(&(p / "branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0]),
                BasicConv::new(&(p / "branch7x7x3_4"), 192, 192, [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::cat(
            &[
                chain(&self.branch3x3, x),
                chain(&self.branch7x7x3, x),
                max_pool(x, 3, 2, 0),
            ],
            1,
        )
    }
}

/// The pool of an InceptionE's pool branch.
#[derive(Clone, Copy)]
enum EPool {
    /// FIDInceptionE_1 (`Mixed_7b`): average, padding not counted.
    Average,
    /// FIDInceptionE_2 (`Mixed_7c`): max, 3×3 stride 1 padding 1.
    Max,
}

/// FIDInceptionE_1/_2 (`Mixed_7b`, `7c`): 1×1 | 1×1 → (1×3 ‖ 3×1) | 1×1 →
/// 3×3 → (1×3 ‖ 3×1) | pool → 1×1.
struct InceptionE {
    branch1x1: BasicConv,
    branch3x3_1: BasicConv,
    branch3x3_2: [BasicConv; 2],
    branch3x3dbl: [BasicConv; 2],
    branch3x3dbl_3: [BasicConv; 2],
    branch_pool: BasicConv,
    pool: EPool,
}

impl InceptionE {
    fn new(p: &nn::Path, cin: i64, pool: EPool) -> Self {
        let row = |name: &str, i, o| BasicConv::new(&(p / name), i, o, [1, 3], 1, [0, 1]);
        let col = |name: &str, i, o| BasicConv::new(&(p / name), i, o, [3, 1], 1, [1, 0]);
        InceptionE {
            branch1x1: BasicConv::k(&(p / "branch1x1"), cin, 320, 1),
            branch3x3_1: BasicConv::k(&(p / "branch3x3_1"), cin, 384, 1),
            branch3x3_2: [row("branch3x3_2a", 384, 384), col("branch3x3_2b", 384, 384)],
            branch3x3dbl: [
                BasicConv::k(&(p / "branch3x3dbl_1"), cin, 448, 1),
                BasicConv::new(&(p / "branch3x3dbl_2"), 448, 384, [3, 3], 1, [1, 1]),
            ],
            branch3x3dbl_3: [
                row("branch3x3dbl_3a", 384, 384),
                col("branch3x3dbl_3b", 384, 384),
            ],
            branch_pool: BasicConv::k(&(p / "branch_pool"), cin, 192, 1),
            pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let split = |pair: &[BasicConv; 2], h: &Tensor| {
            Tensor::cat(&[pair[0].forward(h), pair[1].forward(h)], 1)
        };
        let pooled = match self.pool {
            EPool::Average => avg_pool_3x3(x),
            EPool::Max => max_pool(x, 3, 1, 1),
        };
        Tensor::cat(
            &[
                self.branch1x1.forward(x),
                split(&self.branch3x3_2, &self.branch3x3_1.forward(x)),
                split(&self.branch3x3dbl_3, &chain(&self.branch3x3dbl, x)),
                self.branch_pool.forward(&pooled),
            ],
            1,
        )
    }
}

/// The whole network, input (already 299×299 in [−1, 1]) to pool3.
struct Net {
    stem: [BasicConv; 3],
    stem2: [BasicConv; 2],
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7: [InceptionE; 2],
}

impl Net {
    fn new(p: &nn::Path) -> Self {
        Net {
            stem: [
                BasicConv::new(&(p / "Conv2d_1a_3x3"), 3, 32, [3, 3], 2, [0, 0]),
                BasicConv::k(&(p / "Conv2d_2a_3x3"), 32, 32, 3),
                BasicConv::new(&(p / "Conv2d_2b_3x3"), 32, 64, [3, 3], 1, [1, 1]),
            ],
            stem2: [
                BasicConv::k(&(p / "Conv2d_3b_1x1"), 64, 80, 1),
                BasicConv::k(&(p / "Conv2d_4a_3x3"), 80, 192, 3),
            ],
            mixed_5: [
                InceptionA::new(&(p / "Mixed_5b"), 192, 32),
                InceptionA::new(&(p / "Mixed_5c"), 256, 64),
                InceptionA::new(&(p / "Mixed_5d"), 288, 64),
            ],
            mixed_6a: InceptionB::new(&(p / "Mixed_6a"), 288),
            mixed_6: [
                InceptionC::new(&(p / "Mixed_6b"), 768, 128),
                InceptionC::new(&(p / "Mixed_6c"), 768, 160),
                InceptionC::new(&(p / "Mixed_6d"), 768, 160),
                InceptionC::new(&(p / "Mixed_6e"), 768, 192),
            ],
            mixed_7a: InceptionD::new(&(p / "Mixed_7a"), 768),
            mixed_7: [
                InceptionE::new(&(p / "Mixed_7b"), 1280, EPool::Average),
                InceptionE::new(&(p / "Mixed_7c"), 2048, EPool::Max),
            ],
        }
    }

    /// `[N, 3, 299, 299]` → `[N, 2048]`.
    fn forward(&self, x: &Tensor) -> Tensor {
        // Block 0: 299 → 149 → 147 → 147 → max-pool 73.
        let x = max_pool(&chain(&self.stem, x), 3, 2, 0);
        // Block 1: 73 → 71 → max-pool 35.
        let x = max_pool(&chain(&self.stem2, &x), 3, 2, 0);
        // Block 2: 35×35 (256, 288, 288 channels) → 17×17 (768).
        let x = self.mixed_5.iter().fold(x, |h, m| m.forward(&h));
        let x = self.mixed_6a.forward(&x);
        let x = self.mixed_6.iter().fold(x, |h, m| m.forward(&h));
        // Block 3: 8×8 (1280, 2048, 2048), then the average over positions.
        let x = self.mixed_7a.forward(&x);
        let x = self.mixed_7.iter().fold(x, |h, m| m.forward(&h));
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}
