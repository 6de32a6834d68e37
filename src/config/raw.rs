//! The raw configuration: what a TOML file, the environment and `--set` may
//! say, exactly as said. Every struct denies unknown fields; defaults live
//! here and nowhere else. Nothing outside `config` reads these types: they
//! become a [`super::RunPlan`] first.

use serde::{Deserialize, Serialize};

/// A configuration enum written as a lowercase string. Deserialising an
/// unknown name fails with the list of allowed names.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("{s:?} is not allowed: expected one of {}", $name::NAMES.join(", "))),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }
    };
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub run: RunSection,
    pub device: DeviceSection,
    pub comm: CommSection,
    pub log: LogSection,
    pub data: DataSection,
    pub model: ModelSection,
    pub diffusion: DiffusionSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    pub unlearn: UnlearnSection,
    pub sfron: SfronSection,
    pub ft: FtSection,
    pub ga: GaSection,
    pub rl: RlSection,
    pub salun: SalunSection,
    pub bad_teacher: BadTeacherSection,
    pub scrub: ScrubSection,
    pub l1_sparse: L1SparseSection,
    pub diffusion_rl: DiffusionRlSection,
    pub sa: SaSection,
    pub eval: EvalSection,
    pub sample: SampleSection,
    pub vae: VaeSection,
    pub encode: EncodeSection,
    pub study: StudySection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Folder that holds run folders.
    pub root: String,
    /// This run's folder name under `root`.
    pub name: String,
    /// Seed of every random choice of the run.
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            root: "runs".into(),
            name: "default".into(),
            seed: 0,
        }
    }
}

string_enum! {
    /// Which device a rank computes on.
    DeviceKind {
        /// CUDA device `local_rank mod device_count` when CUDA is usable, else CPU.
        Auto => "auto",
        Cpu => "cpu",
        Cuda => "cuda",
    }
}

string_enum! {
    /// The arithmetic of forward passes.
    Precision {
        Fp32 => "fp32",
        /// Autocast to bfloat16 (matrix products and convolutions in bf16,
        /// reductions and losses in fp32; weights, gradients and the
        /// optimizer stay fp32), as `torch.autocast(dtype=torch.bfloat16)`.
        Bf16 => "bf16",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    pub kind: DeviceKind,
    /// CPU threads per rank for libtorch; 0 means cores / ranks on this host.
    pub threads: u32,
    pub precision: Precision,
    /// Images and convolution weights in channels-last (NHWC) memory
    /// layout, which tensor cores and oneDNN prefer.
    pub channels_last: bool,
    /// Activation checkpointing of a DiT's blocks: training keeps each
    /// block's input only and recomputes the block in the backward pass
    /// (about a third more compute per step, a small fraction of the
    /// activation memory). The same gradients up to float reassociation.
    pub recompute: bool,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection {
            kind: DeviceKind::Auto,
            threads: 0,
            precision: Precision::Fp32,
            channels_last: false,
            recompute: false,
        }
    }
}

