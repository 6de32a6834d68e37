//! ViT: torchvision's `VisionTransformer` (`torchvision/models/
//! vision_transformer.py`, Dosovitskiy et al., ICLR 2021) with its
//! parameter names, so that a torchvision `state_dict` saved as safetensors
//! loads unchanged:
//! - `conv_proj.{weight,bias}`: the patch embedding, a convolution of
//!   kernel and stride `patch` to `hidden` channels, flattened to
//!   `(image / patch)²` tokens in row-major order;
//! - `class_token` `[1, 1, hidden]`, prepended to the tokens;
//! - `encoder.pos_embedding` `[1, tokens + 1, hidden]`, added;
//! - `encoder.layers.encoder_layer_{i}`: `depth` pre-norm blocks, each
//!   `ln_1` (LayerNorm, eps 1e-6), `self_attention` (`nn.MultiheadAttention`:
//!   `in_proj_weight` `[3 hidden, hidden]`, `in_proj_bias`, `out_proj`;
//!   `heads` heads, scaled dot-product attention), `ln_2`, and `mlp.0` /
//!   `mlp.3` (`hidden → mlp_dim → hidden`, exact GELU);
//! - `encoder.ln`, then the class token's output through `heads.head`
//!   (`hidden → classes`), the layer the released code replaces for its
//!   number of classes.
//!
//! torchvision's dropouts default to 0 and ViT has no stochastic depth, so
//! train and eval mode compute the same.
//!
//! The public sizes ([`VitSpec::named`]): `vit_b_16`, `vit_b_32`,
//! `vit_l_16`, `vit_l_32`, `vit_h_14`, at 224 × 224; the image side is the
//! data's and must be a multiple of the patch.

use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use super::zoo::Classifier;

/// The LayerNorms' epsilon (torchvision's `partial(nn.LayerNorm, eps=1e-6)`).
const LN_EPS: f64 = 1e-6;

/// The names [`VitSpec::named`] knows, torchvision's builders.
pub const NAMES: [&str; 5] = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"];

/// A ViT's shape (torchvision's `VisionTransformer.__init__` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct VitSpec {
    /// Patch side (`patch_size`); must divide `image_size`.
    pub patch: i64,
    /// Image side (`image_size`).
    pub image_size: i64,
    /// Encoder blocks (`num_layers`).
    pub depth: i64,
    /// Attention heads (`num_heads`); must divide `hidden`.
    pub heads: i64,
    /// Token width (`hidden_dim`).
    pub hidden: i64,
    /// Width of the MLPs' hidden layer (`mlp_dim`).
    pub mlp_dim: i64,
}

impl VitSpec {
    /// One of torchvision's builders by name ([`NAMES`]), at 224 × 224.
    pub fn named(name: &str) -> Result<Self, String> {
        let (patch, depth, heads, hidden, mlp_dim) = match name {
            "vit_b_16" => (16, 12, 12, 768, 3072),
            "vit_b_32" => (32, 12, 12, 768, 3072),
            "vit_l_16" => (16, 24, 16, 1024, 4096),
            "vit_l_32" => (32, 24, 16, 1024, 4096),
            "vit_h_14" => (14, 32, 16, 1280, 5120),
            _ => {
                return Err(format!(
                    "unknown ViT {name:?} (known: {})",
                    NAMES.join(", ")
                ));
            }
        };
        Ok(VitSpec {
            patch,
            image_size: 224,
            depth,
            heads,
            hidden,
            mlp_dim,
        })
    }

    /// The builder's name when the shape is one of [`NAMES`] at 224 × 224,
    /// else the shape spelled out.
    pub fn name(&self) -> String {
        match NAMES
            .iter()
            .find(|n| VitSpec::named(n).is_ok_and(|s| s == *self))
        {
            Some(name) => name.to_string(),
            None => format!(
                "vit(patch={}, image={}, depth={}, heads={}, hidden={}, mlp_dim={})",
                self.patch, self.image_size, self.depth, self.heads, self.hidden, self.mlp_dim
            ),
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch
    }

    /// The sequence length: the patches and the class token.
    pub fn seq_length(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    /// Whether the shape is consistent; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        super::check_positive(
            "ViT",
            &[
                ("patch", self.patch),
                ("image_size", self.image_size),
                ("depth", self.depth),
                ("heads", self.heads),
                ("hidden", self.hidden),
                ("mlp_dim", self.mlp_dim),
            ],
        )?;
        if self.image_size % self.patch != 0 {
            return Err(format!(
                "the image side {} is not a multiple of the ViT's patch {}",
                self.image_size, self.patch
            ));
        }
        super::check_heads("ViT", self.hidden, self.heads)?;
        Ok(())
    }
}

/// A LayerNorm of `dim` with torchvision's epsilon.
fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps: LN_EPS,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], config)
}

/// torchvision's `MLPBlock` Linear initialisation: Xavier-uniform weight,
/// N(0, 1e-6) bias.
fn mlp_linear(p: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let config = nn::LinearConfig {
        ws_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        bs_init: Some(nn::Init::Randn {
            mean: 0.0,
            stdev: 1e-6,
        }),
        bias: true,
    };
    nn::linear(p, fan_in, fan_out, config)
}

