//! `resnet9`: the fast CIFAR-10 ResNet-9 that the KLoM benchmark trains
//! (Georgiev et al., `data-unlearning-bench`, `unlearning_bench/models.py`:
//! the network of FFCV's CIFAR-10 example, `examples/cifar/train_cifar.py`,
//! after KakaoBrain's torchskeleton), with its PyTorch names.
//!
//! The reference is one `nn.Sequential`, so every name is a position in it;
//! `conv_bn(ci, co, k, s, p)` is itself `Sequential(Conv2d(bias=False),
//! BatchNorm2d, ReLU)` and a `Residual` keeps its body under `module`:
//!
//! ```text
//! 0   conv_bn(C, 64, 3, 1, 1)              0.0.weight, 0.1.{weight, bias, running_mean, running_var}
//! 1   conv_bn(64, 128, 5, 2, 2)            1.0.weight, 1.1.*
//! 2   Residual(conv_bn(128, 128) ×2)       2.module.0.0.weight, 2.module.0.1.*, 2.module.1.{0,1}.*
//! 3   conv_bn(128, 256, 3, 1, 1)           3.0.weight, 3.1.*
//! 4   MaxPool2d(2)
//! 5   Residual(conv_bn(256, 256) ×2)       5.module.{0,1}.{0,1}.*
//! 6   conv_bn(256, 128, 3, 1, 0)           6.0.weight, 6.1.*
//! 7   AdaptiveMaxPool2d((1, 1)), 8 Flatten
//! 9   Linear(128, classes, bias=False)     9.weight
//! 10  Mul(0.2)                             the logits are 0.2 · the linear layer's output
//! ```
//!
//! The reference's first conv reads 3 channels; here it reads the data's.
//! A residual adds its body's output to its input with no ReLU after (both
//! are ReLU outputs, so the sum is never negative).
//! The last conv has no padding, so the side must reach 3 after the
//! stride-2 conv and the max-pool: 28 × 28 digits go 28 → 14 → 7 → 5,
//! CIFAR's 32 × 32 go 32 → 16 → 8 → 6.

use tch::Tensor;
use tch::nn::{self, ModuleT};

use super::norm::{BatchNorm, NormSync, batch_norm2d};
use super::zoo::{Classifier, conv};

/// The reference's `Mul(0.2)` after the linear layer.
pub const LOGIT_SCALE: f64 = 0.2;

/// `conv_bn`: a bias-free conv (`.0`), BatchNorm (`.1`), ReLU.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(
        p: nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        norm: &NormSync,
    ) -> Self {
        ConvBn {
            conv: conv(&p / 0, cin, cout, k, stride, padding, false),
            bn: batch_norm2d(&p / 1, cout, norm),
        }
    }

    /// A 3×3, stride-1, padding-1 `conv_bn` (the reference's defaults).
    fn same(p: nn::Path, cin: i64, cout: i64, norm: &NormSync) -> Self {
        ConvBn::new(p, cin, cout, 3, 1, 1, norm)
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.apply(&self.conv).apply_t(&self.bn, train);
        // In place, as the reference's ReLU(inplace=True): BatchNorm's
        // backward needs its input, not its output.
        let _ = x.relu_();
        x
    }
}

/// `Residual(Sequential(conv_bn(c, c), conv_bn(c, c)))`: `x + body(x)`.
#[derive(Debug)]
struct Residual {
    body: [ConvBn; 2],
}