string_enum! {
    /// Which data plane sums gradients held on GPUs.
    GpuPlane {
        /// NCCL when it loads and initialises on every rank, else pinned
        /// host buffers through MPI.
        Auto => "auto",
        Nccl => "nccl",
        Mpi => "mpi",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommSection {
    /// Gradient buckets of at most this many MiB; 0 sums everything in one call.
    pub bucket_mib: f64,
    /// The first bucket (the last layers' gradients), smaller so the
    /// reductions start early.
    pub first_bucket_mib: f64,
    /// MPI reductions above two segments go in pieces of this many KiB, all
    /// in flight at once (pipelined, each piece summed while in cache); 0:
    /// one call per bucket.
    pub segment_kib: u32,
    pub gpu_plane: GpuPlane,
    /// Ranks per group of a population study (`study.population`): the job
    /// splits into world / group_size groups, each running its own models
    /// data-parallel; 0: the whole job is one group.
    pub group_size: u32,
}

impl Default for CommSection {
    fn default() -> Self {
        CommSection {
            bucket_mib: 25.0,
            first_bucket_mib: 1.0,
            segment_kib: 1024,
            gpu_plane: GpuPlane::Auto,
            group_size: 0,
        }
    }
}

string_enum! {
    LogLevel {
        Error => "error",
        Warn => "warn",
        Info => "info",
        Debug => "debug",
        Trace => "trace",
    }
}

string_enum! {
    LogRanks {
        /// Rank 0 at `level`, the others at warn.
        Zero => "zero",
        /// Every rank at `level`.
        All => "all",
    }
}

string_enum! {
    LogFormat {
        Text => "text",
        Json => "json",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: LogLevel,
    pub ranks: LogRanks,
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: LogLevel::Info,
            ranks: LogRanks::Zero,
            format: LogFormat::Text,
        }
    }
}

string_enum! {
    /// On-disk dataset formats (see `data::dataset`).
    DataFormat {
        Mnist => "mnist",
        Cifar10 => "cifar10",
        Cifar100 => "cifar100",
        ImageFolder => "imagefolder",
        Tar => "tar",
        /// A folder of VAE latents made by `sfron encode`.
        Latents => "latents",
    }
}

string_enum! {
    /// Per-sample transforms; `auto` picks the format's usual one.
    TransformName {
        Auto => "auto",
        Mnist => "mnist",
        Cifar10 => "cifar10",
        /// CIFAR-10 with the SFR-on authors' released normalisation (std
        /// 0.2023, 0.1994, 0.2010): for weights trained by their code.
        Cifar10Released => "cifar10_released",
        Cifar100 => "cifar100",
        ImageNet => "imagenet",
        /// The SFR-on release's TinyImageNet transform: bicubic resize of
        /// the 64 × 64 images to 224, in training RandAugment(2, 2),
        /// ImageNet's mean and std.
        TinyImageNet => "tinyimagenet",
        /// Pixels rescaled to [−1, 1], nothing else (a denoiser's data).
        Diffusion => "diffusion",
        /// [−1, 1] with a random horizontal flip in training (the
        /// release's CIFAR-10 DDPM data).
        DiffusionFlip => "diffusion_flip",
    }
}

string_enum! {
    /// What to do with an image that cannot be decoded.
    OnCorrupt {
        /// Stop with an error naming the file.
        Error => "error",
        /// Leave the sample out of its batch, count and log it.
        Skip => "skip",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub format: DataFormat,
    /// Folder of the dataset (layout per format: see `data::dataset`).
    pub root: String,
    pub transform: TransformName,
    /// Decode threads per rank; 0 decodes on the main thread.
    pub workers: u32,
    /// Batches decoded ahead per stream.
    pub prefetch: u32,
    pub on_corrupt: OnCorrupt,
    /// Split manifest written by `sfron split` ("" = none).
    pub split: String,
    /// Use only the first N training samples (0 = all): quick studies and
    /// tests. The dataset's fingerprint records it, so a split or checkpoint
    /// of the full set is never taken for one of the slice.
    pub train_limit: u64,
    /// Use only the first N test samples (0 = all).
    pub test_limit: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            format: DataFormat::Mnist,
            root: "tests/data/mnist".into(),
            transform: TransformName::Auto,
            workers: 2,
            prefetch: 4,
            on_corrupt: OnCorrupt::Error,
            split: String::new(),
            train_limit: 0,
            test_limit: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// mnist_cnn | mnist_cnn_bn | resnet9 | resnet18_cifar | resnet18 | resnet50 |
    /// vit_b_16 | vit_b_32 | vit_l_16 | vit_l_32 | vit_h_14 | swin_t |
    /// swin_s | swin_b | ddpm_unet | dit.
    pub arch: String,
    /// Width multiplier of `resnet18_cifar` (1.0 = 64 base channels).
    pub width: f64,
    /// Weights to start `train` from ("" = a fresh, seeded initialisation).
    pub init: String,
    /// Start from `init` with its classification head left out, the head
    /// freshly initialised for the data's classes (the released
    /// `model.head = nn.Linear(in_features, num_classes)` after loading
    /// ImageNet weights).
    pub replace_head: bool,
    /// Which batch BatchNorm normalises by in train mode.
    pub batchnorm: BatchNormMode,
    /// The shape of `ddpm_unet`.
    pub unet: UnetSection,
    /// The shape of `dit`.
    pub dit: DitSection,
    /// Overrides of a ViT's shape.
    pub vit: VitSection,
    /// Overrides of a Swin's shape.
    pub swin: SwinSection,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            arch: "mnist_cnn".into(),
            width: 1.0,
            init: String::new(),
            replace_head: false,
            batchnorm: BatchNormMode::Global,
            unet: UnetSection::default(),
            dit: DitSection::default(),
            vit: VitSection::default(),
            swin: SwinSection::default(),
        }
    }
}

/// `dit`'s shape: one of the reference's `DiT_models` by name, any of its
/// numbers overridden (0 keeps the named model's). The latent side, channels
/// and classes come from the data; the class table has the null row of
/// classifier-free guidance when `diffusion.cond_drop` is above 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DitSection {
    /// `DiT-XL/2` … `DiT-S/8`.
    pub name: String,
    pub depth: i64,
    pub hidden: i64,
    pub heads: i64,
    pub patch: i64,
    pub mlp_ratio: f64,
    /// Predict the variance too (8 output channels on 4-channel latents);
    /// needs `diffusion.process = "adm"`.
    pub learn_sigma: bool,
}

impl Default for DitSection {
    fn default() -> Self {
        DitSection {
            name: "DiT-XL/2".into(),
            depth: 0,
            hidden: 0,
            heads: 0,
            patch: 0,
            mlp_ratio: 0.0,
            learn_sigma: true,
        }
    }
}

/// A ViT's shape beyond its builder (`model.arch = "vit_b_16"` …): any
/// number overridden (0 keeps the builder's). The image side, channels and
/// classes come from the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitSection {
    pub patch: i64,
    pub depth: i64,
    pub heads: i64,
    pub hidden: i64,
    pub mlp_dim: i64,
}

/// A Swin's shape beyond its builder (`model.arch = "swin_t"` …): any
/// number overridden (0 or empty keeps the builder's; a negative
/// `stochastic_depth_prob` too). The image side, channels and classes come
/// from the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwinSection {
    pub patch: i64,
    pub embed_dim: i64,
    pub depths: Vec<i64>,
    pub heads: Vec<i64>,
    pub window: i64,
    pub mlp_ratio: f64,
    pub stochastic_depth_prob: f64,
}

impl Default for SwinSection {
    fn default() -> Self {
        SwinSection {
            patch: 0,
            embed_dim: 0,
            depths: Vec::new(),
            heads: Vec::new(),
            window: 0,
            mlp_ratio: 0.0,
            stochastic_depth_prob: -1.0,
        }
    }
}

