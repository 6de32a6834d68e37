//! DiT: the class-conditional latent diffusion transformer of Peebles & Xie,
//! "Scalable Diffusion Models with Transformers" (ICCV 2023), written from
//! the public reference `facebookresearch/DiT` (`models.py`, class `DiT`,
//! with timm's `PatchEmbed`, `Attention` and `Mlp`).
//!
//! Parameter names are the reference's `state_dict` keys, so the released
//! checkpoints (`DiT-XL-2-256x256.pt`, a plain state_dict) load unchanged
//! once converted to safetensors:
//! - `x_embedder.proj.{weight,bias}`: the patch embedding, a convolution of
//!   kernel and stride `patch` from `in_channels` to `hidden`, its output
//!   flattened to `T = (input_size / patch)²` tokens in row-major order;
//! - `pos_embed` `[1, T, hidden]`: the fixed 2D sine-cosine position
//!   embedding (MAE's `get_2d_sincos_pos_embed`), in the state_dict but not
//!   trained (a variable of the store with `requires_grad` off);
//! - `t_embedder.mlp.{0,2}`: the sinusoidal embedding of the timestep (256
//!   frequencies, cos then sin, max period 10000) through Linear → SiLU →
//!   Linear to `hidden`;
//! - `y_embedder.embedding_table.weight` `[classes + 1, hidden]`: the class
//!   embedding, its last row the null class of classifier-free guidance
//!   (no null row when `class_dropout_prob` is 0);
//! - `blocks.{i}`: `depth` adaLN-Zero transformer blocks, each with
//!   `adaLN_modulation.1` (SiLU then Linear `hidden → 6 hidden`: shift,
//!   scale and gate of the attention and of the MLP), `norm1` / `norm2`
//!   (LayerNorm without affine parameters, eps 1e-6), `attn.qkv` and
//!   `attn.proj` (multi-head self-attention, `heads` heads), `mlp.fc1` /
//!   `mlp.fc2` (`hidden → mlp_ratio · hidden → hidden`, tanh-approximated
//!   GELU);
//! - `final_layer.{adaLN_modulation.1, linear}`: shift and scale of a last
//!   LayerNorm (`norm_final`), then a Linear to `patch² · out_channels`,
//!   unpatchified to `[N, out_channels, input_size, input_size]`;
//!   `out_channels = 2 in_channels` with `learn_sigma` (noise and the
//!   variance interpolation), else `in_channels`.
//!
//! The public sizes ([`DitSpec::named`]): S (depth 12, hidden 384, 6
//! heads), B (12, 768, 12), L (24, 1024, 16) and XL (28, 1152, 16), each
//! with patches 2, 4 and 8, on 32 × 32 × 4 latents (256 × 256 images
//! through the Stable Diffusion VAE), 1000 ImageNet classes. DiT-XL/2 has
//! 675,129,632 parameters as the reference counts them
//! (`model.parameters()`, the frozen `pos_embed`'s 294,912 included).
//!
//! Train and eval mode differ only in the class dropout of classifier-free
//! guidance; the reference draws it inside the forward pass, here the
//! caller passes the draws ([`Dit::forward`]'s `drop`), so that a result
//! does not depend on how a batch is split over ranks.
//!
//! In the zoo as `model.arch = "dit"` (`[model.dit]`), a denoiser trained
//! and sampled with ADM's process ([`crate::diffusion::adm`]); the VAE of
//! its latents is [`super::vae`]. `device.recompute` checkpoints the
//! blocks' activations ([`Dit::set_recompute`], [`super::recompute`]).

use tch::nn;
use tch::{Device, Kind, Tensor};

use super::layout::Autocast;
use super::recompute::{self, Deferred, Recompute};

/// The reference's `frequency_embedding_size` of the timestep embedder.
pub const FREQUENCY_EMBEDDING: i64 = 256;

/// The LayerNorms' epsilon.
const LN_EPS: f64 = 1e-6;

/// The names [`DitSpec::named`] knows, the reference's `DiT_models` keys.
pub const NAMES: [&str; 12] = [
    "DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-L/4", "DiT-L/8", "DiT-B/2", "DiT-B/4",
    "DiT-B/8", "DiT-S/2", "DiT-S/4", "DiT-S/8",
];

