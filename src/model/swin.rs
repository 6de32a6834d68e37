//! Swin Transformer: torchvision's `SwinTransformer` (`torchvision/models/
//! swin_transformer.py`, Liu et al., ICCV 2021; version 1) with its
//! parameter names, so that a torchvision `state_dict` saved as safetensors
//! loads unchanged:
//! - `features.0.0` (a convolution of kernel and stride `patch` to
//!   `embed_dim` channels) and `features.0.2` (LayerNorm) embed the patches,
//!   kept channels-last `[N, H, W, C]` from there on;
//! - stage `s` is `features.{2s+1}.{j}`, `depths[s]` blocks of width
//!   `embed_dim · 2^s` and `heads[s]` heads, each `norm1`, `attn` (`qkv`,
//!   `proj`, `relative_position_bias_table` `[(2w−1)², heads]` and the
//!   buffer `relative_position_index` `[w⁴]`), `norm2`, `mlp.0` / `mlp.3`
//!   (`dim → mlp_ratio · dim → dim`, exact GELU); odd blocks shift their
//!   windows by `w / 2` and mask attention across the wrapped edges (−100
//!   on the logits, torchvision's constant);
//! - between stages, `features.{2s+2}` patch merging: the 2 × 2
//!   neighbourhoods concatenated in torchvision's order (x₀₀, x₁₀, x₀₁, x₁₁),
//!   `norm` over 4C, `reduction` 4C → 2C without bias;
//! - `norm`, the mean over the positions, `head` (`→ classes`), the layer
//!   the released code replaces for its number of classes.
//!
//! Stochastic depth ("row" mode, torchvision's `StochasticDepth`): in
//! train mode each block's two residual branches are each kept per sample
//! with probability `1 − p_b` and scaled by `1 / (1 − p_b)`, where `p_b`
//! rises linearly from 0 at the first block to `stochastic_depth_prob` at
//! the last. The draws come from each row's key ([`RowKeys`]) when the
//! caller gives keys, so a row draws the same whichever rank holds it;
//! without keys, from libtorch's generator (a single process's own pass).
//! Eval mode draws nothing.
//!
//! The image side must be a multiple of `patch · 2^(stages−1) · window`,
//! so that the patches, the mergings and the windows tile every stage
//! without padding (224 for the public sizes, [`SwinSpec::named`]); a
//! stage whose grid is one window does not shift, as torchvision.

use std::sync::{Arc, Mutex};

use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::zoo::Classifier;
use crate::rng::Rng;

/// The LayerNorms' epsilon (torchvision's `partial(nn.LayerNorm, eps=1e-5)`).
const LN_EPS: f64 = 1e-5;

/// The logit added across a shifted window's wrapped edges (torchvision's).
const MASKED: f32 = -100.0;

/// The names [`SwinSpec::named`] knows, torchvision's builders.
pub const NAMES: [&str; 3] = ["swin_t", "swin_s", "swin_b"];

/// A Swin's shape (torchvision's `SwinTransformer.__init__` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct SwinSpec {
    /// Patch side (`patch_size`).
    pub patch: i64,
    /// Width of the first stage (`embed_dim`); doubles at each stage.
    pub embed_dim: i64,
    /// Blocks per stage (`depths`).
    pub depths: Vec<i64>,
    /// Heads per stage (`num_heads`).
    pub heads: Vec<i64>,
    /// Window side (`window_size`).
    pub window: i64,
    /// MLP width over block width (`mlp_ratio`).
    pub mlp_ratio: f64,
    /// The last block's drop probability (`stochastic_depth_prob`).
    pub stochastic_depth_prob: f64,
    /// Image side.
    pub image_size: i64,
}

impl SwinSpec {
    /// One of torchvision's builders by name ([`NAMES`]), at 224 × 224.
    pub fn named(name: &str) -> Result<Self, String> {
        let (embed_dim, depths, heads, sd): (i64, &[i64], &[i64], f64) = match name {
            "swin_t" => (96, &[2, 2, 6, 2], &[3, 6, 12, 24], 0.2),
            "swin_s" => (96, &[2, 2, 18, 2], &[3, 6, 12, 24], 0.3),
            "swin_b" => (128, &[2, 2, 18, 2], &[4, 8, 16, 32], 0.5),
            _ => {
                return Err(format!(
                    "unknown Swin {name:?} (known: {})",
                    NAMES.join(", ")
                ));
            }
        };
        Ok(SwinSpec {
            patch: 4,
            embed_dim,
            depths: depths.to_vec(),
            heads: heads.to_vec(),
            window: 7,
            mlp_ratio: 4.0,
            stochastic_depth_prob: sd,
            image_size: 224,
        })
    }

