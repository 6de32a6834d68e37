//! The Stable Diffusion VAE (`AutoencoderKL`) that DiT's latents come from,
//! written from diffusers' `AutoencoderKL` (`models/autoencoders/
//! autoencoder_kl.py`, `vae.py`'s `Encoder` / `Decoder`, `resnet.py`'s
//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `unet_2d_blocks.py`'s
//! `UNetMidBlock2D`, `attention_processor.py`'s `Attention`), with diffusers'
//! parameter names, so the public `stabilityai/sd-vae-ft-ema` and
//! `sd-vae-ft-mse` weights load once saved as safetensors ([`EXPORT_HINT`]).
//!
//! The network, for `block_out = [c_0, …, c_{L−1}]`, `layers` ResNet blocks
//! per level, GroupNorms of `groups` groups with eps 1e-6, SiLU:
//! - `encoder.conv_in` (3×3, `in_channels → c_0`); `encoder.down_blocks.{i}`:
//!   `layers` ResNet blocks to `c_i`, then (all but the last level)
//!   `downsamplers.0.conv`, a stride-2 3×3 convolution after padding the
//!   right and bottom by one (diffusers' `padding=0` Downsample2D);
//!   `encoder.mid_block`: ResNet block, attention, ResNet block at
//!   `c_{L−1}`; `encoder.conv_norm_out`, SiLU, `encoder.conv_out` to
//!   `2 latent_channels` (mean and log-variance); then `quant_conv` (1×1).
//! - `post_quant_conv` (1×1); `decoder.conv_in` (3×3, `latent → c_{L−1}`);
//!   `decoder.mid_block` as the encoder's; `decoder.up_blocks.{i}` over the
//!   reversed widths: `layers + 1` ResNet blocks to `c_{L−1−i}`, then (all
//!   but the last) `upsamplers.0.conv` after a nearest-neighbour 2×
//!   upsampling; `decoder.conv_norm_out`, SiLU, `decoder.conv_out` to
//!   `out_channels`.
//! - A ResNet block (`norm1`, `conv1`, `norm2`, `conv2`, and
//!   `conv_shortcut`, 1×1, where the width changes): `x + conv2(silu(norm2(
//!   conv1(silu(norm1(x))))))`, no time embedding, dropout 0.
//! - The mid-block attention (`group_norm`, `to_q`, `to_k`, `to_v`,
//!   `to_out.0`): one head over the `H W` positions at full width, scale
//!   `1/√C`, added to its input.
//!
//! The posterior is diagonal Gaussian: `mean, logvar = moments.chunk(2)`,
//! `logvar` clamped to [−30, 20], a latent `mean + exp(logvar / 2) ε`. DiT
//! trains on such draws times [`SdVae::scaling_factor`] (0.18215, the SD
//! VAE's) and decodes `z / 0.18215`.
//!
//! The VAE is frozen wherever sfron uses it (encoding data once, decoding
//! samples), so only its forward pass is needed; it runs under `no_grad`
//! at the caller's discretion.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tch::nn;
use tch::{Device, Tensor};

use super::weights;

/// The one-line export of the public weights on a machine with internet
/// access (diffusers' names, deprecated attention names converted).
pub const EXPORT_HINT: &str = "python -c \"from diffusers.models import AutoencoderKL; \
from safetensors.torch import save_file; \
save_file(AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').state_dict(), \
'sd-vae-ft-ema.safetensors')\"";

/// The GroupNorms' epsilon (diffusers' VAE: 1e-6).
const GN_EPS: f64 = 1e-6;

/// The posterior's log-variance clamp (`DiagonalGaussianDistribution`).
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// An `AutoencoderKL`'s shape (its config's keys, `DownEncoderBlock2D` /
/// `UpDecoderBlock2D` levels).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    /// `block_out_channels`: the width of each level, finest first.
    pub block_out: Vec<i64>,
    /// `layers_per_block` (the decoder has one more per level).
    pub layers_per_block: i64,
    pub latent_channels: i64,
    /// `norm_num_groups`; must divide every width.
    pub groups: i64,
    /// `scaling_factor`: latents are `z · scaling_factor` for the denoiser.
    pub scaling_factor: f64,
}