/// A DiT's shape (the reference's `DiT.__init__` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct DitSpec {
    /// Transformer blocks (`depth`).
    pub depth: i64,
    /// Token width (`hidden_size`).
    pub hidden: i64,
    /// Attention heads (`num_heads`); must divide `hidden`.
    pub heads: i64,
    /// Patch side (`patch_size`); must divide `input_size`.
    pub patch: i64,
    /// Latent side (`input_size`).
    pub input_size: i64,
    /// Latent channels (`in_channels`).
    pub in_channels: i64,
    /// Classes (`num_classes`), the null class not counted.
    pub classes: i64,
    /// Predict the variance too (`learn_sigma`): twice the output channels.
    pub learn_sigma: bool,
    /// Probability of dropping the class in training (`class_dropout_prob`);
    /// above 0 the embedding table has a null-class row.
    pub class_dropout_prob: f64,
    /// MLP width over `hidden` (`mlp_ratio`).
    pub mlp_ratio: f64,
}

impl DitSpec {
    /// One of the reference's configurations by its name ([`NAMES`]: `DiT-XL/2`
    /// … `DiT-S/8`), with the reference's defaults for the rest (32 × 32 × 4
    /// latents, 1000 classes, `learn_sigma`, class dropout 0.1, MLP ratio 4).
    pub fn named(name: &str) -> Result<Self, String> {
        let unknown = || format!("unknown DiT model {name:?} (known: {})", NAMES.join(", "));
        let (size, patch) = name
            .strip_prefix("DiT-")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(unknown)?;
        let (depth, hidden, heads) = match size {
            "S" => (12, 384, 6),
            "B" => (12, 768, 12),
            "L" => (24, 1024, 16),
            "XL" => (28, 1152, 16),
            _ => return Err(unknown()),
        };
        let patch = match patch {
            "2" => 2,
            "4" => 4,
            "8" => 8,
            _ => return Err(unknown()),
        };
        Ok(DitSpec {
            depth,
            hidden,
            heads,
            patch,
            input_size: 32,
            in_channels: 4,
            classes: 1000,
            learn_sigma: true,
            class_dropout_prob: 0.1,
            mlp_ratio: 4.0,
        })
    }

    /// The public name when the shape is one of [`NAMES`] on 32 × 32 × 4
    /// latents of 1000 classes, else the shape spelled out.
    pub fn name(&self) -> String {
        let public = NAMES.iter().find(|n| {
            DitSpec::named(n).is_ok_and(|s| {
                DitSpec {
                    learn_sigma: self.learn_sigma,
                    class_dropout_prob: self.class_dropout_prob,
                    ..s
                } == *self
            })
        });
        match public {
            Some(name) => name.to_string(),
            None => format!(
                "dit(depth={}, hidden={}, heads={}, patch={}, input={}x{}x{}, mlp_ratio={}, \
                 learn_sigma={})",
                self.depth,
                self.hidden,
                self.heads,
                self.patch,
                self.in_channels,
                self.input_size,
                self.input_size,
                self.mlp_ratio,
                self.learn_sigma
            ),
        }
    }

    /// Channels of the output: `2 in_channels` with `learn_sigma`.
    pub fn out_channels(&self) -> i64 {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// The noise channels classifier-free guidance combines: 3 on the
    /// reference's 4-channel latents (its `forward_with_cfg` guides exactly
    /// 3 "for exact reproducibility reasons"), every noise channel otherwise
    /// (the standard approach, as the reference's comment calls it).
    pub fn guided_channels(&self) -> i64 {
        if self.in_channels == 4 {
            3
        } else {
            self.in_channels
        }
    }

    /// Patches per side, `input_size / patch`.
    pub fn grid(&self) -> i64 {
        self.input_size / self.patch
    }

    /// Tokens `T`, `grid()²`.
    pub fn tokens(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Width of the MLPs' hidden layer, `int(hidden · mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden as f64 * self.mlp_ratio) as i64
    }

    /// Whether the embedding table has a null-class row (`class_dropout_prob > 0`).
    pub fn has_null_class(&self) -> bool {
        self.class_dropout_prob > 0.0
    }

    /// Whether the shape is consistent (every size positive, `heads` dividing
    /// `hidden`, `patch` dividing `input_size`, `hidden` a multiple of 4);
    /// the error names the field. [`Dit::new`] panics where this fails.
    pub fn check(&self) -> Result<(), String> {
        super::check_positive(
            "DiT",
            &[
                ("depth", self.depth),
                ("hidden", self.hidden),
                ("heads", self.heads),
                ("patch", self.patch),
                ("input_size", self.input_size),
                ("in_channels", self.in_channels),
                ("classes", self.classes),
            ],
        )?;
        super::check_heads("DiT", self.hidden, self.heads)?;
        if self.input_size % self.patch != 0 {
            return Err(format!(
                "DiT input_size {} is not a multiple of patch {}",
                self.input_size, self.patch
            ));
        }
        // get_2d_sincos_pos_embed splits the width in four (sin/cos of h and w).
        if self.hidden % 4 != 0 {
            return Err(format!("DiT hidden {} is not a multiple of 4", self.hidden));
        }
        if self.mlp_hidden() <= 0 || !(0.0..1.0).contains(&self.class_dropout_prob) {
            return Err(format!(
                "DiT mlp_ratio {} / class_dropout_prob {} out of range",
                self.mlp_ratio, self.class_dropout_prob
            ));
        }
        Ok(())
    }
}

/// `x (1 + scale) + shift`, `shift` and `scale` `[N, D]` broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// LayerNorm over the last dimension without affine parameters, eps 1e-6.
fn layer_norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().unwrap();
    x.layer_norm([d], None::<&Tensor>, None::<&Tensor>, LN_EPS, true)
}

