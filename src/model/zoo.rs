//! The model zoo, with parameter names identical to PyTorch's so that
//! `state_dict`s move between sfron and PyTorch without renaming.
//!
//! - `mnist_cnn`: the PyTorch MNIST example's net without dropout
//!   (conv1 1→32 3×3, conv2 32→64 3×3, max-pool 2, fc1 9216→128, fc2 128→10),
//!   optionally with BatchNorm after each conv (`bn1`, `bn2`).
//! - `resnet9`: the KLoM benchmark's fast CIFAR-10 ResNet-9, names by
//!   position in its `nn.Sequential` (`0.0.weight` … `9.weight`; see
//!   [`super::resnet9`]).
//! - `resnet18_cifar`: the SFR-on authors' CIFAR ResNet-18: a 3×3 stride-1
//!   first conv, no max-pool, BasicBlocks [2, 2, 2, 2], base width
//!   `round(64 · width)`.
//! - `resnet18`, `resnet50`: torchvision's (7×7 stride-2 conv, max-pool,
//!   BasicBlocks [2, 2, 2, 2] / Bottlenecks [3, 4, 6, 3], `downsample.0/1`).
//! - `ddpm_unet`: the SFR-on authors' class-conditional DDPM UNet, a
//!   denoiser rather than a classifier ([`super::unet`]; its shape is
//!   `[model.unet]`).
//! - `vit_b_16`, `vit_b_32`, `vit_l_16`, `vit_l_32`, `vit_h_14`:
//!   torchvision's Vision Transformers ([`super::vit`]; the image side is
//!   the data's, `[model.vit]` overrides the shape).
//! - `swin_t`, `swin_s`, `swin_b`: torchvision's Swin Transformers
//!   ([`super::swin`]; the image side is the data's, `[model.swin]`
//!   overrides the shape).
//! - `dit`: the DiT of Peebles & Xie, a denoiser on latents or pixels
//!   ([`super::dit`]; its shape is `[model.dit]`, the public names
//!   `DiT-XL/2` … `DiT-S/8`).

use tch::Tensor;
use tch::nn::{self, ModuleT};

use super::dit::{Dit, DitSpec};
use super::norm::{BatchNorm, NormSync, batch_norm2d};
use super::resnet9::ResNet9;
use super::swin::{RowKeys, Swin, SwinSpec};
use super::unet::{Unet, UnetSpec};
use super::vit::{Vit, VitSpec};

/// Architectures of the zoo.
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    MnistCnn { batch_norm: bool },
    Resnet9,
    Resnet18Cifar { width: f64 },
    Resnet18,
    Resnet50,
    Vit(VitSpec),
    Swin(SwinSpec),
    Unet(UnetSpec),
    Dit(DitSpec),
}

/// What a network computes, which decides its loss, its evaluation and the
/// commands that take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Logits of an image: cross-entropy, accuracy, MIAs.
    Classify,
    /// The noise in a noised image, given its timestep and class: the
    /// denoising loss, sampling, generation metrics.
    Denoise,
}

impl Task {
    pub fn noun(self) -> &'static str {
        match self {
            Task::Classify => "classifier",
            Task::Denoise => "diffusion model",
        }
    }
}

/// A classifier: logits, and the penultimate features they are a linear
/// function of (FID in a classifier's feature space).
pub trait Classifier: ModuleT {
    /// The input of the last linear layer `[N, D]`.
    fn features_t(&self, xs: &Tensor, train: bool) -> Tensor;
}

/// A built network: a classifier's forward pass or a denoiser.
pub enum Net {
    Classifier(Box<dyn Classifier>),
    Denoiser(Denoiser),
}

/// The denoisers of the zoo.
#[derive(Debug)]
pub enum Denoiser {
    Unet(Box<Unet>),
    Dit(Box<Dit>),
}