    /// The builder's name when the shape is one of [`NAMES`] at 224 × 224,
    /// else the shape spelled out.
    pub fn name(&self) -> String {
        match NAMES
            .iter()
            .find(|n| SwinSpec::named(n).is_ok_and(|s| s == *self))
        {
            Some(name) => name.to_string(),
            None => format!(
                "swin(patch={}, embed_dim={}, depths={:?}, heads={:?}, window={}, \
                 mlp_ratio={}, stochastic_depth_prob={}, image={})",
                self.patch,
                self.embed_dim,
                self.depths,
                self.heads,
                self.window,
                self.mlp_ratio,
                self.stochastic_depth_prob,
                self.image_size
            ),
        }
    }

    /// The side the image must be a multiple of.
    pub fn tile(&self) -> i64 {
        self.patch * (1 << (self.depths.len() - 1)) * self.window
    }

    /// Width of stage `s`.
    fn dim(&self, s: usize) -> i64 {
        self.embed_dim << s
    }

    /// The width after the last stage (the head's input).
    pub fn features(&self) -> i64 {
        self.dim(self.depths.len() - 1)
    }

    fn mlp_hidden(&self, dim: i64) -> i64 {
        (dim as f64 * self.mlp_ratio) as i64
    }

    /// The blocks of all stages.
    pub fn blocks(&self) -> i64 {
        self.depths.iter().sum()
    }

    /// Block `b`'s drop probability: linear from 0 to
    /// `stochastic_depth_prob` over the blocks (torchvision's `sd_prob`).
    pub fn drop_prob(&self, b: i64) -> f64 {
        let last = self.blocks() - 1;
        if last == 0 {
            return 0.0;
        }
        self.stochastic_depth_prob * b as f64 / last as f64
    }

    /// Whether the shape is consistent; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        let mut fields = vec![
            ("patch", self.patch),
            ("embed_dim", self.embed_dim),
            ("window", self.window),
            ("image_size", self.image_size),
        ];
        fields.extend(self.depths.iter().map(|&d| ("depths", d)));
        fields.extend(self.heads.iter().map(|&h| ("heads", h)));
        super::check_positive("Swin", &fields)?;
        if self.depths.is_empty() || self.depths.len() != self.heads.len() || self.depths.len() > 8
        {
            return Err(format!(
                "Swin depths {:?} and heads {:?} must name the same 1 to 8 stages",
                self.depths, self.heads
            ));
        }
        for s in 0..self.depths.len() {
            super::check_heads("Swin", self.dim(s), self.heads[s])?;
        }
        if self.mlp_hidden(self.embed_dim) <= 0 {
            return Err(format!(
                "Swin mlp_ratio {} must be positive",
                self.mlp_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.stochastic_depth_prob) {
            return Err(format!(
                "Swin stochastic_depth_prob {}: use [0, 1)",
                self.stochastic_depth_prob
            ));
        }
        if self.image_size % self.tile() != 0 {
            return Err(format!(
                "the image side {} is not a multiple of {} (patch {} · 2^{} mergings · window {}): \
                 the Swin's patches, mergings and windows must tile it",
                self.image_size,
                self.tile(),
                self.patch,
                self.depths.len() - 1,
                self.window
            ));
        }
        Ok(())
    }
}

/// The keys of a train-mode pass's rows: its stochastic-depth draws come
/// from them ([`drop_scales`]). Set by [`crate::model::Model::forward_keyed`]
/// around one forward pass; shared by the model's layers.
#[derive(Clone, Default)]
pub struct RowKeys(Arc<Mutex<Option<Vec<u64>>>>);

