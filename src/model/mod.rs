//! Models: the zoo ([`zoo`]) and weights in and out ([`weights`]).
//!
//! A [`Model`] owns a libtorch `VarStore` whose variable names are PyTorch's
//! `state_dict` keys (BatchNorm running statistics included), so a model's
//! state is exactly what `torch.save(model.state_dict())` would hold, minus
//! `num_batches_tracked`. Single-process code: reductions happen elsewhere.

pub mod convert;
pub mod dit;
pub mod inception;
pub mod layout;
pub mod norm;
pub mod recompute;
pub mod resnet9;
pub mod swin;
mod torch_pickle;
pub mod unet;
pub mod vae;
pub mod vit;
pub mod weights;
pub mod zoo;

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::config::raw::Precision;

pub use layout::Compute;
pub use weights::WeightsError;
pub use zoo::{Arch, Task};
use zoo::{Denoiser, Net};

/// The first of a shape's `fields` that is not positive, as an error naming
/// `what` and the field (the shapes' `check`s).
pub(crate) fn check_positive(what: &str, fields: &[(&str, i64)]) -> Result<(), String> {
    match fields.iter().find(|(_, v)| *v <= 0) {
        Some((name, v)) => Err(format!("{what} {name} must be positive, not {v}")),
        None => Ok(()),
    }
}

/// That a transformer's `hidden` width splits into `heads` heads.
pub(crate) fn check_heads(what: &str, hidden: i64, heads: i64) -> Result<(), String> {
    if hidden % heads != 0 {
        return Err(format!(
            "{what} hidden {hidden} is not a multiple of heads {heads}"
        ));
    }
    Ok(())
}

pub struct Model {
    pub arch: Arch,
    pub vs: nn::VarStore,
    net: Net,
    pub in_channels: i64,
    pub classes: i64,
    compute: Compute,
    /// How the BatchNorm layers normalise in train mode ([`norm`]).
    norm: norm::NormSync,
    /// The trunks a forward pass left for the backward pass to recompute
    /// ([`recompute`]; the engine drains it).
    recompute: recompute::Recompute,
    /// The row keys of a keyed forward pass ([`Model::forward_keyed`]).
    keys: swin::RowKeys,
    /// The robustness probe's relative logit noise ([`Model::set_logit_noise`]).
    noise: Option<LogitNoise>,
}

/// Relative noise on every forward pass's logits: `z (1 + u)`, `u` uniform
/// in `[−rel, rel]` from a keyed stream that advances once per pass.
struct LogitNoise {
    rel: f64,
    seed: u64,
    passes: std::cell::Cell<u64>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({}, {} classes)", self.arch.name(), self.classes)
    }
}

impl Model {
    /// A freshly initialised model (initialisation drawn from libtorch's
    /// generator: seed it with `tch::manual_seed` first for a reproducible one).
    /// A DiT takes its latent channels and classes from the arguments.
    pub fn new(arch: Arch, in_channels: i64, classes: i64, device: Device) -> Self {
        let arch = match arch {
            Arch::Dit(spec) => Arch::Dit(dit::DitSpec {
                in_channels,
                classes,
                ..spec
            }),
            other => other,
        };
        let vs = nn::VarStore::new(device);
        let norm = norm::NormSync::default();
        let keys = swin::RowKeys::default();
        let net = arch.build(&vs.root(), in_channels, classes, &norm, &keys);
        Model {
            arch,
            vs,
            net,
            in_channels,
            classes,
            compute: Compute::default(),
            norm,
            recompute: recompute::Recompute::default(),
            keys,
            noise: None,
        }
    }