impl Residual {
    fn new(p: nn::Path, channels: i64, norm: &NormSync) -> Self {
        let body = &p / "module";
        Residual {
            body: [
                ConvBn::same(&body / 0, channels, channels, norm),
                ConvBn::same(&body / 1, channels, channels, norm),
            ],
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.body[0].forward_t(xs, train);
        xs + self.body[1].forward_t(&x, train)
    }
}

/// The KLoM benchmark's ResNet-9 (module docs).
#[derive(Debug)]
pub struct ResNet9 {
    prep: ConvBn,
    down: ConvBn,
    res1: Residual,
    widen: ConvBn,
    res2: Residual,
    narrow: ConvBn,
    linear: nn::Linear,
}

impl ResNet9 {
    /// The variables under `p` for `cin` input channels and `classes`
    /// classes; BatchNorm normalises as `norm` says.
    pub fn new(p: &nn::Path, cin: i64, classes: i64, norm: &NormSync) -> Self {
        let linear = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        ResNet9 {
            prep: ConvBn::same(p / 0, cin, 64, norm),
            down: ConvBn::new(p / 1, 64, 128, 5, 2, 2, norm),
            res1: Residual::new(p / 2, 128, norm),
            widen: ConvBn::same(p / 3, 128, 256, norm),
            res2: Residual::new(p / 5, 256, norm),
            narrow: ConvBn::new(p / 6, 256, 128, 3, 1, 0, norm),
            linear: nn::linear(p / 9, 128, classes, linear),
        }
    }
}

/// The number of parameters (`sum(p.numel() for p in model.parameters())`)
/// for `cin` input channels and `classes` classes: 2,274,880 for CIFAR-10.
pub fn parameter_count(cin: i64, classes: i64) -> i64 {
    let conv_bn = |ci: i64, co: i64, k: i64| ci * co * k * k + 2 * co;
    conv_bn(cin, 64, 3)
        + conv_bn(64, 128, 5)
        + 2 * conv_bn(128, 128, 3)
        + conv_bn(128, 256, 3)
        + 2 * conv_bn(256, 256, 3)
        + conv_bn(256, 128, 3)
        + 128 * classes
}

impl ModuleT for ResNet9 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.features_t(xs, train).apply(&self.linear) * LOGIT_SCALE // [N, classes]
    }
}

impl Classifier for ResNet9 {
    fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // xs: [N, C, H, W]
        let x = self.prep.forward_t(xs, train); // [N, 64, H, W]
        let x = self.down.forward_t(&x, train); // [N, 128, ⌈H/2⌉, ⌈W/2⌉]
        let x = self.res1.forward_t(&x, train);
        let x = self.widen.forward_t(&x, train); // [N, 256, ⌈H/2⌉, ⌈W/2⌉]
        let x = x.max_pool2d_default(2); // [N, 256, H', W'], H' = ⌊⌈H/2⌉/2⌋
        let x = self.res2.forward_t(&x, train);
        let x = self.narrow.forward_t(&x, train); // [N, 128, H' − 2, W' − 2]
        // AdaptiveMaxPool2d((1, 1)): the gradient goes to one maximum per
        // channel, as PyTorch's (a max over dims would split it among ties).
        let (x, _) = x.adaptive_max_pool2d([1, 1]);
        x.flatten(1, -1) // [N, 128]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The reference's names, every one and nothing else, and the counted
    /// parameters.
    #[test]
    fn names_are_the_references_and_the_count_adds_up() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet9::new(&vs.root(), 3, 10, &NormSync::default());
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        let conv_bn = |p: &str| {
            let mut v = vec![format!("{p}.0.weight")];
            for s in ["weight", "bias", "running_mean", "running_var"] {
                v.push(format!("{p}.1.{s}"));
            }
            v
        };
        let mut want: Vec<String> = [
            "0",
            "1",
            "2.module.0",
            "2.module.1",
            "3",
            "5.module.0",
            "5.module.1",
            "6",
        ]
        .into_iter()
        .flat_map(conv_bn)
        .collect();
        want.push("9.weight".into());
        want.sort();
        assert_eq!(names, want);
        let counted: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(counted, parameter_count(3, 10));
        assert_eq!(parameter_count(3, 10), 2_274_880);
        let x = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let (f, y) = tch::no_grad(|| (net.features_t(&x, false), net.forward_t(&x, false)));
        assert_eq!((f.size(), y.size()), (vec![2, 128], vec![2, 10]));
    }
}