impl VaeSpec {
    /// `stabilityai/sd-vae-ft-ema` / `-mse`: widths 128, 256, 512, 512, two
    /// blocks per level, 4 latent channels, 32 groups, scaling 0.18215: a
    /// 256 × 256 image becomes a 32 × 32 × 4 latent.
    pub fn sd() -> Self {
        VaeSpec {
            in_channels: 3,
            out_channels: 3,
            block_out: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            groups: 32,
            scaling_factor: 0.18215,
        }
    }

    /// The factor from image side to latent side, `2^(levels − 1)`.
    pub fn downsampling(&self) -> i64 {
        1 << (self.block_out.len() - 1)
    }

    /// Whether the shape is consistent; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.block_out.is_empty() || self.block_out.iter().any(|&c| c <= 0) {
            return Err(format!(
                "VAE block_out {:?} needs positive widths",
                self.block_out
            ));
        }
        let positive = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("groups", self.groups),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("VAE {name} must be positive, not {v}"));
        }
        if let Some(c) = self.block_out.iter().find(|&&c| c % self.groups != 0) {
            return Err(format!(
                "VAE width {c} is not a multiple of groups {}",
                self.groups
            ));
        }
        if self.scaling_factor.is_nan() || self.scaling_factor <= 0.0 {
            return Err(format!(
                "VAE scaling_factor must be positive, not {}",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}

/// diffusers' current name of a parameter stored under the names older
/// VAE checkpoints use for the mid-block attention (`query`, `key`,
/// `value`, `proj_attn`; diffusers renames them on load,
/// `_convert_deprecated_attention_blocks`); other names unchanged.
pub fn current_name(name: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if !name.contains(".attentions.") {
        return name.to_string();
    }
    RENAMES
        .iter()
        .find(|(old, _)| name.contains(old))
        .map_or_else(|| name.to_string(), |(old, new)| name.replacen(old, new, 1))
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding,
            ..Default::default()
        },
    )
}

fn group_norm(p: nn::Path, groups: i64, c: i64) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        c,
        nn::GroupNormConfig {
            eps: GN_EPS,
            ..Default::default()
        },
    )
}

