//! The class-conditional DDPM UNet of the SFR-on authors' release
//! (`DDPM/models/diffusion.py`, `Conditional_Model`), itself Ho et al.'s
//! UNet as ported by `pesser/pytorch_diffusion` with a class embedding and
//! a learned null class for classifier-free guidance.
//!
//! Parameter names are the release's `state_dict` keys (without
//! `DataParallel`'s `module.`), so a converted `ckpt.pth` loads unchanged:
//! `temb.dense.{0,1}`, `classes_emb`, `null_classes_emb`, `cemb.dense.{0,1}`,
//! `conv_in`, `down.{level}.block.{i}` / `.attn.{i}` / `.downsample.conv`,
//! `mid.block_1` / `attn_1` / `block_2`, `up.{level}.block.{i}` / `.attn.{i}`
//! / `.upsample.conv`, `norm_out`, `conv_out`.
//!
//! Layout, for `ch_mult` of L levels and `num_res_blocks` = B:
//! - the time embedding is the sinusoidal embedding of `t` (width `ch`)
//!   through Linear → swish → Linear to `4 ch`; the class embedding is
//!   `classes_emb[c]` (or `null_classes_emb` where the condition is dropped)
//!   through the same shape of MLP; every residual block adds
//!   `Linear(swish([temb, cemb]))` after its first conv;
//! - down: per level B residual blocks (`ch · ch_mult[level]` channels), each
//!   followed by self-attention at the resolutions listed, and a stride-2
//!   conv (right/bottom zero padding) except after the last level;
//! - middle: block, attention, block;
//! - up: per level B + 1 blocks on the concatenation with the matching
//!   down activation, attention as down, nearest ×2 + conv except at level 0;
//! - GroupNorm(32, eps 1e-6) → swish → conv to the image channels.
//!
//! Dropout (in each residual block, after the second norm) is the only
//! difference between train and eval mode. In train mode its masks are
//! drawn per sample from that sample's key ([`Dropout::Keyed`]), so a sample
//! gets the same mask whichever rank and batch it is in: N ranks train as
//! one rank does.

use std::cell::Cell;

use tch::nn;
use tch::{Kind, Tensor};

use crate::rng::Rng;

/// The UNet's shape (the release's `model` config keys).
#[derive(Clone, Debug, PartialEq)]
pub struct UnetSpec {
    /// Base channels (`ch`, released 128).
    pub ch: i64,
    /// Channel multiplier per level (`ch_mult`, released [1, 2, 2, 2]).
    pub ch_mult: Vec<i64>,
    /// Residual blocks per level on the way down (`num_res_blocks`, 2).
    pub num_res_blocks: i64,
    /// Resolutions with self-attention (`attn_resolutions`, [16]).
    pub attn_resolutions: Vec<i64>,
    /// Dropout rate in the residual blocks (train mode; released 0.1).
    pub dropout: f64,
    /// Image side (`data.image_size`, 32).
    pub resolution: i64,
    /// Resample with convolutions (`resamp_with_conv`, true) or with
    /// average pooling / plain nearest upsampling.
    pub resamp_with_conv: bool,
    /// GroupNorm's groups in every normalisation (the release's
    /// `Normalize` has 32; fewer let a narrow UNet train on a CPU).
    pub groups: i64,
}

/// The release's GroupNorm groups.
pub const GROUPS: i64 = 32;

impl UnetSpec {
    /// The released CIFAR-10 UNet (`DDPM/configs/cifar10_*.yml`).
    pub fn released() -> Self {
        UnetSpec {
            ch: 128,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.1,
            resolution: 32,
            resamp_with_conv: true,
            groups: GROUPS,
        }
    }