impl Arch {
    /// Parses `mnist_cnn`, `mnist_cnn_bn`, `resnet9`, `resnet18_cifar`,
    /// `resnet18`, `resnet50`, torchvision's ViT and Swin builders
    /// (`vit_b_16`, `swin_t`, …), `ddpm_unet` (the released shape), `dit`
    /// (DiT-XL/2; the configuration sets the shape).
    pub fn parse(name: &str, width: f64) -> Option<Self> {
        match name {
            "mnist_cnn" => Some(Arch::MnistCnn { batch_norm: false }),
            "mnist_cnn_bn" => Some(Arch::MnistCnn { batch_norm: true }),
            "resnet9" => Some(Arch::Resnet9),
            "resnet18_cifar" => Some(Arch::Resnet18Cifar { width }),
            "resnet18" => Some(Arch::Resnet18),
            "resnet50" => Some(Arch::Resnet50),
            "ddpm_unet" => Some(Arch::Unet(UnetSpec::released())),
            "dit" => DitSpec::named("DiT-XL/2").ok().map(Arch::Dit),
            other => VitSpec::named(other)
                .map(Arch::Vit)
                .or_else(|_| SwinSpec::named(other).map(Arch::Swin))
                .ok(),
        }
    }

    pub const NAMES: &'static [&'static str] = &[
        "mnist_cnn",
        "mnist_cnn_bn",
        "resnet9",
        "resnet18_cifar",
        "resnet18",
        "resnet50",
        "vit_b_16",
        "vit_b_32",
        "vit_l_16",
        "vit_l_32",
        "vit_h_14",
        "swin_t",
        "swin_s",
        "swin_b",
        "ddpm_unet",
        "dit",
    ];

    pub fn task(&self) -> Task {
        match self {
            Arch::Unet(_) | Arch::Dit(_) => Task::Denoise,
            _ => Task::Classify,
        }
    }

    /// Where a denoiser's weights say its input channels and classes: the
    /// tensor whose dimension 1 is the channels, the one whose rows are the
    /// classes, and how many of those rows are not classes (DiT's null
    /// class). `None` for a classifier.
    pub fn denoiser_shape_keys(&self) -> Option<(&'static str, &'static str, i64)> {
        match self {
            Arch::Unet(_) => Some(("conv_in.weight", "classes_emb.weight", 0)),
            Arch::Dit(spec) => Some((
                "x_embedder.proj.weight",
                "y_embedder.embedding_table.weight",
                i64::from(spec.has_null_class()),
            )),
            _ => None,
        }
    }

    /// The classifier's last Linear layer, the one fine-tuning replaces:
    /// its `.weight` and, where it has one, `.bias` (`None` for a denoiser).
    pub fn head(&self) -> Option<&'static str> {
        match self {
            Arch::MnistCnn { .. } => Some("fc2"),
            // Position 9 of the Sequential; bias-free.
            Arch::Resnet9 => Some("9"),
            Arch::Resnet18Cifar { .. } | Arch::Resnet18 | Arch::Resnet50 => Some("fc"),
            Arch::Vit(_) => Some("heads.head"),
            Arch::Swin(_) => Some("head"),
            Arch::Unet(_) | Arch::Dit(_) => None,
        }
    }

    /// Whether a denoiser predicts its variance too (DiT's `learn_sigma`).
    pub fn learns_sigma(&self) -> bool {
        matches!(self, Arch::Dit(spec) if spec.learn_sigma)
    }

    /// Whether the network has BatchNorm layers.
    pub fn has_batch_norm(&self) -> bool {
        !matches!(
            self,
            Arch::MnistCnn { batch_norm: false }
                | Arch::Vit(_)
                | Arch::Swin(_)
                | Arch::Unet(_)
                | Arch::Dit(_)
        )
    }

    pub fn name(&self) -> String {
        match self {
            Arch::MnistCnn { batch_norm: false } => "mnist_cnn".into(),
            Arch::MnistCnn { batch_norm: true } => "mnist_cnn_bn".into(),
            Arch::Resnet9 => "resnet9".into(),
            Arch::Resnet18Cifar { width } => format!("resnet18_cifar(width={width})"),
            Arch::Resnet18 => "resnet18".into(),
            Arch::Resnet50 => "resnet50".into(),
            Arch::Vit(spec) => spec.name(),
            Arch::Swin(spec) => spec.name(),
            Arch::Unet(spec) => spec.name(),
            Arch::Dit(spec) => spec.name(),
        }
    }

    /// Builds the network's variables under `root` and returns its forward
    /// pass; its BatchNorm layers normalise as `norm` says, its stochastic
    /// depth draws from `keys` when they are set.
    pub fn build(
        &self,
        root: &nn::Path,
        in_channels: i64,
        classes: i64,
        norm: &NormSync,
        keys: &RowKeys,
    ) -> Net {
        match self {
            Arch::Unet(spec) => {
                let unet = Unet::new(root, spec, in_channels, classes);
                return Net::Denoiser(Denoiser::Unet(Box::new(unet)));
            }
            Arch::Dit(spec) => {
                assert_eq!(
                    (spec.in_channels, spec.classes),
                    (in_channels, classes),
                    "the DiT spec's channels and classes are the model's"
                );
                return Net::Denoiser(Denoiser::Dit(Box::new(Dit::new(root, spec))));
            }
            _ => {}
        }
        Net::Classifier(match *self {
            Arch::MnistCnn { batch_norm } => {
                Box::new(MnistCnn::new(root, in_channels, classes, batch_norm, norm))
            }
            Arch::Resnet9 => Box::new(ResNet9::new(root, in_channels, classes, norm)),
            Arch::Resnet18Cifar { width } => {
                let base = (64.0 * width).round().max(1.0) as i64;
                let shape = Shape {
                    base,
                    block: Block::Basic,
                    depths: [2, 2, 2, 2],
                    stem: Stem::Cifar,
                };
                Box::new(ResNet::new(root, in_channels, classes, shape, norm))
            }
            Arch::Resnet18 => {
                let shape = Shape {
                    base: 64,
                    block: Block::Basic,
                    depths: [2, 2, 2, 2],
                    stem: Stem::ImageNet,
                };
                Box::new(ResNet::new(root, in_channels, classes, shape, norm))
            }
            Arch::Resnet50 => {
                let shape = Shape {
                    base: 64,
                    block: Block::Bottleneck,
                    depths: [3, 4, 6, 3],
                    stem: Stem::ImageNet,
                };
                Box::new(ResNet::new(root, in_channels, classes, shape, norm))
            }
            Arch::Vit(ref spec) => Box::new(Vit::new(root, spec, in_channels, classes)),
            Arch::Swin(ref spec) => Box::new(Swin::new(root, spec, in_channels, classes, keys)),
            Arch::Unet(_) | Arch::Dit(_) => unreachable!("built above"),
        })
    }
}