/// The reference's initialisation of a Linear: Xavier-uniform weight, zero
/// bias (`_basic_init`).
fn xavier(fan_in: i64, fan_out: i64) -> nn::LinearConfig {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    nn::LinearConfig {
        ws_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    }
}

/// A Linear initialised to zero (adaLN-Zero and the final layer).
fn zero() -> nn::LinearConfig {
    nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    }
}

/// The reference's `TimestepEmbedder.timestep_embedding`: `[N]` timesteps
/// (fractional allowed) to `[N, dim]`, `cos(t f_i)` then `sin(t f_i)`,
/// `f_i = exp(−ln(max_period) i / half)`, in float32 as there.
pub fn timestep_embedding(t: &Tensor, dim: i64, max_period: f64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * -max_period.ln() / half as f64).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// The reference's `get_2d_sincos_pos_embed(dim, grid)`: `[grid², dim]`
/// values, token `m = i grid + j` (row `i`, column `j`); the first half of
/// the width encodes the column `j`, the second the row `i` (the
/// reference's meshgrid puts `w` first), each as `sin(pos ω_d)` then
/// `cos(pos ω_d)`, `ω_d = 10000^(−d / (dim/4))`. Computed in float64 as
/// numpy does there.
pub fn sincos_pos_embed_2d(dim: i64, grid: i64) -> Vec<f64> {
    assert!(
        dim % 4 == 0,
        "the 2D sin-cos embedding needs a width divisible by 4"
    );
    let quarter = (dim / 4) as usize;
    let omega: Vec<f64> = (0..quarter)
        .map(|d| 1.0 / 10000f64.powf(d as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity((grid * grid * dim) as usize);
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j as f64, i as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin()));
                out.extend(omega.iter().map(|w| (pos * w).cos()));
            }
        }
    }
    out
}

/// One adaLN-Zero block (`DiTBlock`).
#[derive(Debug)]
struct Block {
    qkv: nn::Linear,
    proj: nn::Linear,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ada: nn::Linear,
    heads: i64,
}

/// A second handle on a Linear's tensors (the same storage).
fn share(l: &nn::Linear) -> nn::Linear {
    nn::Linear {
        ws: l.ws.shallow_clone(),
        bs: l.bs.as_ref().map(Tensor::shallow_clone),
    }
}

impl Block {
    /// A second handle on the block's parameters (the same storage), for a
    /// recomputation that outlives the borrow of the network.
    fn share(&self) -> Block {
        Block {
            qkv: share(&self.qkv),
            proj: share(&self.proj),
            fc1: share(&self.fc1),
            fc2: share(&self.fc2),
            ada: share(&self.ada),
            heads: self.heads,
        }
    }