/// `ResnetBlock2D` without a time embedding.
#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    shortcut: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64, groups: i64) -> Self {
        ResBlock {
            norm1: group_norm(p / "norm1", groups, cin),
            conv1: conv(p / "conv1", cin, cout, 3, 1, 1),
            norm2: group_norm(p / "norm2", groups, cout),
            conv2: conv(p / "conv2", cout, cout, 3, 1, 1),
            shortcut: (cin != cout).then(|| conv(p / "conv_shortcut", cin, cout, 1, 1, 0)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.norm1).silu().apply(&self.conv1);
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        match &self.shortcut {
            Some(c) => x.apply(c) + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head spatial self-attention.
#[derive(Debug)]
struct Attention {
    norm: nn::GroupNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
}

impl Attention {
    fn new(p: &nn::Path, c: i64, groups: i64) -> Self {
        Attention {
            norm: group_norm(p / "group_norm", groups, c),
            q: nn::linear(p / "to_q", c, c, Default::default()),
            k: nn::linear(p / "to_k", c, c, Default::default()),
            v: nn::linear(p / "to_v", c, c, Default::default()),
            out: nn::linear(p / "to_out" / 0, c, c, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("NCHW");
        let n = x.apply(&self.norm).reshape([b, c, h * w]).transpose(1, 2); // [b, hw, c]
        let (q, k, v) = (n.apply(&self.q), n.apply(&self.k), n.apply(&self.v));
        let a = Tensor::scaled_dot_product_attention(
            &q.unsqueeze(1),
            &k.unsqueeze(1),
            &v.unsqueeze(1),
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .squeeze_dim(1)
        .apply(&self.out);
        x + a.transpose(1, 2).reshape([b, c, h, w])
    }
}

/// `UNetMidBlock2D` of the VAE: ResNet block, attention, ResNet block.
#[derive(Debug)]
struct Mid(ResBlock, Attention, ResBlock);

impl Mid {
    fn new(p: &nn::Path, c: i64, groups: i64) -> Self {
        Mid(
            ResBlock::new(&(p / "resnets" / 0), c, c, groups),
            Attention::new(&(p / "attentions" / 0), c, groups),
            ResBlock::new(&(p / "resnets" / 1), c, c, groups),
        )
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.2.forward(&self.1.forward(&self.0.forward(x)))
    }
}

#[derive(Debug)]
struct Level {
    resnets: Vec<ResBlock>,
    resample: Option<nn::Conv2D>,
}

impl Level {
    /// The levels under `p` (`down_blocks` or `up_blocks`) of the given
    /// widths in order, the first taking `widths[0]` channels in: the
    /// encoder's (`layers_per_block` blocks, a stride-2 unpadded
    /// `downsamplers.0.conv`) or the decoder's (one block more, an
    /// `upsamplers.0.conv` after the 2× upsampling); the last level does not
    /// resample.
    fn chain(p: &nn::Path, widths: &[i64], spec: &VaeSpec, decoder: bool) -> Vec<Level> {
        let blocks = spec.layers_per_block + i64::from(decoder);
        let mut cin = widths[0];
        let mut levels = Vec::with_capacity(widths.len());
        for (i, &c) in widths.iter().enumerate() {
            let b = p / i as i64;
            let resnets = (0..blocks)
                .map(|j| {
                    ResBlock::new(
                        &(&b / "resnets" / j),
                        if j == 0 { cin } else { c },
                        c,
                        spec.groups,
                    )
                })
                .collect();
            cin = c;
            let resample = (i + 1 < widths.len()).then(|| {
                if decoder {
                    conv(&b / "upsamplers" / 0 / "conv", c, c, 3, 1, 1)
                } else {
                    conv(&b / "downsamplers" / 0 / "conv", c, c, 3, 2, 0)
                }
            });
            levels.push(Level { resnets, resample });
        }
        levels
    }
}

/// The VAE (see the module docs).
#[derive(Debug)]
pub struct SdVae {
    spec: VaeSpec,
    enc_in: nn::Conv2D,
    down: Vec<Level>,
    enc_mid: Mid,
    enc_norm: nn::GroupNorm,
    enc_out: nn::Conv2D,
    quant: nn::Conv2D,
    post_quant: nn::Conv2D,
    dec_in: nn::Conv2D,
    dec_mid: Mid,
    up: Vec<Level>,
    dec_norm: nn::GroupNorm,
    dec_out: nn::Conv2D,
}

impl SdVae {
    /// The network under `p` (the root of a store for diffusers' names),
    /// with libtorch's default initialisation: load weights before use.
    /// Panics on an inconsistent spec ([`VaeSpec::check`]).
    pub fn new(p: &nn::Path, spec: &VaeSpec) -> Self {
        if let Err(e) = spec.check() {
            panic!("{e}");
        }
        let g = spec.groups;
        let widths = &spec.block_out;
        let last = *widths.last().unwrap();
        let e = p / "encoder";
        let d = p / "decoder";
        let down = Level::chain(&(&e / "down_blocks"), widths, spec, false);
        let reversed: Vec<i64> = widths.iter().rev().copied().collect();
        let up = Level::chain(&(&d / "up_blocks"), &reversed, spec, true);
        let l = spec.latent_channels;
        SdVae {
            spec: spec.clone(),
            enc_in: conv(&e / "conv_in", spec.in_channels, widths[0], 3, 1, 1),
            down,
            enc_mid: Mid::new(&(&e / "mid_block"), last, g),
            enc_norm: group_norm(&e / "conv_norm_out", g, last),
            enc_out: conv(&e / "conv_out", last, 2 * l, 3, 1, 1),
            quant: conv(p / "quant_conv", 2 * l, 2 * l, 1, 1, 0),
            post_quant: conv(p / "post_quant_conv", l, l, 1, 1, 0),
            dec_in: conv(&d / "conv_in", l, last, 3, 1, 1),
            dec_mid: Mid::new(&(&d / "mid_block"), last, g),
            up,
            dec_norm: group_norm(&d / "conv_norm_out", g, widths[0]),
            dec_out: conv(&d / "conv_out", widths[0], spec.out_channels, 3, 1, 1),
        }
    }

    pub fn spec(&self) -> &VaeSpec {
        &self.spec
    }

    /// The posterior's moments `[N, 2 latent, H/f, W/f]` (mean, then
    /// log-variance, before the clamp) of images `[N, in, H, W]` in
    /// [−1, 1], `H` and `W` multiples of [`VaeSpec::downsampling`]
    /// (`quant_conv(encoder(x))`).
    pub fn encode_moments(&self, x: &Tensor) -> Tensor {
        let mut h = x.apply(&self.enc_in);
        for level in &self.down {
            for r in &level.resnets {
                h = r.forward(&h);
            }
            if let Some(c) = &level.resample {
                h = h.constant_pad_nd([0, 1, 0, 1]).apply(c);
            }
        }
        self.enc_mid
            .forward(&h)
            .apply(&self.enc_norm)
            .silu()
            .apply(&self.enc_out)
            .apply(&self.quant)
    }

    /// A draw of the posterior, unscaled: `mean + exp(clamp(logvar) / 2) ε`
    /// for moments `[N, 2L, h, w]` and noise `ε` `[N, L, h, w]`; `ε = 0`
    /// gives the mean (the posterior's mode).
    pub fn latent(moments: &Tensor, noise: &Tensor) -> Tensor {
        let m = moments.chunk(2, 1);
        let std = (m[1].clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1) * 0.5).exp();
        &m[0] + std * noise
    }

    /// Images `[N, out, h f, w f]` (in about [−1, 1]) from unscaled
    /// latents `z` `[N, L, h, w]` (`decoder(post_quant_conv(z))`).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let mut h = self
            .dec_mid
            .forward(&z.apply(&self.post_quant).apply(&self.dec_in));
        for level in &self.up {
            for r in &level.resnets {
                h = r.forward(&h);
            }
            if let Some(c) = &level.resample {
                let (_, _, hh, ww) = h.size4().unwrap();
                h = h
                    .upsample_nearest2d([2 * hh, 2 * ww], Some(2.0), Some(2.0))
                    .apply(c);
            }
        }
        h.apply(&self.dec_norm).silu().apply(&self.dec_out)
    }

    /// Images from the denoiser's latents (`z · scaling_factor`), as the
    /// DiT reference's `vae.decode(samples / 0.18215).sample`.
    pub fn decode_scaled(&self, z: &Tensor) -> Tensor {
        self.decode(&(z / self.spec.scaling_factor))
    }
}

/// The VAE with its weights, frozen.
pub struct Vae {
    vs: nn::VarStore,
    pub net: SdVae,
    /// The weights file's [`weights::identify`] digest.
    pub digest: String,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vae({:?} on {:?})",
            self.net.spec.block_out,
            self.vs.device()
        )
    }
}

impl Vae {
    /// Loads an `AutoencoderKL` of shape `spec` from the safetensors file at
    /// `path` onto `device`, diffusers' names (the deprecated attention
    /// names too, [`current_name`]). Errors name the file and every missing,
    /// unexpected or mis-shaped tensor; a missing file gives the export line.
    pub fn load(path: &Path, spec: &VaeSpec, device: Device) -> Result<Self> {
        Self::load_verified(path, spec, device, |_| Ok(()))
    }

    /// [`Vae::load`], with `verify` given the file's [`weights::identify`]
    /// digest before the tensors are read (the file is read once).
    pub fn load_verified(
        path: &Path,
        spec: &VaeSpec,
        device: Device,
        verify: impl FnOnce(&str) -> Result<()>,
    ) -> Result<Self> {
        spec.check()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if !path.is_file() {
            bail!(
                "{}: no such file (the VAE weights; {EXPORT_HINT})",
                path.display()
            );
        }
        let bytes = weights::read(path)?;
        let digest = weights::identify(&bytes, path)?;
        verify(&digest)?;
        let (tensors, _) = weights::parse(&bytes, path).with_context(|| {
            format!(
                "{} is not an AutoencoderKL state_dict as safetensors ({EXPORT_HINT})",
                path.display()
            )
        })?;
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| (current_name(&n), t))
            .collect();
        let mut vs = nn::VarStore::new(device);
        let net = SdVae::new(&vs.root(), spec);
        weights::copy_into(&vs, &tensors, path)?;
        vs.freeze();
        Ok(Vae { vs, net, digest })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}