/// A convolution with PyTorch's `nn.Conv2d` initialisation.
pub(super) fn conv(
    p: nn::Path,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    padding: i64,
    bias: bool,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        bias,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, config)
}

#[derive(Debug)]
struct MnistCnn {
    conv1: nn::Conv2D,
    bn1: Option<BatchNorm>,
    conv2: nn::Conv2D,
    bn2: Option<BatchNorm>,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl MnistCnn {
    fn new(p: &nn::Path, cin: i64, classes: i64, batch_norm: bool, norm: &NormSync) -> Self {
        MnistCnn {
            conv1: conv(p / "conv1", cin, 32, 3, 1, 0, true),
            bn1: batch_norm.then(|| batch_norm2d(p / "bn1", 32, norm)),
            conv2: conv(p / "conv2", 32, 64, 3, 1, 0, true),
            bn2: batch_norm.then(|| batch_norm2d(p / "bn2", 64, norm)),
            fc1: nn::linear(p / "fc1", 9216, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, classes, Default::default()),
        }
    }
}

fn maybe_bn(x: Tensor, bn: &Option<BatchNorm>, train: bool) -> Tensor {
    match bn {
        Some(bn) => x.apply_t(bn, train),
        None => x,
    }
}

impl ModuleT for MnistCnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.features_t(xs, train).apply(&self.fc2) // [N, classes]
    }
}

impl Classifier for MnistCnn {
    fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // xs: [N, 1, 28, 28]
        let x = maybe_bn(xs.apply(&self.conv1), &self.bn1, train).relu(); // [N, 32, 26, 26]
        let x = maybe_bn(x.apply(&self.conv2), &self.bn2, train).relu(); // [N, 64, 24, 24]
        let x = x.max_pool2d_default(2).flatten(1, -1); // [N, 9216]
        x.apply(&self.fc1).relu() // [N, 128]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    fn expansion(self) -> i64 {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stem {
    /// 3×3 stride-1 conv, no max-pool (32×32 inputs).
    Cifar,
    /// 7×7 stride-2 conv, 3×3 stride-2 max-pool (224×224 inputs).
    ImageNet,
}