    fn new(p: &nn::Path, spec: &DitSpec) -> Self {
        let (d, m) = (spec.hidden, spec.mlp_hidden());
        let attn = p / "attn";
        let mlp = p / "mlp";
        Block {
            qkv: nn::linear(&attn / "qkv", d, 3 * d, xavier(d, 3 * d)),
            proj: nn::linear(&attn / "proj", d, d, xavier(d, d)),
            fc1: nn::linear(&mlp / "fc1", d, m, xavier(d, m)),
            fc2: nn::linear(&mlp / "fc2", m, d, xavier(m, d)),
            ada: nn::linear(p / "adaLN_modulation" / 1, d, 6 * d, zero()),
            heads: spec.heads,
        }
    }

    /// timm's `Attention` (no q/k norm, no dropout): softmax(q kᵀ / √d_h) v
    /// per head, through libtorch's `scaled_dot_product_attention` (its
    /// default scale is timm's `head_dim^-0.5`; on the CPU it agrees with
    /// timm's explicit formula to 3e-7 of the output, float32 rounding, and
    /// on a GPU it picks the fused kernels).
    fn attention(&self, x: &Tensor) -> Tensor {
        let (b, t, c) = x.size3().unwrap();
        let hd = c / self.heads;
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, t, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false)
            .transpose(1, 2)
            .reshape([b, t, c])
            .apply(&self.proj)
    }

    fn forward(&self, x: &Tensor, c: &Tensor) -> Tensor {
        let m = c.silu().apply(&self.ada).chunk(6, 1);
        let h = self.attention(&modulate(&layer_norm(x), &m[0], &m[1]));
        let x = x + m[2].unsqueeze(1) * h;
        let h = modulate(&layer_norm(&x), &m[3], &m[4])
            .apply(&self.fc1)
            .gelu("tanh")
            .apply(&self.fc2);
        &x + m[5].unsqueeze(1) * h
    }
}

/// The DiT network (see the module docs).
#[derive(Debug)]
pub struct Dit {
    spec: DitSpec,
    patch_embed: nn::Conv2D,
    pos_embed: Tensor,
    t_mlp: [nn::Linear; 2],
    embedding_table: Tensor,
    blocks: Vec<Block>,
    final_ada: nn::Linear,
    final_linear: nn::Linear,
    /// Recompute the blocks in the backward pass ([`Dit::set_recompute`]).
    recompute: Option<Checkpointing>,
}

/// How the blocks are recomputed: the queue the engine drains, and whether
/// the forward pass ran under bf16 autocast (the recomputation must too).
#[derive(Clone)]
struct Checkpointing {
    queue: Recompute,
    bf16: bool,
}

impl std::fmt::Debug for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpointing(bf16: {})", self.bf16)
    }
}