/// `ddpm_unet`'s shape, the release's `model` keys (defaults: its CIFAR-10
/// UNet, `DDPM/configs/cifar10_*.yml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetSection {
    pub ch: i64,
    pub ch_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub attn_resolutions: Vec<i64>,
    pub dropout: f64,
    pub resamp_with_conv: bool,
    /// GroupNorm's groups (the release: 32).
    pub groups: i64,
}

impl Default for UnetSection {
    fn default() -> Self {
        UnetSection {
            ch: 128,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.1,
            resamp_with_conv: true,
            groups: 32,
        }
    }
}

string_enum! {
    /// How β_t runs from `beta_start` to `beta_end`.
    BetaSchedule {
        Linear => "linear",
        /// Linear in √β.
        Quad => "quad",
    }
}

string_enum! {
    /// Whose diffusion process a denoiser trains and samples with.
    DiffusionProcess {
        /// `release` for `ddpm_unet`, `adm` for `dit`.
        Auto => "auto",
        /// The DDPM release's (`DDPM/`): float32 schedule, the squared
        /// error summed over pixels, antithetic timesteps, its DDPM
        /// (fixed-large, x0 clamped) and DDIM samplers on uniform skips.
        Release => "release",
        /// guided-diffusion's as DiT runs it ([`crate::diffusion::adm`]):
        /// float64 tables, the mean squared error plus the variational
        /// bound with a learned variance, uniform timesteps, respaced
        /// sampling.
        Adm => "adm",
    }
}

/// The diffusion process of a denoiser (defaults: the release's
/// `diffusion` and `model` keys for CIFAR-10).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionSection {
    /// Whose process: the DDPM release's or ADM's (DiT's).
    pub process: DiffusionProcess,
    pub beta_schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    /// T.
    pub timesteps: i64,
    /// Share of training rows whose class is replaced by the null class
    /// (classifier-free guidance; `cond_drop_prob`).
    pub cond_drop: f64,
    /// Decay of the EMA of the weights kept for sampling (`ema_rate` of
    /// the pretraining config; 0 keeps no EMA).
    pub ema_decay: f64,
    /// The EMA's decay while unlearning, starting from the original's EMA
    /// (`ema.safetensors` beside `unlearn.from`, else its weights). The
    /// DDPM release's forgetting configs pass `ema_rate` 1e-4 to an
    /// `EMAHelper` whose update is `(1 − rate) θ + rate · ema`: an EMA
    /// that is the raw weights to 1e-4, hence the default. DiT's: 0.9999.
    pub unlearn_ema_decay: f64,
}

impl Default for DiffusionSection {
    fn default() -> Self {
        DiffusionSection {
            process: DiffusionProcess::Auto,
            beta_schedule: BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            timesteps: 1000,
            cond_drop: 0.1,
            ema_decay: 0.9999,
            unlearn_ema_decay: 1e-4,
        }
    }
}

string_enum! {
    /// Which batch BatchNorm layers normalise by in train mode, on more than
    /// one rank (one rank: its batch is the global batch either way).
    BatchNormMode {
        /// The global batch of every rank, as `torch.nn.SyncBatchNorm`: N
        /// ranks normalise as one rank does, and every rank's running
        /// statistics come out the same. Costs two small sums per layer and
        /// step (forward and backward).
        Global => "global",
        /// Each rank's own share; rank 0's running statistics are broadcast
        /// after every step. Depends on the rank count.
        Local => "local",
    }
}

string_enum! {
    /// Which training samples `train` learns from.
    TrainOn {
        /// The whole training set: the original model.
        All => "all",
        /// The remain set of `data.split`: Retrain.
        Remain => "remain",
    }
}

string_enum! {
    OptimizerName {
        /// SGD with momentum (PyTorch's rule, optional Nesterov).
        Sgd => "sgd",
        /// AdamW (PyTorch's rule, decoupled weight decay).
        AdamW => "adamw",
    }
}

string_enum! {
    ScheduleName {
        /// η(1 + cos(π t / T)) / 2 over the steps after warm-up.
        Cosine => "cosine",
        /// η(1 + cos(π e / E)) / 2 in epoch e of E: PyTorch's
        /// CosineAnnealingLR(T_max = epochs) stepped once per epoch, as the
        /// released training does.
        CosineEpochs => "cosine_epochs",
        /// η(1 − t / T) over the T steps after warm-up: with the warm-up, the
        /// triangle of the fast CIFAR-10 ResNet-9 recipe (the KLoM benchmark's
        /// `np.interp(step, [0, peak, end], [0, 1, 0])`).
        Linear => "linear",
        /// η · gamma^(milestones passed), milestones in epochs.
        Step => "step",
        Constant => "constant",
    }
}

string_enum! {
    /// Which epoch's weights `train` keeps as `model.safetensors`.
    Select {
        /// The last.
        Last => "last",
        /// The best on the held-out validation samples (`val_fraction > 0`).
        Val => "val",
        /// The best on the test set, as the released code keeps them: its
        /// test accuracy is then biased upward, and the weights' metadata,
        /// train.json and a study's report say so.
        Test => "test",
    }
}