/// One encoder block (`EncoderBlock`).
#[derive(Debug)]
struct Block {
    ln_1: nn::LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    ln_2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: &nn::Path, spec: &VitSpec) -> Self {
        let d = spec.hidden;
        let attn = p / "self_attention";
        let bound = (6.0 / (d + 3 * d) as f64).sqrt();
        let out_proj = nn::linear(
            &attn / "out_proj",
            d,
            d,
            nn::LinearConfig {
                bs_init: Some(nn::Init::Const(0.0)),
                ..Default::default()
            },
        );
        Block {
            ln_1: layer_norm(p / "ln_1", d),
            in_proj_weight: attn.var(
                "in_proj_weight",
                &[3 * d, d],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            in_proj_bias: attn.var("in_proj_bias", &[3 * d], nn::Init::Const(0.0)),
            out_proj,
            ln_2: layer_norm(p / "ln_2", d),
            fc1: mlp_linear(p / "mlp" / 0, d, spec.mlp_dim),
            fc2: mlp_linear(p / "mlp" / 3, spec.mlp_dim, d),
            heads: spec.heads,
        }
    }

    /// `nn.MultiheadAttention(x, x, x, need_weights=False)` with
    /// `batch_first`: the packed input projection, scaled dot-product
    /// attention per head (scale `head_dim^-0.5`), the output projection.
    fn attention(&self, x: &Tensor) -> Tensor {
        let (b, t, c) = x.size3().unwrap();
        let hd = c / self.heads;
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .reshape([b, t, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false)
            .transpose(1, 2)
            .reshape([b, t, c])
            .apply(&self.out_proj)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention(&x.apply(&self.ln_1));
        let y = x
            .apply(&self.ln_2)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2);
        x + y
    }
}

/// The ViT classifier (see the module docs).
#[derive(Debug)]
pub struct Vit {
    spec: VitSpec,
    conv_proj: nn::Conv2D,
    class_token: Tensor,
    pos_embedding: Tensor,
    blocks: Vec<Block>,
    ln: nn::LayerNorm,
    head: nn::Linear,
}

impl Vit {
    /// A ViT under `p` for `channels`-channel images and `classes` classes,
    /// initialised as torchvision does (truncated-normal patch embedding of
    /// std √(1/fan_in), zero class token, N(0, 0.02) position embedding,
    /// Xavier attention and MLP weights, a zero head). Panics on an
    /// inconsistent spec ([`VitSpec::check`]).
    pub fn new(p: &nn::Path, spec: &VitSpec, channels: i64, classes: i64) -> Self {
        if let Err(e) = spec.check() {
            panic!("{e}");
        }
        let d = spec.hidden;
        let fan_in = (channels * spec.patch * spec.patch) as f64;
        let conv_proj = nn::conv2d(
            p / "conv_proj",
            channels,
            d,
            spec.patch,
            nn::ConvConfig {
                stride: spec.patch,
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: (1.0 / fan_in).sqrt(),
                },
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        );
        let class_token = p.var("class_token", &[1, 1, d], nn::Init::Const(0.0));
        let encoder = p / "encoder";
        let pos_embedding = encoder.var(
            "pos_embedding",
            &[1, spec.seq_length(), d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let layers = &encoder / "layers";
        let blocks = (0..spec.depth)
            .map(|i| Block::new(&(&layers / format!("encoder_layer_{i}")), spec))
            .collect();
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        Vit {
            spec: spec.clone(),
            conv_proj,
            class_token,
            pos_embedding,
            blocks,
            ln: layer_norm(&encoder / "ln", d),
            head: nn::linear(p / "heads" / "head", d, classes, zero),
        }
    }

    pub fn spec(&self) -> &VitSpec {
        &self.spec
    }
}

impl Classifier for Vit {
    /// The class token's output of the encoder's last LayerNorm `[N, hidden]`.
    fn features_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let (n, _, h, w) = xs.size4().unwrap();
        assert!(
            h == self.spec.image_size && w == self.spec.image_size,
            "the ViT takes {0}x{0} images, not {h}x{w}",
            self.spec.image_size
        );
        let x = xs.apply(&self.conv_proj).flatten(2, -1).permute([0, 2, 1]);
        let class = self.class_token.expand([n, -1, -1], false);
        let mut x = Tensor::cat(&[&class, &x], 1) + &self.pos_embedding;
        for block in &self.blocks {
            x = block.forward(&x);
        }
        x.apply(&self.ln).select(1, 0)
    }
}

impl ModuleT for Vit {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head.forward(&self.features_t(xs, train))
    }
}

/// The parameters of a ViT of this shape, as `sum(p.numel() for p in
/// model.parameters())` counts them.
pub fn parameter_count(spec: &VitSpec, channels: i64, classes: i64) -> i64 {
    let d = spec.hidden;
    let block = 2 * 2 * d
        + (3 * d * d + 3 * d)
        + (d * d + d)
        + (d * spec.mlp_dim + spec.mlp_dim)
        + (spec.mlp_dim * d + d);
    channels * spec.patch * spec.patch * d
        + d
        + d
        + spec.seq_length() * d
        + spec.depth * block
        + 2 * d
        + d * classes
        + classes
}