impl Dit {
    /// A DiT under `p` (the root of a store for the reference's names),
    /// initialised as the reference's `initialize_weights` does (Xavier
    /// Linears, the patch embedding as a Linear, N(0, 0.02) class table and
    /// timestep MLP weights, zero adaLN modulations and final Linear; draws
    /// from libtorch's generator), `pos_embed` set to its fixed values.
    /// Panics on an inconsistent spec (heads not dividing hidden, patch not
    /// dividing input_size, …).
    pub fn new(p: &nn::Path, spec: &DitSpec) -> Self {
        if let Err(e) = spec.check() {
            panic!("{e}");
        }
        let d = spec.hidden;
        let fan_in = spec.in_channels * spec.patch * spec.patch;
        let bound = (6.0 / (fan_in + d) as f64).sqrt();
        let patch_embed = nn::conv2d(
            p / "x_embedder" / "proj",
            spec.in_channels,
            d,
            spec.patch,
            nn::ConvConfig {
                stride: spec.patch,
                ws_init: nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        );
        let pos_embed = p.zeros_no_train("pos_embed", &[1, spec.tokens(), d]);
        let values = sincos_pos_embed_2d(d, spec.grid());
        tch::no_grad(|| {
            let fixed = Tensor::from_slice(&values)
                .to_kind(Kind::Float)
                .view([1, spec.tokens(), d])
                .to_device(pos_embed.device());
            pos_embed.shallow_clone().copy_(&fixed);
        });
        let small = || nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let t = p / "t_embedder" / "mlp";
        let t_mlp = [
            nn::linear(&t / 0, FREQUENCY_EMBEDDING, d, small()),
            nn::linear(&t / 2, d, d, small()),
        ];
        let rows = spec.classes + i64::from(spec.has_null_class());
        let embedding_table = (p / "y_embedder" / "embedding_table").var(
            "weight",
            &[rows, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let blocks = (0..spec.depth)
            .map(|i| Block::new(&(p / "blocks" / i), spec))
            .collect();
        let f = p / "final_layer";
        let out = spec.patch * spec.patch * spec.out_channels();
        Dit {
            spec: spec.clone(),
            patch_embed,
            pos_embed,
            t_mlp,
            embedding_table,
            blocks,
            final_ada: nn::linear(&f / "adaLN_modulation" / 1, d, 2 * d, zero()),
            final_linear: nn::linear(&f / "linear", d, out, zero()),
            recompute: None,
        }
    }

    /// Activation checkpointing of the blocks ([`super::recompute`]):
    /// while an engine has attached `queue`, a forward pass in grad mode
    /// keeps only each block's input and the engine's backward pass
    /// recomputes the blocks (under bf16 autocast when `bf16`, as the
    /// forward pass ran). `None`: every activation is kept.
    pub fn set_recompute(&mut self, queue: Option<Recompute>, bf16: bool) {
        self.recompute = queue.map(|queue| Checkpointing { queue, bf16 });
    }

    pub fn spec(&self) -> &DitSpec {
        &self.spec
    }

    /// The conditioning vector `c = t_embedder(t) + y_embedder(y)` `[N, D]`,
    /// the classes of the rows `drop` marks replaced by the null class.
    fn condition(&self, t: &Tensor, y: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let temb = timestep_embedding(t, FREQUENCY_EMBEDDING, 10000.0)
            .apply(&self.t_mlp[0])
            .silu()
            .apply(&self.t_mlp[1]);
        let y = match drop {
            None => y.shallow_clone(),
            Some(drop) => {
                assert!(
                    self.spec.has_null_class(),
                    "a DiT without a null class (class_dropout_prob 0) cannot drop classes"
                );
                let null = Tensor::full_like(y, self.spec.classes);
                null.where_self(&drop.to_kind(Kind::Bool), y)
            }
        };
        temb + Tensor::embedding(&self.embedding_table, &y, -1, false, false)
    }

    /// `[N, T, p² C_out]` to `[N, C_out, H, W]` (the reference's `unpatchify`).
    fn unpatchify(&self, x: &Tensor) -> Tensor {
        let (n, tokens, _) = x.size3().unwrap();
        let (c, p) = (self.spec.out_channels(), self.spec.patch);
        let h = (tokens as f64).sqrt().round() as i64;
        assert_eq!(h * h, tokens, "unpatchify needs a square grid of tokens");
        x.reshape([n, h, h, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([n, c, h * p, h * p])
    }

    /// The prediction `[N, C_out, H, W]` for latents `x` `[N, C, H, W]`
    /// (`H = W = input_size`), timesteps `t` `[N]` (float, fractional
    /// allowed) and classes `y` `[N]` (int64, in `0..classes`; `classes` is
    /// the null class). `drop`: `[N]` booleans (or 0/1), the rows whose
    /// class is replaced by the null class: the reference's `token_drop`,
    /// whose random draws in train mode the caller makes here. With
    /// `learn_sigma` the first `C` channels are the noise, the rest the
    /// variance interpolation.
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let x = x.apply(&self.patch_embed).flatten(2, -1).transpose(1, 2) + &self.pos_embed;
        let c = self.condition(t, y, drop);
        let deferring = self.recompute.as_ref().filter(|r| r.queue.is_attached());
        let (x, c) = match deferring {
            Some(r) if x.requires_grad() => self.trunk_deferred(r, x, c),
            _ => {
                let mut x = x;
                for block in &self.blocks {
                    x = block.forward(&x, &c);
                }
                (x, c)
            }
        };
        let m = c.silu().apply(&self.final_ada).chunk(2, 1);
        let x = modulate(&layer_norm(&x), &m[0], &m[1]).apply(&self.final_linear);
        self.unpatchify(&x)
    }

    /// The blocks on `x` and `c` (the embedded tokens and the conditioning,
    /// with their graph) without keeping their activations: they run from
    /// leaves cut from `x` and `c`, the output and the conditioning come
    /// back as leaves for the final layer, and a [`Deferred`] that
    /// recomputes the blocks is queued on `r` (see [`super::recompute`]).
    fn trunk_deferred(&self, r: &Checkpointing, x: Tensor, c: Tensor) -> (Tensor, Tensor) {
        let c_leaf = recompute::leaf(&c);
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut h = x.detach();
        tch::no_grad(|| {
            for block in &self.blocks {
                let next = block.forward(&h, &c_leaf);
                inputs.push(std::mem::replace(&mut h, next));
            }
        });
        let out_leaf = recompute::leaf(&h);
        let blocks: Vec<Block> = self.blocks.iter().map(Block::share).collect();
        let (bf16, c_kept) = (r.bf16, c_leaf.detach());
        let device = x.device();
        let backward = move |grads: Vec<Tensor>, params: &[Tensor]| {
            recompute_blocks(blocks, inputs, (x, c, c_kept), grads, params, bf16, device)
        };
        r.queue.defer(Deferred {
            leaves: vec![out_leaf.shallow_clone(), c_leaf.shallow_clone()],
            backward: Box::new(backward),
        });
        (out_leaf, c_leaf)
    }

    /// The reference's `forward_with_cfg`: classifier-free guidance in one
    /// batch. `x`, `t`, `y` have an even `N`; only the first half of `x` is
    /// used (doubled), `y` holds the classes of the first half then (as a
    /// caller of the reference passes) the null class for the second. The
    /// output's first [`DitSpec::guided_channels`] channels of both halves
    /// become `uncond + scale (cond − uncond)`; the remaining channels are
    /// the plain predictions. Guiding exactly 3 channels is the reference's
    /// choice for its 4-channel latents, kept here as it is.
    pub fn forward_with_cfg(&self, x: &Tensor, t: &Tensor, y: &Tensor, scale: f64) -> Tensor {
        let n = x.size()[0];
        assert!(n % 2 == 0, "forward_with_cfg needs an even batch, not {n}");
        let half = x.narrow(0, 0, n / 2);
        let combined = Tensor::cat(&[&half, &half], 0);
        let out = self.forward(&combined, t, y, None);
        let (channels, guided) = (out.size()[1], self.spec.guided_channels());
        let eps = out.narrow(1, 0, guided);
        let rest = out.narrow(1, guided, channels - guided);
        let cond = eps.narrow(0, 0, n / 2);
        let uncond = eps.narrow(0, n / 2, n / 2);
        let half_eps = &uncond + (&cond - &uncond) * scale;
        let eps = Tensor::cat(&[&half_eps, &half_eps], 0);
        Tensor::cat(&[eps, rest], 1)
    }
}

/// The backward pass of a deferred trunk: `grads` are the loss's gradients
/// of the trunk's output and of the conditioning leaf (from the final
/// layer); each block, last first, is recomputed from its kept input with
/// a graph and back-propagated (its parameters' gradients summed into the
/// result, its input's carried down, the conditioning's summed); last, the
/// two gradients reach the embeddings through the graph `x` and `c` kept.
fn recompute_blocks(
    blocks: Vec<Block>,
    inputs: Vec<Tensor>,
    (x, c, c_kept): (Tensor, Tensor, Tensor),
    grads: Vec<Tensor>,
    params: &[Tensor],
    bf16: bool,
    device: Device,
) -> Vec<Tensor> {
    let _autocast = bf16.then(|| Autocast::bf16(device).expect("checked by Model::set_compute"));
    let [g_x, g_c]: [Tensor; 2] = grads.try_into().expect("a trunk has two leaves");
    // A leaf the loss did not reach has no gradient: zero (the other one had).
    let mut g_x = if g_x.defined() { g_x } else { x.zeros_like() };
    let mut g_c = if g_c.defined() {
        g_c
    } else {
        c_kept.zeros_like()
    };
    let mut out: Vec<Tensor> = params.iter().map(|_| Tensor::new()).collect();
    for (block, input) in blocks.iter().zip(inputs).rev() {
        let (h, cl) = (recompute::leaf(&input), recompute::leaf(&c_kept));
        let y = block.forward(&h, &cl);
        let mut g = recompute::vjp(&y, &g_x, params, &[&h, &cl]);
        let g_cl = g.pop().unwrap();
        g_x = g.pop().unwrap();
        if g_cl.defined() {
            g_c = tch::no_grad(|| &g_c + g_cl);
        }
        recompute::add_into(&mut out, g);
    }
    let scalar = (x * g_x).sum(Kind::Float) + (c * g_c).sum(Kind::Float);
    recompute::add_into(
        &mut out,
        Tensor::run_backward(&[scalar], params, false, false),
    );
    out
}