string_enum! {
    /// What a step with a non-finite loss or gradient does.
    NonFinite {
        /// Skip the step (weights and optimizer untouched); stop after `max_skips` in a row.
        Skip => "skip",
        /// Stop at once with an error.
        Error => "error",
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub on: TrainOn,
    pub epochs: u32,
    /// Global batch (all ranks together).
    pub batch: u32,
    /// Keep the last, smaller batch of each epoch.
    pub drop_last: bool,
    pub optimizer: OptimizerName,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Adam's betas and epsilon (AdamW only).
    pub betas: [f64; 2],
    pub eps: f64,
    pub schedule: ScheduleName,
    /// Linear warm-up from lr/steps to lr over this many steps.
    pub warmup_steps: u32,
    /// `step` schedule: epochs at which the rate is multiplied by `gamma`.
    pub milestones: Vec<u32>,
    pub gamma: f64,
    /// Stop after this many steps in all (0 = every epoch); the schedule still spans `epochs`.
    pub max_steps: u64,
    /// Fraction of the training samples held out for validation (and model
    /// selection with `select = "val"`).
    pub val_fraction: f64,
    /// Which epoch's weights become `model.safetensors`.
    pub select: Select,
    /// Evaluate on the test (and validation) set every this many epochs (0 = only at the end).
    pub eval_every: u32,
    /// Log and record metrics every this many steps.
    pub log_every: u32,
    pub nonfinite: NonFinite,
    /// Non-finite steps in a row after which `skip` stops with an error.
    pub max_skips: u32,
    /// Compare a digest of every rank's weights every this many steps (0 = at checkpoints only).
    pub verify_every: u64,
    /// Clip the global gradient norm to this before each step (0 = no
    /// clipping; the release's DDPM training clips to 1).
    pub clip: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            on: TrainOn::All,
            epochs: 3,
            batch: 128,
            drop_last: false,
            optimizer: OptimizerName::Sgd,
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            schedule: ScheduleName::Cosine,
            warmup_steps: 0,
            milestones: Vec::new(),
            gamma: 0.1,
            max_steps: 0,
            val_fraction: 0.0,
            select: Select::Last,
            eval_every: 1,
            log_every: 20,
            nonfinite: NonFinite::Skip,
            max_skips: 5,
            verify_every: 0,
            clip: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Checkpoint every this many steps (0 = only at epoch ends and on preemption).
    pub every_steps: u64,
    /// Checkpoint at the end of every this many epochs (0 = never at epoch ends).
    pub every_epochs: u32,
    /// Complete checkpoints kept, newest first (at least 1).
    pub keep_last: u32,
    /// Steps whose checkpoints are kept forever.
    pub milestones: Vec<u64>,
    /// Resume from the newest complete checkpoint of the run folder.
    pub resume: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every_steps: 0,
            every_epochs: 1,
            keep_last: 2,
            milestones: Vec::new(),
            resume: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Samples per forward pass of `sfron eval`.
    pub batch: usize,
    /// Also write every sample's logits to `examples.safetensors` (4 bytes × classes per sample).
    pub logits: bool,
    /// Rows per file of the per-example outputs: more are written shard by
    /// shard (`examples-00000-of-00002.safetensors`, …); 0: one file.
    pub shard_rows: u64,
    /// A diffusion model's evaluation: the weights of the classifier that
    /// judges its images (forget and remaining accuracy, FID in its
    /// feature space).
    pub classifier: String,
    /// That classifier's architecture (a classifier of the zoo).
    pub classifier_arch: String,
    /// A diffusion model's evaluation: pytorch-fid's Inception weights as
    /// safetensors ([`crate::model::inception::EXPORT_HINT`]); when set, FID
    /// is also computed in Inception-v3 pool3 features ("" = only the
    /// classifier's).
    pub inception: String,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            batch: 256,
            logits: false,
            shard_rows: 1 << 20,
            classifier: String::new(),
            classifier_arch: "mnist_cnn".into(),
            inception: String::new(),
        }
    }
}

/// RL and SalUn on a diffusion model, as the DDPM release's
/// `saliency_unlearn` mode runs them (`DDPM/configs/cifar10_saliency_unlearn.yml`
/// and its README command: `--remain_alpha 1e-3 --unlearn_loss rl`). Each
/// iteration one joint step: `forget_alpha · MSE(ε(x_t, c), sg ε(x_t, c'))`
/// on a forget batch, `c' = (c + 1) mod K`, plus `remain_alpha ·` the
/// denoising loss of a remain batch; the gradient clipped, then (SalUn)
/// masked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionRlSection {
    pub iterations: u64,
    /// Constant learning rate (Adam in the release).
    pub lr: f64,
    pub forget_alpha: f64,
    pub remain_alpha: f64,
    /// The joint gradient's L2 norm is clipped to this (0 = no clipping).
    pub clip: f64,
    /// SalUn's mask keeps this share of the weights with the largest
    /// `|Σ_b clip(∇ loss_b)|` over the forget set (the release: 0.5).
    pub mask_fraction: f64,
    /// The mask's loss is that of the guided prediction at this scale.
    pub mask_guidance: f64,
    /// Each mask batch's mean gradient is clipped to this (0 = no clipping).
    pub mask_clip: f64,
    /// The mask's batch (0 = unlearn.forget_batch).
    pub mask_batch: u32,
    /// What the forget rows are taught with the pseudo label `c'`:
    /// `prediction` (the DDPM release: match `sg ε_θ(x_t, c')`) or `loss`
    /// (the DiT release's `--unlearn-loss rl`: the denoiser's own training
    /// loss under `c'`).
    pub target: RelabelTarget,
    /// `c' = (c + label_offset) mod classes` (the DDPM release: 1; DiT: 100).
    pub label_offset: i64,
}

string_enum! {
    /// The forget half of RL and SalUn on a denoiser.
    RelabelTarget {
        Prediction => "prediction",
        Loss => "loss",
    }
}