    /// Sets how the forward pass computes; with channels-last, the
    /// convolution weights take that layout now (their values unchanged).
    pub fn set_compute(&mut self, compute: Compute) -> Result<(), String> {
        if compute.precision == Precision::Bf16 {
            layout::autocast_available().map_err(|e| format!("device.precision: {e}"))?;
        }
        let bf16 = compute.precision == Precision::Bf16;
        match &mut self.net {
            Net::Denoiser(Denoiser::Dit(dit)) => {
                dit.set_recompute(compute.recompute.then(|| self.recompute.clone()), bf16)
            }
            _ if compute.recompute => {
                return Err(format!(
                    "device.recompute: {} has no blocks to recompute (only a DiT's are)",
                    self.arch.name()
                ));
            }
            _ => {}
        }
        if compute.channels_last {
            tch::no_grad(|| {
                for (_, mut t) in self.vs.variables() {
                    if t.dim() == 4 && !layout::is_channels_last(&t) {
                        t.set_data(&layout::to_channels_last(&t));
                    }
                }
            });
        }
        self.compute = compute;
        Ok(())
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Where the BatchNorm layers find the cross-rank sum of global
    /// statistics (the engine sets it; see [`norm`]).
    pub fn norm_sync(&self) -> &norm::NormSync {
        &self.norm
    }

    /// The queue of trunks left for the backward pass to recompute (the
    /// engine attaches and drains it; see [`recompute`]).
    pub fn recompute_queue(&self) -> &recompute::Recompute {
        &self.recompute
    }

    /// Whether this rank must run a forward pass over its share of a batch
    /// (`empty`: the share has no samples): always for samples; for an empty
    /// share only in train mode under global BatchNorm, whose layers' sums
    /// every rank joins in the same order.
    pub fn must_forward(&self, empty: bool, train: bool) -> bool {
        !empty || (train && self.norm.is_global())
    }

    /// Makes every later forward pass multiply each logit by `1 + u`, `u`
    /// uniform in `[−rel, rel]` (a constant of the graph: gradients flow as
    /// without it), drawn from a stream keyed by `seed` and the pass's
    /// number: a probe of how a result moves when the last bits of the
    /// logits do (`unlearn.logit_noise`). `rel = 0` turns it off.
    pub fn set_logit_noise(&mut self, rel: f64, seed: u64) {
        self.noise = (rel > 0.0).then(|| LogitNoise {
            rel,
            seed,
            passes: std::cell::Cell::new(0),
        });
    }

    /// What the network computes.
    pub fn task(&self) -> Task {
        self.arch.task()
    }

    /// Runs `f` on `xs` in the model's layout and precision; fp32 out.
    fn compute_t(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let xs = if self.compute.channels_last {
            layout::to_channels_last(xs)
        } else {
            xs.shallow_clone()
        };
        match self.compute.precision {
            Precision::Fp32 => f(&xs),
            Precision::Bf16 => {
                let _bf16 =
                    layout::Autocast::bf16(xs.device()).expect("checked by Model::set_compute");
                f(&xs).to_kind(Kind::Float)
            }
        }
    }

    /// A denoiser's output for noised inputs `xs` under `cond`, in fp32
    /// whatever the precision: the UNet's predicted noise
    /// ([`unet::Unet::forward`]), or the DiT's prediction (the noise, then
    /// the variance channels with `learn_sigma`; [`dit::Dit::forward`], the
    /// rows `cond.keep` leaves out given the null class). `dropout` is the
    /// UNet's (the DiT has none). Panics on a classifier: commands check the
    /// task when they read the configuration.
    pub fn denoise(&self, xs: &Tensor, cond: &unet::Cond, dropout: &unet::Dropout) -> Tensor {
        match self.denoiser() {
            Denoiser::Unet(unet) => self.compute_t(xs, |x| unet.forward(x, cond, dropout)),
            Denoiser::Dit(dit) => {
                let drop = cond.keep.map(Tensor::logical_not);
                self.compute_t(xs, |x| dit.forward(x, cond.t, cond.c, drop.as_ref()))
            }
        }
    }

    /// The classifier-free guided output for classes `c`, `w = 0` the
    /// conditional output alone, else both halves in one forward pass of
    /// `2N` rows. The UNet guides its whole output as the DDPM release's
    /// `_forward_with_cond_scale`: `(1 + w) ε(c) − w ε(∅)`. The DiT as its
    /// reference's `forward_with_cfg` with scale `1 + w`: the same
    /// combination on the first three channels, the rest conditional.
    pub fn denoise_guided(&self, x: &Tensor, t: &Tensor, c: &Tensor, w: f64) -> Tensor {
        let cond = unet::Cond { t, c, keep: None };
        if w == 0.0 {
            return self.denoise(x, &cond, &unet::Dropout::Off);
        }
        let n = x.size()[0];
        let xx = Tensor::cat(&[x, x], 0);
        let tt = Tensor::cat(&[t, t], 0);
        match self.denoiser() {
            Denoiser::Unet(unet) => {
                let cc = Tensor::cat(&[c, c], 0);
                let keep = Tensor::cat(
                    &[
                        Tensor::ones([n], (Kind::Bool, x.device())),
                        Tensor::zeros([n], (Kind::Bool, x.device())),
                    ],
                    0,
                );
                let cond = unet::Cond {
                    t: &tt,
                    c: &cc,
                    keep: Some(&keep),
                };
                let out = self.compute_t(&xx, |x| unet.forward(x, &cond, &unet::Dropout::Off));
                let (with, without) = (out.narrow(0, 0, n), out.narrow(0, n, n));
                with * (1.0 + w) - without * w
            }
            Denoiser::Dit(dit) => {
                let null = Tensor::full_like(c, dit.spec().classes);
                let cc = Tensor::cat(&[c, &null], 0);
                self.compute_t(&xx, |x| dit.forward_with_cfg(x, &tt, &cc, 1.0 + w))
                    .narrow(0, 0, n)
            }
        }
    }

    fn denoiser(&self) -> &Denoiser {
        let Net::Denoiser(net) = &self.net else {
            panic!("{} is not a denoiser", self.arch.name())
        };
        net
    }

    /// A classifier's penultimate features `[N, D]` (eval mode here means
    /// `train = false`), in fp32.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let Net::Classifier(net) = &self.net else {
            panic!("{} is not a classifier", self.arch.name())
        };
        self.compute_t(xs, |x| net.features_t(x, train))
    }

    /// The `[C, H, W]` of the images a denoiser generates (`None` for a
    /// classifier).
    pub fn image_shape(&self) -> Option<[i64; 3]> {
        match &self.net {
            Net::Denoiser(net) => Some(match net {
                Denoiser::Unet(unet) => [self.in_channels, unet.resolution(), unet.resolution()],
                Denoiser::Dit(dit) => {
                    let side = dit.spec().input_size;
                    [self.in_channels, side, side]
                }
            }),
            Net::Classifier(_) => None,
        }
    }

    /// [`Model::forward_t`] whose random choices in train mode (a Swin's
    /// stochastic depth) come from each row's key `keys[i]`, so that a row
    /// draws the same whichever rank and batch hold it. Keys are the
    /// caller's: [`crate::diffusion::draws::row_keys`].
    pub fn forward_keyed(&self, xs: &Tensor, train: bool, keys: &[u64]) -> Tensor {
        self.keys.set(Some(keys.to_vec()));
        let logits = self.forward_t(xs, train);
        self.keys.set(None);
        logits
    }

    /// Logits `[N, classes]` of `xs` `[N, C, H, W]`, in fp32 whatever the
    /// precision; `train` selects BatchNorm's mode and turns on stochastic
    /// depth (drawn from libtorch's generator here: distributed steps use
    /// [`Model::forward_keyed`]). Panics on a denoiser: commands check the
    /// task when they read the configuration.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let Net::Classifier(net) = &self.net else {
            panic!("{} is not a classifier", self.arch.name())
        };
        let logits = self.compute_t(xs, |x| net.forward_t(x, train));
        match &self.noise {
            None => logits,
            Some(noise) => {
                let pass = noise.passes.get();
                noise.passes.set(pass + 1);
                let mut rng =
                    crate::rng::Rng::keyed(&[noise.seed, crate::rng::tag::LOGIT_NOISE, pass]);
                let u: Vec<f32> = (0..logits.numel())
                    .map(|_| rng.uniform_in(-noise.rel, noise.rel) as f32)
                    .collect();
                let u = Tensor::from_slice(&u)
                    .view(logits.size().as_slice())
                    .to_device(logits.device());
                &logits + (&logits * u).detach()
            }
        }
    }

    /// The model's state as `(name, tensor)`, sorted by name (shallow: the
    /// tensors are the live variables).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The trainable parameters, sorted by name.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.state()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// Loads weights saved by sfron or exported from PyTorch. A file that
    /// names another architecture in its metadata is refused.
    pub fn load(&mut self, path: &Path) -> Result<(), WeightsError> {
        self.load_bytes(&weights::read(path)?, path)
    }

    /// [`Model::load`] of a file's bytes already read (`path` names it in errors).
    pub fn load_bytes(&mut self, bytes: &[u8], path: &Path) -> Result<(), WeightsError> {
        let tensors = self.parse_own(bytes, path)?;
        if let Some(head) = self.arch.head() {
            let weight = format!("{head}.weight");
            if let Some((_, file)) = tensors.iter().find(|(n, _)| *n == weight)
                && file.size()[0] != self.classes
            {
                return Err(WeightsError::Mismatch {
                    path: path.into(),
                    reason: format!(
                        "its head {head} has {} classes, the data {}: set model.replace_head = true \
                         to fine-tune it on these classes with a new head",
                        file.size()[0],
                        self.classes
                    ),
                });
            }
        }
        weights::copy_into(&self.vs, &tensors, path)
    }

    /// The tensors of a weights file's bytes (`path` names it in errors); a
    /// file that names another architecture in its metadata is refused.
    fn parse_own(&self, bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
        let (tensors, metadata) = weights::parse(bytes, path)?;
        if let Some(saved) = metadata.get("sfron.arch")
            && *saved != self.arch.name()
        {
            return Err(WeightsError::Mismatch {
                path: path.into(),
                reason: format!(
                    "it holds a {saved} model, this run builds {}",
                    self.arch.name()
                ),
            });
        }
        Ok(tensors)
    }

    /// Loads a classifier's weights without its head (the file's head, of
    /// any number of classes, is left out), then initialises the head as
    /// PyTorch's `nn.Linear` does (weight and bias uniform in ±1/√fan_in,
    /// from libtorch's generator; a bias-free head, `resnet9`'s, draws its
    /// weight alone): the released fine-tuning recipe's
    /// `model.head = nn.Linear(in_features, num_classes)`.
    pub fn load_replacing_head(&mut self, path: &Path) -> Result<(), WeightsError> {
        let Some(head) = self.arch.head() else {
            return Err(WeightsError::Mismatch {
                path: path.into(),
                reason: format!("{} has no classification head to replace", self.arch.name()),
            });
        };
        let tensors = self.parse_own(&weights::read(path)?, path)?;
        let weight = format!("{head}.weight");
        let in_head = |n: &str| n == weight || n == format!("{head}.bias");
        if !tensors.iter().any(|(n, _)| *n == weight) {
            return Err(WeightsError::Mismatch {
                path: path.into(),
                reason: format!("it has no {head}.weight: not a {}", self.arch.name()),
            });
        }
        weights::copy_into_except(&self.vs, &tensors, path, &in_head)?;
        let vars = self.vs.variables();
        let fan_in = vars[&weight].size()[1];
        let bound = 1.0 / (fan_in as f64).sqrt();
        // In name order (bias, then weight; the weight alone without a
        // bias), so the draws are reproducible.
        let mut drawn: Vec<(String, Tensor)> =
            vars.into_iter().filter(|(n, _)| in_head(n)).collect();
        drawn.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (_, mut t) in drawn {
                let _ = t.uniform_(-bound, bound);
            }
        });
        Ok(())
    }

    /// Saves the state (PyTorch loads it with `safetensors.torch.load_file`).
    pub fn save(
        &self,
        path: &Path,
        mut metadata: BTreeMap<String, String>,
    ) -> Result<(), WeightsError> {
        metadata.insert("sfron.arch".into(), self.arch.name());
        weights::save(path, &self.state(), &metadata)
    }
}