impl RowKeys {
    pub fn set(&self, keys: Option<Vec<u64>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    fn get(&self) -> Option<Vec<u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The stochastic-depth scales of the rows keyed `keys` under `spec`
/// `[2 · blocks, N]` (float32): row `i` of draw `d` (block `d / 2`, its
/// attention branch when `d` is even, its MLP branch when odd) is
/// `1 / (1 − p)` when `uniform(key_i, d) ≥ p`, else 0; all 1 where `p` is 0.
pub fn drop_scales(spec: &SwinSpec, keys: &[u64]) -> Tensor {
    let draws = 2 * spec.blocks();
    let mut out = Vec::with_capacity(draws as usize * keys.len());
    for d in 0..draws {
        let p = spec.drop_prob(d / 2);
        out.extend(keys.iter().map(|&k| {
            if p == 0.0 {
                1.0
            } else if Rng::keyed(&[k, d as u64]).uniform() >= p {
                (1.0 / (1.0 - p)) as f32
            } else {
                0.0
            }
        }));
    }
    Tensor::from_slice(&out).view([draws, keys.len() as i64])
}

/// torchvision's `stochastic_depth(mode="row")` on libtorch's generator.
fn global_drop_scales(spec: &SwinSpec, n: i64, device: tch::Device) -> Tensor {
    let draws = 2 * spec.blocks();
    let p: Vec<f32> = (0..draws).map(|d| spec.drop_prob(d / 2) as f32).collect();
    let survival: Tensor = 1.0 - Tensor::from_slice(&p).to_device(device).unsqueeze(1);
    let keep = survival.expand([draws, n], false).bernoulli();
    keep / survival
}

/// A LayerNorm of `dim` with torchvision's epsilon.
fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps: LN_EPS,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], config)
}

/// torchvision's Swin Linear initialisation: N(0, 0.02) weight (its
/// truncation at ±2 is 100 standard deviations out), zero bias.
fn linear(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, fan_in, fan_out, config)
}

/// `relative_position_index` of a `w × w` window `[w⁴]`: for tokens
/// `i = (h_i, w_i)` and `j`, `(h_i − h_j + w − 1)(2w − 1) + (w_i − w_j + w − 1)`.
fn relative_position_index(w: i64) -> Vec<i64> {
    let n = w * w;
    let mut out = Vec::with_capacity((n * n) as usize);
    for i in 0..n {
        for j in 0..n {
            let (hi, wi, hj, wj) = (i / w, i % w, j / w, j % w);
            out.push((hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1));
        }
    }
    out
}

/// The attention mask of a shifted window pass over a `side × side` grid
/// `[windows, w², w²]`: 0 between tokens of one region of the rolled grid,
/// −100 across regions (torchvision's `attn_mask`).
fn shift_mask(side: i64, w: i64, shift: i64) -> Tensor {
    let region = |x: i64| {
        if x < side - w {
            0
        } else if x < side - shift {
            1
        } else {
            2
        }
    };
    let per_side = side / w;
    let n = w * w;
    let mut labels = Vec::with_capacity((side * side) as usize);
    for wh in 0..per_side {
        for ww in 0..per_side {
            for i in 0..n {
                let (h, x) = (wh * w + i / w, ww * w + i % w);
                labels.push(region(h) * 3 + region(x));
            }
        }
    }
    let mut mask = Vec::with_capacity(labels.len() * n as usize);
    for window in labels.chunks(n as usize) {
        for a in window {
            mask.extend(window.iter().map(|b| if a == b { 0.0 } else { MASKED }));
        }
    }
    Tensor::from_slice(&mask).view([per_side * per_side, n, n])
}

/// One block (`SwinTransformerBlock`).
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    bias_table: Tensor,
    bias_index: Tensor,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    window: i64,
    shift: i64,
    /// The shifted windows' mask (`None` when the block does not shift).
    mask: Option<Tensor>,
}