impl Default for DiffusionRlSection {
    fn default() -> Self {
        DiffusionRlSection {
            iterations: 1000,
            lr: 1e-5,
            forget_alpha: 1.0,
            remain_alpha: 1e-3,
            clip: 1.0,
            mask_fraction: 0.5,
            mask_guidance: 2.0,
            mask_clip: 1.0,
            mask_batch: 0,
            target: RelabelTarget::Prediction,
            label_offset: 1,
        }
    }
}

/// SA, Selective Amnesia (Heck et al., NeurIPS 2023), on a diffusion
/// model as the DDPM release runs it (`sa_forget` with `cifar10_sa.yml`;
/// its Fisher from `fim.py`/`save_fim`, its replay from `sample.py
/// --mode sample_classes`): generated images of the original replace the
/// data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaSection {
    /// Iterations (`training.n_iters`).
    pub iterations: u64,
    /// Constant learning rate (`optim.lr`, Adam).
    pub lr: f64,
    /// Weight of the generative-replay term (`training.gamma`).
    pub gamma: f64,
    /// Weight of the EWC term (`training.lmbda`).
    pub lambda: f64,
    /// The gradient's L2 norm is clipped to this (`optim.grad_clip`; 0 = off).
    pub clip: f64,
    /// Images generated per class by the original, with `[sample]`'s
    /// sampler and guidance (`--n_samples_per_class 500`).
    pub per_class: u64,
    /// Sampling steps of the replay set (0 = `sample.steps`).
    pub sample_steps: i64,
    /// The Fisher sums each image's loss over this many timesteps, evenly
    /// spaced, scaled by T / timesteps (the release: all T = 1000).
    pub fisher_timesteps: u64,
    /// Rows per forward pass of the Fisher (its `T / n_chunks`: 1000 / 20).
    pub fisher_batch: u64,
    /// The Fisher includes the forget class's generated images (the
    /// release generates every class for it).
    pub fisher_forget_class: bool,
    /// EMA decay of the forgetting run (`model.ema_rate`; SFR-on's release
    /// config uses its own, `diffusion.unlearn_ema_decay`).
    pub ema_decay: f64,
}

impl Default for SaSection {
    fn default() -> Self {
        SaSection {
            iterations: 20000,
            lr: 1e-4,
            gamma: 1.0,
            lambda: 10.0,
            clip: 1.0,
            per_class: 500,
            sample_steps: 0,
            fisher_timesteps: 1000,
            fisher_batch: 50,
            fisher_forget_class: true,
            ema_decay: 0.9999,
        }
    }
}

string_enum! {
    /// How `sfron sample` steps from noise to an image.
    SampleMethod {
        /// The release's `generalized_steps` (DDIM with stochasticity
        /// `sample.eta`; η = 1 over all T steps is ancestral sampling).
        Ddim => "ddim",
        /// The release's `ddpm_steps`: ancestral, fixed-large variance,
        /// x̂₀ clipped to [−1, 1].
        Ddpm => "ddpm",
    }
}

string_enum! {
    /// Which weights of a run folder `sfron sample` generates with.
    SampleWeights {
        /// The EMA (`ema.safetensors`), as the release samples.
        Ema => "ema",
        /// The trained weights themselves (`model.safetensors`).
        Raw => "raw",
    }
}

/// `sfron sample` (defaults: the release's `sample.py` and
/// `cifar10_sample.yml`).
/// The VAE of a latent diffusion model (`AutoencoderKL`'s shape; defaults:
/// `stabilityai/sd-vae-ft-ema`, whose weights are the user's export,
/// `crate::model::vae::EXPORT_HINT`). Its image channels are the data's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeSection {
    pub block_out: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub groups: i64,
    pub scaling_factor: f64,
}

impl Default for VaeSection {
    fn default() -> Self {
        VaeSection {
            block_out: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            groups: 32,
            scaling_factor: 0.18215,
        }
    }
}

/// `sfron encode`: a dataset's images to a latent dataset, once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncodeSection {
    /// The VAE weights (safetensors, diffusers' names).
    pub vae: String,
    /// The latent dataset's folder (`train/` and `test/` under it).
    pub out: String,
    /// The side of ADM's centre crop (DiT's `--image-size`: 256 or 512).
    pub image_size: u64,
    /// Samples per shard file.
    pub shard_size: u64,
    /// Images per VAE forward pass.
    pub batch: u64,
}