    /// Why this shape cannot be built, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.ch < 1 || self.ch_mult.is_empty() || self.ch_mult.iter().any(|&m| m < 1) {
            return Err(format!(
                "ch = {} and ch_mult = {:?}: channels must be positive and ch_mult non-empty",
                self.ch, self.ch_mult
            ));
        }
        if self.groups < 1
            || self
                .ch_mult
                .iter()
                .any(|m| (self.ch * m) % self.groups != 0)
        {
            return Err(format!(
                "ch = {} with ch_mult = {:?}: every level's channels must be a multiple of \
                 GroupNorm's {} groups",
                self.ch, self.ch_mult, self.groups
            ));
        }
        if self.num_res_blocks < 1 {
            return Err(format!(
                "num_res_blocks = {}: at least 1",
                self.num_res_blocks
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout = {}: use [0, 1)", self.dropout));
        }
        let downs = self.ch_mult.len() as u32 - 1;
        if self.resolution < 1 || self.resolution % (1 << downs) != 0 {
            return Err(format!(
                "resolution {} cannot be halved {downs} times ({} levels)",
                self.resolution,
                self.ch_mult.len()
            ));
        }
        Ok(())
    }

    /// A name that fixes the parameter shapes (dropout is left out).
    pub fn name(&self) -> String {
        let list = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join("-");
        format!(
            "ddpm_unet(ch={},mult={},blocks={},attn={},res={}{}{})",
            self.ch,
            list(&self.ch_mult),
            self.num_res_blocks,
            list(&self.attn_resolutions),
            self.resolution,
            if self.resamp_with_conv { "" } else { ",pool" },
            if self.groups == GROUPS {
                String::new()
            } else {
                format!(",groups={}", self.groups)
            }
        )
    }
}

/// How the residual blocks' dropout draws its masks in train mode.
pub enum Dropout<'a> {
    /// No dropout (eval mode, or a rate of 0).
    Off,
    /// libtorch's generator (a single process's own run).
    Global,
    /// Each sample's masks from its key, one stream per layer: the result
    /// does not depend on which samples share the batch.
    Keyed(&'a [u64]),
}

/// The conditioning of one forward pass.
pub struct Cond<'a> {
    /// Timesteps `[N]` (integers held as floats, as the release passes them).
    pub t: &'a Tensor,
    /// Classes `[N]` (int64).
    pub c: &'a Tensor,
    /// Where the class is kept (`[N]` bool); elsewhere the null class.
    /// `None`: every class kept.
    pub keep: Option<&'a Tensor>,
}

fn swish(x: &Tensor) -> Tensor {
    x * x.sigmoid()
}

fn group_norm(p: nn::Path, groups: i64, c: i64) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::group_norm(p, groups, c, config)
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, config)
}

/// The sinusoidal embedding of `t` `[N]` to `[N, dim]` (the release's
/// `get_timestep_embedding`, in float32 as there).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let step = (10000f64).ln() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * -step).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.sin(), args.cos()], 1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// Counts the dropout layers of one forward pass, so that each draws its
/// own per-sample stream.
struct DropCtx<'a> {
    rate: f64,
    mode: &'a Dropout<'a>,
    layer: Cell<u64>,
}

impl DropCtx<'_> {
    fn apply(&self, x: Tensor) -> Tensor {
        let layer = self.layer.get();
        self.layer.set(layer + 1);
        match self.mode {
            _ if self.rate == 0.0 => x,
            Dropout::Off => x,
            Dropout::Global => x.dropout(self.rate, true),
            Dropout::Keyed(keys) => {
                let size = x.size();
                assert_eq!(keys.len() as i64, size[0], "one dropout key per sample");
                let opts = (Kind::Float, x.device());
                let masks: Vec<Tensor> = keys
                    .iter()
                    .map(|&key| {
                        let seed = Rng::keyed(&[key, layer]).next_u64() >> 1;
                        tch::manual_seed(seed as i64);
                        Tensor::rand(&size[1..], opts).ge(self.rate)
                    })
                    .collect();
                let mask = Tensor::stack(&masks, 0).to_kind(x.kind());
                x * mask / (1.0 - self.rate)
            }
        }
    }
}