impl Block {
    fn new(p: &nn::Path, dim: i64, heads: i64, side: i64, shifted: bool, spec: &SwinSpec) -> Self {
        let w = spec.window;
        // torchvision: no shift when one window covers the grid.
        let shift = if shifted && side > w { w / 2 } else { 0 };
        let attn = p / "attn";
        let index = Tensor::from_slice(&relative_position_index(w)).to_device(p.device());
        let hidden = spec.mlp_hidden(dim);
        Block {
            norm1: layer_norm(p / "norm1", dim),
            qkv: linear(&attn / "qkv", dim, 3 * dim, true),
            proj: linear(&attn / "proj", dim, dim, true),
            bias_table: attn.var(
                "relative_position_bias_table",
                &[(2 * w - 1) * (2 * w - 1), heads],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            bias_index: attn.add("relative_position_index", index, false),
            norm2: layer_norm(p / "norm2", dim),
            fc1: linear(p / "mlp" / 0, dim, hidden, true),
            fc2: linear(p / "mlp" / 3, hidden, dim, true),
            heads,
            window: w,
            shift,
            mask: (shift > 0).then(|| shift_mask(side, w, shift).to_device(p.device())),
        }
    }

    /// `shifted_window_attention` on `x` `[B, H, W, C]`: roll, partition
    /// into windows, attention with the relative position bias (and the
    /// mask when shifted), merge, roll back.
    fn attention(&self, x: &Tensor) -> Tensor {
        let (b, h, w, c) = x.size4().unwrap();
        let ws = self.window;
        let n = ws * ws;
        let windows = (h / ws) * (w / ws);
        let hd = c / self.heads;
        let x = if self.shift > 0 {
            x.roll([-self.shift, -self.shift], [1, 2])
        } else {
            x.shallow_clone()
        };
        let x = x
            .view([b, h / ws, ws, w / ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b * windows, n, c]);
        let qkv = x
            .apply(&self.qkv)
            .reshape([b * windows, n, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * (hd as f64).powf(-0.5);
        let bias = self
            .bias_table
            .index_select(0, &self.bias_index)
            .view([n, n, -1])
            .permute([2, 0, 1])
            .contiguous()
            .unsqueeze(0);
        let mut attn = q.matmul(&k.transpose(-2, -1)) + bias;
        if let Some(mask) = &self.mask {
            attn = (attn.view([b, windows, self.heads, n, n]) + mask.unsqueeze(1).unsqueeze(0))
                .view([-1, self.heads, n, n]);
        }
        let x = attn
            .softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b * windows, n, c])
            .apply(&self.proj)
            .view([b, h / ws, w / ws, ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b, h, w, c]);
        if self.shift > 0 {
            x.roll([self.shift, self.shift], [1, 2])
        } else {
            x
        }
    }

    /// The block on `x` `[B, H, W, C]`; `scales` are its two branches'
    /// stochastic-depth scales `[2, B]` (train mode only).
    fn forward(&self, x: &Tensor, scales: Option<&Tensor>) -> Tensor {
        let branch = |y: Tensor, d: i64| match scales {
            Some(s) => y * s.get(d).view([-1, 1, 1, 1]),
            None => y,
        };
        let x = x + branch(self.attention(&x.apply(&self.norm1)), 0);
        let y = x
            .apply(&self.norm2)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2);
        &x + branch(y, 1)
    }
}

/// Patch merging between stages (`PatchMerging`).
#[derive(Debug)]
struct Merge {
    norm: nn::LayerNorm,
    reduction: nn::Linear,
}

impl Merge {
    fn forward(&self, x: &Tensor) -> Tensor {
        let even = |t: &Tensor, dim: i64, start: i64| t.slice(dim, start, None, 2);
        let parts = [(0, 0), (1, 0), (0, 1), (1, 1)].map(|(dh, dw)| even(&even(x, 1, dh), 2, dw));
        Tensor::cat(&parts, -1)
            .apply(&self.norm)
            .apply(&self.reduction)
    }
}

/// The Swin classifier (see the module docs).
#[derive(Debug)]
pub struct Swin {
    spec: SwinSpec,
    embed: nn::Conv2D,
    embed_norm: nn::LayerNorm,
    stages: Vec<Vec<Block>>,
    merges: Vec<Merge>,
    norm: nn::LayerNorm,
    head: nn::Linear,
    keys: RowKeys,
}

impl std::fmt::Debug for RowKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowKeys")
    }
}

impl Swin {
    /// A Swin under `p` for `channels`-channel images and `classes`
    /// classes, initialised as torchvision does (PyTorch's default
    /// convolution, N(0, 0.02) Linear weights and bias tables, zero biases,
    /// unit LayerNorms); its stochastic depth draws from `keys` when set.
    /// Panics on an inconsistent spec ([`SwinSpec::check`]).
    pub fn new(p: &nn::Path, spec: &SwinSpec, channels: i64, classes: i64, keys: &RowKeys) -> Self {
        if let Err(e) = spec.check() {
            panic!("{e}");
        }
        let features = p / "features";
        let embed = nn::conv2d(
            &features / 0 / 0,
            channels,
            spec.embed_dim,
            spec.patch,
            nn::ConvConfig {
                stride: spec.patch,
                ..Default::default()
            },
        );
        let embed_norm = layer_norm(&features / 0 / 2, spec.embed_dim);
        let mut stages = Vec::new();
        let mut merges = Vec::new();
        let mut side = spec.image_size / spec.patch;
        for (s, (&depth, &heads)) in spec.depths.iter().zip(&spec.heads).enumerate() {
            let dim = spec.dim(s);
            let stage = &features / (2 * s + 1);
            stages.push(
                (0..depth)
                    .map(|j| Block::new(&(&stage / j), dim, heads, side, j % 2 == 1, spec))
                    .collect(),
            );
            if s + 1 < spec.depths.len() {
                let merge = &features / (2 * s + 2);
                merges.push(Merge {
                    norm: layer_norm(&merge / "norm", 4 * dim),
                    reduction: linear(&merge / "reduction", 4 * dim, 2 * dim, false),
                });
                side /= 2;
            }
        }
        Swin {
            spec: spec.clone(),
            embed,
            embed_norm,
            stages,
            merges,
            norm: layer_norm(p / "norm", spec.features()),
            head: linear(p / "head", spec.features(), classes, true),
            keys: keys.clone(),
        }
    }