impl Default for EncodeSection {
    fn default() -> Self {
        EncodeSection {
            vae: String::new(),
            out: String::new(),
            image_size: 256,
            shard_size: 1024,
            batch: 32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// A weights file, or a run folder of `train`/`unlearn` (then
    /// `sample.weights` picks its EMA or raw weights).
    pub from: String,
    pub weights: SampleWeights,
    pub method: SampleMethod,
    /// Timesteps visited, `T / steps` apart (the release's `--timesteps`).
    pub steps: i64,
    /// DDIM's stochasticity η (the release's `--eta`).
    pub eta: f64,
    /// Classifier-free guidance scale w: `(1 + w) ε(c) − w ε(∅)` (`--cond_scale`).
    pub guidance: f64,
    /// Images per class (`--n_samples_per_class`).
    pub per_class: u64,
    /// Classes to generate ([] = every class).
    pub classes: Vec<i64>,
    /// Images per forward pass on each rank (`sampling.batch_size`).
    pub batch: u64,
    /// Images per class in `grid.png`.
    pub grid: u64,
    /// Also write every image as a PNG under `samples/` (the run folder
    /// always has `samples.safetensors` and `samples.npz`).
    pub png_files: bool,
}

impl Default for SampleSection {
    fn default() -> Self {
        SampleSection {
            from: String::new(),
            weights: SampleWeights::Ema,
            method: SampleMethod::Ddim,
            steps: 1000,
            eta: 1.0,
            guidance: 2.0,
            per_class: 500,
            classes: Vec::new(),
            batch: 512,
            grid: 10,
            png_files: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudySection {
    /// The forget set, as `sfron split --scenario` takes it: `random:0.1`, `class:3`, `list:FILE`.
    pub scenario: String,
    /// One split (random scenarios), Retrain and set of unlearning runs per seed.
    pub seeds: Vec<u64>,
    /// The unlearning methods compared with Retrain.
    pub methods: Vec<UnlearnMethod>,
    /// Weights of an original model to start from ("" = train it in the study).
    pub original: String,
    /// A diffusion study judges each SFR-on snapshot on this many images
    /// per class (0 = `sample.per_class`).
    pub snapshot_per_class: u64,
    /// A diffusion study with `sample.weights = "ema"` also judges each
    /// model's raw weights, as rows "(raw)" beside the EMA's (an EMA at
    /// 0.9999 still holds most of the original after a few hundred
    /// forgetting steps, so its samples can hide the forgetting).
    pub judge_raw: bool,
    /// A population study (0: off): this many originals, as many oracles
    /// (Retrain) and, per method, as many unlearnings (one per original),
    /// judged by KLoM, U-LiRA and the NeurIPS 2023 challenge score (DESIGN
    /// §2.1). At least 2.
    pub population: u32,
    /// Population: each original learns a random half of the training set
    /// (the membership table is recorded), as U-LiRA's shadow models do.
    pub subsample: bool,
    /// Population: run only the items of model K (one task of a SLURM
    /// array) and write no report; -1: every item, then the report.
    pub only: i64,
}

impl Default for StudySection {
    fn default() -> Self {
        StudySection {
            scenario: "random:0.1".into(),
            seeds: vec![0],
            // SA needs a generative model: not in a classifier's default list.
            methods: UnlearnMethod::NAMES
                .iter()
                .map(|n| UnlearnMethod::try_from(n.to_string()).expect("a listed name"))
                .filter(|&m| m != UnlearnMethod::Sa && !m.is_ablation())
                .collect(),
            original: String::new(),
            snapshot_per_class: 0,
            judge_raw: false,
            population: 0,
            subsample: false,
            only: -1,
        }
    }
}

string_enum! {
    /// The unlearning method of `sfron unlearn`.
    UnlearnMethod {
        /// SFR-on (DESIGN §1.1-1.2).
        Sfron => "sfron",
        /// SFR-on's component ablations (Table 4 of the paper; the
        /// `[sfron]` settings, some components off: `unlearn::sfron::Ablation`).
        /// R: the remain steps alone.
        SfronR => "sfron_r",
        /// R + on: remain steps interleaved with plain gradient ascent (λ = 0, no mask).
        SfronROn => "sfron_r_on",
        /// F + R + on: adaptive forget weights, no saliency mask.
        SfronFROn => "sfron_f_r_on",
        /// S + F + R, joint: one step on the sum of the masked, clipped forget
        /// gradient and the remain gradient instead of two interleaved steps.
        SfronJoint => "sfron_joint",
        /// Fine-tuning on the remain set.
        Ft => "ft",
        /// Gradient ascent on the forget set.
        Ga => "ga",
        /// Random labels for the forget set.
        Rl => "rl",
        /// Saliency-masked random labels.
        Salun => "salun",
        /// Distillation from a competent and an incompetent teacher.
        BadTeacher => "bad_teacher",
        /// SCRUB: alternating max (forget) and min (remain) distillation.
        Scrub => "scrub",
        /// Fine-tuning with a decaying ℓ1 penalty.
        L1Sparse => "l1_sparse",
        /// Selective Amnesia (diffusion models only).
        Sa => "sa",
    }
}

impl UnlearnMethod {
    /// One of SFR-on's component ablations (listed in a study explicitly).
    pub fn is_ablation(self) -> bool {
        matches!(
            self,
            UnlearnMethod::SfronR
                | UnlearnMethod::SfronROn
                | UnlearnMethod::SfronFROn
                | UnlearnMethod::SfronJoint
        )
    }

    /// SFR-on or one of its ablations (they share `[sfron]`).
    pub fn is_sfron(self) -> bool {
        self == UnlearnMethod::Sfron || self.is_ablation()
    }
}

string_enum! {
    /// How an epoch-based baseline's learning rate moves.
    EpochSchedule {
        /// `η (1 + cos(π e / E)) / 2` in epoch `e` of `E` (PyTorch's
        /// CosineAnnealingLR stepped once per epoch, as released).
        CosineEpochs => "cosine_epochs",
        /// The same cosine stepped every iteration.
        Cosine => "cosine",
        /// `η` throughout.
        Constant => "constant",
    }
}

string_enum! {
    /// How SFR-on's saliency gates the forget gradient.
    SaliencyName {
        /// `M = 1[S >= gamma]` (the released rule).
        Hard => "hard",
        /// `S` itself, clipped to `soft_max`.
        Soft => "soft",
        /// No mask.
        None => "none",
    }
}

/// What every unlearning method shares: the starting weights, the budget,
/// the optimizer and the run's bookkeeping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnlearnSection {
    pub method: UnlearnMethod,
    /// The original model's weights (safetensors from `sfron train` or PyTorch).
    pub from: String,
    /// Global remain batch (all ranks together).
    pub batch: u32,
    /// Global forget batch.
    pub forget_batch: u32,
    /// The optimizer of every method (its learning rate is the method's).
    pub optimizer: OptimizerName,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Log and record metrics every this many iterations.
    pub log_every: u32,
    /// Measure forget, remain and test accuracy every this many iterations (0 = at the end only).
    pub eval_every: u64,
    /// Also measure them before the first iteration (the original's numbers).
    pub eval_before: bool,
    /// Measure them after the last iteration, for `unlearn.json` (a study
    /// turns this and `eval_before` off: its evaluation stage measures).
    pub eval_after: bool,
    pub nonfinite: NonFinite,
    pub max_skips: u32,
    /// Compare a digest of every rank's weights every this many iterations (0 = at checkpoints only).
    pub verify_every: u64,
    /// Save the weights (and a denoiser's EMA) as
    /// `snapshots/iter-NNNNNN[.ema].safetensors` every this many
    /// iterations, for a path of the forgetting (0 = none; the DDPM
    /// release: every 10).
    pub snapshot_every: u64,
    /// Robustness probe: every forward pass of the run (Fisher passes
    /// included) multiplies each logit by `1 + u`, `u` uniform in
    /// [−logit_noise, logit_noise], as another CPU's last bits would move
    /// them (0 = off; `launch/robustness` uses 1e-6).
    pub logit_noise: f64,
    /// Which draw of that noise (another value, another perturbation).
    pub logit_noise_seed: u64,
    /// The remain step (and the remain Fisher) draws from this many of the
    /// remaining classes, chosen by `run.seed` (0 = all of them, as the
    /// releases do). Retrain and the evaluation keep every class.
    pub remain_classes: u64,
}

impl Default for UnlearnSection {
    fn default() -> Self {
        UnlearnSection {
            method: UnlearnMethod::Sfron,
            from: String::new(),
            batch: 128,
            forget_batch: 128,
            optimizer: OptimizerName::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            log_every: 20,
            eval_every: 0,
            eval_before: true,
            eval_after: true,
            nonfinite: NonFinite::Skip,
            max_skips: 5,
            verify_every: 0,
            snapshot_every: 0,
            logit_noise: 0.0,
            logit_noise_seed: 0,
            remain_classes: 0,
        }
    }
}

/// SFR-on's own keys (DESIGN §1.1-1.2); defaults are the released CIFAR-10 values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SfronSection {
    /// Iterations T (each: a remain step, plus a forget step every `forget_every`).
    pub iterations: u64,
    /// Peak learning rate η (cosine to 0 over the iterations).
    pub lr: f64,
    /// K: a forget step every K iterations.
    pub forget_every: u64,
    /// α: peak forget coefficient (cosine to 0 like the learning rate).
    pub alpha: f64,
    /// c: the forget gradient's global L2 norm is clipped to this (0 = no clipping).
    pub clip: f64,
    /// λ: adaptive weight exponent, c_i = 1/(loss_i^λ + 1e-15) (0 = plain gradient ascent).
    pub lambda: f64,
    /// γ: the hard mask keeps parameters with saliency S >= γ.
    pub gamma: f64,
    /// β: slow-weight interpolation (1 = off, the released setting).
    pub beta: f64,
    pub saliency: SaliencyName,
    /// `soft` saliency: S is clipped to this maximum.
    pub soft_max: f64,
    /// Global batch of the Fisher passes (0 = unlearn.forget_batch).
    pub fisher_batch: u32,
    /// Remain batches the remain Fisher averages (0 = the whole remain set;
    /// more than an epoch's cycle through reshuffled epochs, as the DiT
    /// release's `cycle(DataLoader(shuffle=True))` draws).
    pub fisher_remain_batches: u64,
    /// Forget batches the forget Fisher averages (0 = the whole forget set,
    /// once; N as `fisher_remain_batches`: the DiT release's 2,000 draws).
    pub fisher_forget_batches: u64,
    /// Where the Fisher is cached ("" = <run folder>/fisher.safetensors); reused
    /// only when the original weights, the split and the Fisher settings match.
    pub fisher_cache: String,
    /// Keep BatchNorm running statistics frozen during forget steps (the
    /// released code updates them with forget data; off = released behaviour).
    pub freeze_bn_on_forget: bool,
    /// How the per-sample losses behind the adaptive weights are computed.
    pub loss_precision: LossPrecision,
    /// Added to `ℓ_i^λ` before the reciprocal of the adaptive weights
    /// (classification: 1e-15; the release's DDPM `adaptive_loss`: 1e-8).
    pub weight_eps: f64,
    /// The learning rate over the iterations: `cosine` to 0 (the
    /// classification release) or `constant` (the DDPM and DiT releases).
    pub lr_schedule: DecaySchedule,
    /// α over the iterations: `cosine` to 0 (classification, and DDPM's
    /// `--decay_forget_alpha`) or `constant` (DiT).
    pub alpha_schedule: DecaySchedule,
    /// The remain step's gradient norm is clipped to this (0 = no clipping;
    /// the DDPM release clips it to 1).
    pub remain_clip: f64,
    /// Each Fisher batch's mean gradient is clipped to this L2 norm before
    /// it is squared (0 = no clipping; the DDPM release: 1).
    pub fisher_clip: f64,
    /// A denoiser's Fisher loss uses the guided prediction at this scale
    /// (0 = the conditional prediction; the DDPM release: 2).
    pub fisher_guidance: f64,
}

string_enum! {
    /// How a coefficient moves over a run of iterations.
    DecaySchedule {
        /// `x (1 + cos(π t / T)) / 2`.
        Cosine => "cosine",
        Constant => "constant",
    }
}

impl Default for SfronSection {
    fn default() -> Self {
        SfronSection {
            iterations: 1500,
            lr: 0.01,
            forget_every: 5,
            alpha: 25.0,
            clip: 7.0,
            lambda: 0.5,
            gamma: 1.0,
            beta: 1.0,
            saliency: SaliencyName::Hard,
            soft_max: 100.0,
            fisher_batch: 0,
            fisher_remain_batches: 0,
            fisher_forget_batches: 0,
            fisher_cache: String::new(),
            freeze_bn_on_forget: false,
            loss_precision: LossPrecision::Exact,
            weight_eps: 1e-15,
            lr_schedule: DecaySchedule::Cosine,
            alpha_schedule: DecaySchedule::Cosine,
            remain_clip: 0.0,
            fisher_clip: 0.0,
            fisher_guidance: 0.0,
        }
    }
}

string_enum! {
    /// How SFR-on computes the per-sample forget losses `ℓ_i` that its
    /// adaptive weights `1/(ℓ_i^λ + 1e-15)` and its forget loss use.
    ///
    /// Default `exact`, by measurement (launch/tune-sfron, the table in
    /// configs/mnist.toml): on a confident model many float32 losses are
    /// exactly 0, and which ones depends on the last bits of the logits, so
    /// the released arithmetic swings: the MNIST class-3 study's entropy
    /// MIA was 57.71 ± 19.79 over seeds 0-2 at its best released preset, and
    /// 30.6 against 47.6 between two CPUs; with `exact` and its own preset
    /// 19.33 ± 1.54 (Retrain 16.02), and launch/robustness's spread under
    /// rank, thread, kernel and logit perturbations is in the README. Where
    /// no loss underflows (margins under ~16), the two agree to rounding.
    LossPrecision {
        /// `ℓ_i = log(1 + Σ_{j≠y} exp(z_j − z_y))` in float64 from the
        /// logits: positive and accurate for confident samples.
        Exact => "exact",
        /// float32 cross-entropy as released: exactly 0 once the margin
        /// exceeds about 16.6, where the weight becomes 1e15.
        Released => "released",
    }
}

/// Declares a baseline's section: its learning rate, epochs and schedule,
/// then its own keys. Defaults are the authors' released CIFAR-10 values
/// (DESIGN §1.3).
macro_rules! baseline_section {
    ($(#[$meta:meta])* $name:ident { lr: $lr:expr, epochs: $epochs:expr, schedule: $sched:ident
        $(, $(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr)* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            /// Peak learning rate.
            pub lr: f64,
            /// Passes over the method's data.
            pub epochs: u32,
            pub schedule: EpochSchedule,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    lr: $lr,
                    epochs: $epochs,
                    schedule: EpochSchedule::$sched,
                    $($field: $default,)*
                }
            }
        }
    };
}

baseline_section! {
    /// FT: cross-entropy on the remain set.
    FtSection { lr: 0.01, epochs: 10, schedule: CosineEpochs }
}

baseline_section! {
    /// GA: minimise −CE on the forget set in eval mode, gradient norm clipped.
    GaSection { lr: 1e-4, epochs: 9, schedule: Constant,
        /// Clip the gradient's global L2 norm to this (0 = no clipping).
        clip: f64 = 0.1 }
}

baseline_section! {
    /// RL: CE on the remain set and the forget set relabelled once to a
    /// uniform random wrong class.
    RlSection { lr: 0.003, epochs: 10, schedule: CosineEpochs }
}

baseline_section! {
    /// SalUn: RL with gradients masked to the most forget-salient weights.
    SalunSection { lr: 0.007, epochs: 10, schedule: CosineEpochs,
        /// Share of all weights the mask keeps (largest |Σ_b ∇(−CE)| over the forget set).
        fraction: f64 = 0.2,
        /// Global batch of the saliency pass (0 = unlearn.forget_batch).
        mask_batch: u32 = 0,
        /// Keep masked weights exactly where they are (the released code
        /// masks only the gradient, so weight decay and momentum still move
        /// them: SalUn issue #32). Off = released behaviour.
        freeze_masked: bool = false }
}

baseline_section! {
    /// Bad Teacher: KL to the frozen original on remain samples and to a
    /// freshly initialised model on forget samples.
    BadTeacherSection { lr: 0.02, epochs: 10, schedule: CosineEpochs,
        /// Softmax temperature of both teachers and the student.
        temperature: f64 = 1.0 }
}

baseline_section! {
    /// SCRUB: max-steps (−KL to the original) on the forget set in the first
    /// epochs, min-steps (γ·CE + α·KL) on the remain set every epoch.
    ScrubSection { lr: 8e-5, epochs: 6, schedule: CosineEpochs,
        /// Epochs that start with a max-pass over the forget set.
        max_epochs: u32 = 2,
        /// Weight of the cross-entropy in min-steps.
        gamma: f64 = 0.99,
        /// Weight of the KL to the teacher in min-steps.
        alpha: f64 = 0.001,
        /// Distillation temperature (the KL is scaled by T²).
        temperature: f64 = 4.0 }
}

baseline_section! {
    /// ℓ1-sparse: FT plus α_e ‖θ‖₁, α_e = α (1 − e / (E − no_l1_epochs)).
    L1SparseSection { lr: 0.01, epochs: 10, schedule: CosineEpochs,
        /// Peak ℓ1 coefficient α.
        alpha: f64 = 5e-4,
        /// Final epochs without the penalty.
        no_l1_epochs: u32 = 0 }
}