#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    temb_cemb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    nin_shortcut: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: &nn::Path, (cin, cout): (i64, i64), emb: i64, groups: i64) -> Self {
        ResBlock {
            norm1: group_norm(p / "norm1", groups, cin),
            conv1: conv(p / "conv1", cin, cout, 3, 1, 1),
            temb_cemb_proj: nn::linear(p / "temb_cemb_proj", emb, cout, Default::default()),
            norm2: group_norm(p / "norm2", groups, cout),
            conv2: conv(p / "conv2", cout, cout, 3, 1, 1),
            nin_shortcut: (cin != cout).then(|| conv(p / "nin_shortcut", cin, cout, 1, 1, 0)),
        }
    }

    /// `emb` is `swish([temb, cemb])`, shared by every block.
    fn forward(&self, x: &Tensor, emb: &Tensor, drop: &DropCtx) -> Tensor {
        let h = swish(&x.apply(&self.norm1)).apply(&self.conv1);
        let h = h + emb.apply(&self.temb_cemb_proj).unsqueeze(-1).unsqueeze(-1);
        let h = drop.apply(swish(&h.apply(&self.norm2))).apply(&self.conv2);
        match &self.nin_shortcut {
            Some(c) => x.apply(c) + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
}

impl AttnBlock {
    fn new(p: &nn::Path, c: i64, groups: i64) -> Self {
        AttnBlock {
            norm: group_norm(p / "norm", groups, c),
            q: conv(p / "q", c, c, 1, 1, 0),
            k: conv(p / "k", c, c, 1, 1, 0),
            v: conv(p / "v", c, c, 1, 1, 0),
            proj_out: conv(p / "proj_out", c, c, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("NCHW");
        let n = x.apply(&self.norm);
        let q = n.apply(&self.q).reshape([b, c, h * w]).permute([0, 2, 1]); // [b, hw, c]
        let k = n.apply(&self.k).reshape([b, c, h * w]); // [b, c, hw]
        let v = n.apply(&self.v).reshape([b, c, h * w]); // [b, c, hw]
        let weights = (q.bmm(&k) * (c as f64).powf(-0.5)).softmax(2, Kind::Float); // [b, hw_q, hw_k]
        let out = v.bmm(&weights.permute([0, 2, 1])).reshape([b, c, h, w]);
        x + out.apply(&self.proj_out)
    }
}

#[derive(Debug)]
enum Resample {
    Conv(nn::Conv2D),
    Plain,
}

#[derive(Debug)]
struct Level {
    blocks: Vec<ResBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<Resample>,
}

/// The network (see the module's description).
#[derive(Debug)]
pub struct Unet {
    ch: i64,
    resolution: i64,
    dropout: f64,
    temb: [nn::Linear; 2],
    classes_emb: nn::Embedding,
    null_classes_emb: Tensor,
    cemb: [nn::Linear; 2],
    conv_in: nn::Conv2D,
    down: Vec<Level>,
    mid: (ResBlock, AttnBlock, ResBlock),
    up: Vec<Level>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Unet {
    /// Builds the variables under `p` for images of `channels` channels and
    /// `classes` classes (`spec` already checked).
    pub fn new(p: &nn::Path, spec: &UnetSpec, channels: i64, classes: i64) -> Self {
        let (ch, g) = (spec.ch, spec.groups);
        let emb = 4 * ch;
        let linear = |p: nn::Path, i: i64, o: i64| nn::linear(p, i, o, Default::default());
        let levels = spec.ch_mult.len();
        let in_mult: Vec<i64> = std::iter::once(1)
            .chain(spec.ch_mult.iter().copied())
            .collect();
        let attn_at = |res: i64| spec.attn_resolutions.contains(&res);

        let mut res = spec.resolution;
        let mut down = Vec::new();
        let mut block_in = ch;
        for level in 0..levels {
            let lp = p / "down" / level;
            let block_out = ch * spec.ch_mult[level];
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for i in 0..spec.num_res_blocks {
                blocks.push(ResBlock::new(
                    &(&lp / "block" / i),
                    (block_in, block_out),
                    2 * emb,
                    g,
                ));
                block_in = block_out;
                if attn_at(res) {
                    attns.push(AttnBlock::new(&(&lp / "attn" / i), block_in, g));
                }
            }
            let resample = (level + 1 != levels).then(|| {
                res /= 2;
                if spec.resamp_with_conv {
                    Resample::Conv(conv(
                        &lp / "downsample" / "conv",
                        block_in,
                        block_in,
                        3,
                        2,
                        0,
                    ))
                } else {
                    Resample::Plain
                }
            });
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let mp = p / "mid";
        let mid = (
            ResBlock::new(&(&mp / "block_1"), (block_in, block_in), 2 * emb, g),
            AttnBlock::new(&(&mp / "attn_1"), block_in, g),
            ResBlock::new(&(&mp / "block_2"), (block_in, block_in), 2 * emb, g),
        );
        let mut up: Vec<Level> = Vec::new();
        for level in (0..levels).rev() {
            let lp = p / "up" / level;
            let block_out = ch * spec.ch_mult[level];
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for i in 0..=spec.num_res_blocks {
                let skip = if i == spec.num_res_blocks {
                    ch * in_mult[level]
                } else {
                    ch * spec.ch_mult[level]
                };
                blocks.push(ResBlock::new(
                    &(&lp / "block" / i),
                    (block_in + skip, block_out),
                    2 * emb,
                    g,
                ));
                block_in = block_out;
                if attn_at(res) {
                    attns.push(AttnBlock::new(&(&lp / "attn" / i), block_in, g));
                }
            }
            let resample = (level != 0).then(|| {
                res *= 2;
                if spec.resamp_with_conv {
                    Resample::Conv(conv(&lp / "upsample" / "conv", block_in, block_in, 3, 1, 1))
                } else {
                    Resample::Plain
                }
            });
            up.insert(
                0,
                Level {
                    blocks,
                    attns,
                    resample,
                },
            );
        }
        Unet {
            ch,
            resolution: spec.resolution,
            dropout: spec.dropout,
            temb: [
                linear(p / "temb" / "dense" / 0, ch, emb),
                linear(p / "temb" / "dense" / 1, emb, emb),
            ],
            classes_emb: nn::embedding(p / "classes_emb", classes, ch, Default::default()),
            null_classes_emb: p.var(
                "null_classes_emb",
                &[ch],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            cemb: [
                linear(p / "cemb" / "dense" / 0, ch, emb),
                linear(p / "cemb" / "dense" / 1, emb, emb),
            ],
            conv_in: conv(p / "conv_in", channels, ch, 3, 1, 1),
            down,
            mid,
            up,
            norm_out: group_norm(p / "norm_out", g, block_in),
            conv_out: conv(p / "conv_out", block_in, channels, 3, 1, 1),
        }
    }

    /// The image side the network was built for.
    pub fn resolution(&self) -> i64 {
        self.resolution
    }

    /// The predicted noise `[N, C, H, W]` of `x` `[N, C, H, W]` under `cond`;
    /// `dropout` applies in train mode only.
    pub fn forward(&self, x: &Tensor, cond: &Cond, dropout: &Dropout) -> Tensor {
        let drop = DropCtx {
            rate: self.dropout,
            mode: dropout,
            layer: Cell::new(0),
        };
        let temb = timestep_embedding(cond.t, self.ch).apply(&self.temb[0]);
        let temb = swish(&temb).apply(&self.temb[1]);
        let mut cemb = cond.c.apply(&self.classes_emb);
        if let Some(keep) = cond.keep {
            let null = self.null_classes_emb.unsqueeze(0).expand_as(&cemb);
            cemb = cemb.where_self(&keep.unsqueeze(1), &null);
        }
        let cemb = swish(&cemb.apply(&self.cemb[0])).apply(&self.cemb[1]);
        let emb = swish(&Tensor::cat(&[temb, cemb], 1));

        let mut hs = vec![x.apply(&self.conv_in)];
        for level in &self.down {
            for (i, block) in level.blocks.iter().enumerate() {
                let mut h = block.forward(hs.last().expect("non-empty"), &emb, &drop);
                if let Some(attn) = level.attns.get(i) {
                    h = attn.forward(&h);
                }
                hs.push(h);
            }
            match &level.resample {
                Some(Resample::Conv(c)) => {
                    let h = hs.last().expect("non-empty").constant_pad_nd([0, 1, 0, 1]);
                    hs.push(h.apply(c));
                }
                Some(Resample::Plain) => {
                    let h = hs.last().expect("non-empty");
                    hs.push(h.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>));
                }
                None => {}
            }
        }
        let h = hs.last().expect("non-empty").shallow_clone();
        let h = self.mid.0.forward(&h, &emb, &drop);
        let h = self.mid.1.forward(&h);
        let mut h = self.mid.2.forward(&h, &emb, &drop);
        for level in self.up.iter().rev() {
            for (i, block) in level.blocks.iter().enumerate() {
                let skip = hs.pop().expect("one skip per up block");
                h = block.forward(&Tensor::cat(&[h, skip], 1), &emb, &drop);
                if let Some(attn) = level.attns.get(i) {
                    h = attn.forward(&h);
                }
            }
            if let Some(resample) = &level.resample {
                let (_, _, hh, ww) = h.size4().expect("NCHW");
                h = h.upsample_nearest2d([2 * hh, 2 * ww], None, None);
                if let Resample::Conv(c) = resample {
                    h = h.apply(c);
                }
            }
        }
        swish(&h.apply(&self.norm_out)).apply(&self.conv_out)
    }
}