    pub fn spec(&self) -> &SwinSpec {
        &self.spec
    }

    /// The stochastic-depth scales of a train-mode pass over `n` rows on
    /// `device` `[2 · blocks, n]`, or `None` when nothing can drop.
    fn scales(&self, n: i64, device: tch::Device) -> Option<Tensor> {
        if self.spec.stochastic_depth_prob == 0.0 {
            return None;
        }
        Some(match self.keys.get() {
            Some(keys) => {
                assert_eq!(keys.len() as i64, n, "one stochastic-depth key per row");
                drop_scales(&self.spec, &keys).to_device(device)
            }
            None => global_drop_scales(&self.spec, n, device),
        })
    }
}

impl Classifier for Swin {
    /// The mean over the positions of the last LayerNorm's output `[N, C]`.
    fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (n, _, h, w) = xs.size4().unwrap();
        assert!(
            h == self.spec.image_size && w == self.spec.image_size,
            "the Swin takes {0}x{0} images, not {h}x{w}",
            self.spec.image_size
        );
        let scales = if train {
            self.scales(n, xs.device())
        } else {
            None
        };
        let mut x = xs
            .apply(&self.embed)
            .permute([0, 2, 3, 1])
            .apply(&self.embed_norm);
        let mut d = 0;
        for (s, stage) in self.stages.iter().enumerate() {
            for block in stage {
                let own = scales.as_ref().map(|t| t.narrow(0, d, 2));
                x = block.forward(&x, own.as_ref());
                d += 2;
            }
            if let Some(merge) = self.merges.get(s) {
                x = merge.forward(&x);
            }
        }
        x.apply(&self.norm)
            .mean_dim([1, 2].as_slice(), false, Kind::Float)
            .to_kind(x.kind())
    }
}

impl ModuleT for Swin {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head.forward(&self.features_t(xs, train))
    }
}

/// The parameters of a Swin of this shape, as `sum(p.numel() for p in
/// model.parameters())` counts them (the index buffers left out).
pub fn parameter_count(spec: &SwinSpec, channels: i64, classes: i64) -> i64 {
    let w = spec.window;
    let mut total = channels * spec.patch * spec.patch * spec.embed_dim + 3 * spec.embed_dim;
    for (s, (&depth, &heads)) in spec.depths.iter().zip(&spec.heads).enumerate() {
        let d = spec.dim(s);
        let hidden = spec.mlp_hidden(d);
        let block = 4 * d
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + (2 * w - 1) * (2 * w - 1) * heads
            + (d * hidden + hidden)
            + (hidden * d + d);
        total += depth * block;
        if s + 1 < spec.depths.len() {
            total += 2 * 4 * d + 4 * d * 2 * d;
        }
    }
    total + 2 * spec.features() + spec.features() * classes + classes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_torchvision_corners() {
        // torchvision's index for w = 2: [[4,3,1,0],[5,4,2,1],[7,6,4,3],[8,7,5,4]].
        assert_eq!(
            relative_position_index(2),
            vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
    }

    #[test]
    fn swin_t_counts_torchvision_parameters() {
        // torchvision's Swin_T_Weights meta "num_params".
        let spec = SwinSpec::named("swin_t").unwrap();
        assert_eq!(parameter_count(&spec, 3, 1000), 28_288_354);
        let spec = SwinSpec::named("swin_s").unwrap();
        assert_eq!(parameter_count(&spec, 3, 1000), 49_606_258);
    }

    #[test]
    fn drops_follow_the_keys_and_the_linear_rate() {
        let spec = SwinSpec::named("swin_t").unwrap();
        let keys: Vec<u64> = (0..4000).collect();
        let s = drop_scales(&spec, &keys);
        assert_eq!(s.size(), [24, 4000]);
        // The first block never drops; the last drops 20%.
        assert_eq!(s.get(0).min().double_value(&[]), 1.0);
        let kept = s.get(23).gt(0.0).to_kind(Kind::Float).mean(Kind::Float);
        assert!((kept.double_value(&[]) - 0.8).abs() < 0.03);
        // A row's draws do not depend on the other rows.
        let alone = drop_scales(&spec, &keys[7..8]);
        assert!(alone.equal(&s.narrow(1, 7, 1)));
    }
}