#[derive(Debug)]
struct Residual {
    convs: Vec<(nn::Conv2D, BatchNorm)>,
    downsample: Option<(nn::Conv2D, BatchNorm)>,
}

impl Residual {
    fn new(p: &nn::Path, block: Block, cin: i64, width: i64, stride: i64, norm: &NormSync) -> Self {
        let cout = width * block.expansion();
        let bn = |p: nn::Path, c: i64| batch_norm2d(p, c, norm);
        let convs = match block {
            Block::Basic => vec![
                (
                    conv(p / "conv1", cin, width, 3, stride, 1, false),
                    bn(p / "bn1", width),
                ),
                (
                    conv(p / "conv2", width, width, 3, 1, 1, false),
                    bn(p / "bn2", width),
                ),
            ],
            // torchvision (v1.5): the stride sits on the 3×3 conv.
            Block::Bottleneck => vec![
                (
                    conv(p / "conv1", cin, width, 1, 1, 0, false),
                    bn(p / "bn1", width),
                ),
                (
                    conv(p / "conv2", width, width, 3, stride, 1, false),
                    bn(p / "bn2", width),
                ),
                (
                    conv(p / "conv3", width, cout, 1, 1, 0, false),
                    bn(p / "bn3", cout),
                ),
            ],
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            (
                conv(p / "downsample" / 0, cin, cout, 1, stride, 0, false),
                bn(p / "downsample" / 1, cout),
            )
        });
        Residual { convs, downsample }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut x = xs.shallow_clone();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            x = x.apply(c).apply_t(b, train);
            if i < last {
                // In place, as torchvision's ReLU(inplace=True): BatchNorm's
                // backward needs its input, not its output.
                let _ = x.relu_();
            }
        }
        let shortcut = match &self.downsample {
            Some((c, b)) => xs.apply(c).apply_t(b, train),
            None => xs.shallow_clone(),
        };
        let mut out = x + shortcut;
        let _ = out.relu_();
        out
    }
}

#[derive(Debug)]
struct ResNet {
    stem: Stem,
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    layers: Vec<Residual>,
    fc: nn::Linear,
}

/// A ResNet's layout: base width, block, blocks per stage and stem.
struct Shape {
    base: i64,
    block: Block,
    depths: [usize; 4],
    stem: Stem,
}

impl ResNet {
    fn new(p: &nn::Path, cin: i64, classes: i64, shape: Shape, norm: &NormSync) -> Self {
        let Shape {
            base,
            block,
            depths,
            stem,
        } = shape;
        let conv1 = match stem {
            Stem::Cifar => conv(p / "conv1", cin, base, 3, 1, 1, false),
            Stem::ImageNet => conv(p / "conv1", cin, base, 7, 2, 3, false),
        };
        let mut layers = Vec::new();
        let mut channels = base;
        for (stage, &depth) in depths.iter().enumerate() {
            let width = base << stage;
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let path = p / format!("layer{}", stage + 1) / i;
                layers.push(Residual::new(&path, block, channels, width, stride, norm));
                channels = width * block.expansion();
            }
        }
        ResNet {
            stem,
            conv1,
            bn1: batch_norm2d(p / "bn1", base, norm),
            layers,
            fc: nn::linear(p / "fc", channels, classes, Default::default()),
        }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.features_t(xs, train).apply(&self.fc)
    }
}

impl Classifier for ResNet {
    fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // xs: [N, C, H, W] → stem: [N, base, H, W] (cifar) or [N, base, H/4, W/4] (imagenet)
        let mut x = xs.apply(&self.conv1).apply_t(&self.bn1, train);
        let _ = x.relu_();
        if self.stem == Stem::ImageNet {
            x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in &self.layers {
            x = block.forward_t(&x, train); // spatial /2 at each stage after the first
        }
        // global average pool → [N, channels]
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}
