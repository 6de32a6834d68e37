//! The validated run plan: every cross-field rule and derived value, checked
//! once. Downstream code reads a [`RunPlan`], never the raw configuration.

use std::path::PathBuf;

use super::raw::{
    BatchNormMode, CheckpointSection, CommSection, DataFormat, DataSection, DecaySchedule,
    DeviceKind, DiffusionProcess, DiffusionSection, EncodeSection, EpochSchedule, EvalSection,
    LogSection, LossPrecision, NonFinite, OnCorrupt, OptimizerName, Precision, SaliencyName,
    SampleSection, ScheduleName, Select, StudySection, TrainOn, TransformName, UnlearnMethod,
    VaeSection,
};
use super::{ConfigError, LoadedConfig};
use crate::comm::Topology;
use crate::data::{CorruptPolicy, Format, Transform};
use crate::model::Arch;
use crate::model::dit::DitSpec;
use crate::model::swin::SwinSpec;
use crate::model::unet::UnetSpec;
use crate::model::vit::VitSpec;

/// Libtorch intra-op threads above this are a typo, not a machine.
const MAX_THREADS: u32 = 1024;
/// Decode threads per rank above this are a typo.
const MAX_WORKERS: u32 = 256;

/// Where the data is and how it is read.
#[derive(Clone, Debug)]
pub struct DataPlan {
    pub format: Format,
    pub root: PathBuf,
    /// Train-time and test-time transforms.
    pub train_transform: Transform,
    pub test_transform: Transform,
    pub workers: usize,
    pub prefetch: usize,
    pub on_corrupt: CorruptPolicy,
    pub split: Option<PathBuf>,
    /// `data.train_limit` / `data.test_limit` (None = all).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct RunPlan {
    /// `run.root / run.name`.
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: DeviceKind,
    pub precision: Precision,
    pub channels_last: bool,
    /// `device.recompute` (a DiT only; checked).
    pub recompute: bool,
    pub comm: CommSection,
    /// Libtorch CPU threads for this rank (derived when `device.threads = 0`).
    pub threads: usize,
    pub log: LogSection,
    pub data: DataPlan,
    pub model: ModelPlan,
    /// The diffusion process (read by denoisers only).
    pub diffusion: DiffusionSection,
    pub train: TrainPlan,
    pub checkpoint: CheckpointSection,
    pub unlearn: UnlearnPlan,
    pub sfron: SfronPlan,
    pub baselines: Baselines,
    pub eval: EvalSection,
    /// `sfron sample` (checked: steps within T, guidance ≥ 0, counts ≥ 1).
    pub sample: SampleSection,
    /// The VAE of latent data (`sfron encode`, decoding samples).
    pub vae: VaeSection,
    /// `sfron encode` (checked: a VAE file, an out folder, sizes ≥ 1).
    pub encode: EncodeSection,
    pub study: StudySection,
    pub topology: Topology,
    /// The merged configuration this plan came from (for printing and saving).
    pub config: LoadedConfig,
}

impl RunPlan {
    /// How models compute (`device.precision`, `device.channels_last`,
    /// `device.recompute`).
    pub fn compute(&self) -> crate::model::Compute {
        crate::model::Compute {
            precision: self.precision,
            channels_last: self.channels_last,
            recompute: self.recompute,
        }
    }

    /// Validates `config` for a job of shape `topology`; `cores` is the number
    /// of CPUs this host offers.
    pub fn new(
        config: LoadedConfig,
        topology: &Topology,
        cores: usize,
    ) -> Result<Self, ConfigError> {
        let raw = &config.raw;
        let name = raw.run.name.trim();
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
            return Err(config.key_error(
                "run.name",
                format!(
                    "{:?} is not a folder name: use letters, digits, '-', '_' or '.'",
                    raw.run.name
                ),
            ));
        }
        if raw.run.root.trim().is_empty() {
            return Err(
                config.key_error("run.root", "must name a folder (the default is \"runs\")")
            );
        }
        for (key, mib) in [
            ("comm.bucket_mib", raw.comm.bucket_mib),
            ("comm.first_bucket_mib", raw.comm.first_bucket_mib),
        ] {
            if !(0.0..=4096.0).contains(&mib) {
                return Err(config.key_error(key, format!("{mib} MiB: allowed 0 to 4096")));
            }
        }
        if raw.comm.segment_kib > 1 << 20 {
            return Err(config.key_error(
                "comm.segment_kib",
                format!(
                    "{} KiB: allowed 0 (one call) to 1048576",
                    raw.comm.segment_kib
                ),
            ));
        }
        if raw.comm.bucket_mib > 0.0 && raw.comm.first_bucket_mib == 0.0 {
            return Err(config.key_error(
                "comm.first_bucket_mib",
                "must be above 0 when comm.bucket_mib is (0 is only meaningful for bucket_mib: one call)",
            ));
        }
        if raw.device.threads > MAX_THREADS {
            return Err(config.key_error(
                "device.threads",
                format!(
                    "{} threads per rank: allowed 0 (automatic) to {MAX_THREADS}",
                    raw.device.threads
                ),
            ));
        }
        let threads = match raw.device.threads {
            0 => (cores / topology.local_size.max(1)).max(1),
            n => n as usize,
        };
        let data = data_plan(&config)?;
        let model = model_plan(&config, &data)?;
        let diffusion = diffusion_plan(&config, &model)?;
        if raw.device.recompute && !matches!(model.arch, Arch::Dit(_)) {
            return Err(config.key_error(
                "device.recompute",
                format!(
                    "{} has no blocks to recompute: activation checkpointing is for \
                     model.arch = \"dit\"",
                    model.arch.name()
                ),
            ));
        }
        sample_checks(&config, &diffusion)?;
        diffusion_rl_checks(&config)?;
        sa_checks(&config)?;
        let train = train_plan(&config, &data)?;
        task_checks(&config, &model, &train)?;
        let unlearn = unlearn_plan(&config)?;
        let sfron = sfron_plan(&config, &unlearn)?;
        let baselines = baselines_plan(&config, &unlearn)?;
        if raw.eval.batch == 0 {
            return Err(config.key_error("eval.batch", "must be at least 1"));
        }
        if raw.study.seeds.is_empty() {
            return Err(config.key_error("study.seeds", "name at least one seed"));
        }
        if raw.study.methods.is_empty() {
            return Err(config.key_error("study.methods", "name at least one method"));
        }
        if let Some(m) = repeated(raw.study.methods.iter().map(|m| m.as_str())) {
            return Err(config.key_error("study.methods", format!("{m} is listed twice")));
        }
        if let Some(seed) = repeated(raw.study.seeds.iter()) {
            return Err(config.key_error("study.seeds", format!("seed {seed} is listed twice")));
        }
        if let Err(e) = crate::data::Scenario::parse(&raw.study.scenario, 0) {
            return Err(config.key_error("study.scenario", e.to_string()));
        }
        population_checks(&config, topology)?;
        if raw.checkpoint.keep_last == 0 {
            return Err(config.key_error(
                "checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is what a resume reads)",
            ));
        }
        Ok(RunPlan {
            data,
            model,
            train,
            checkpoint: raw.checkpoint.clone(),
            unlearn,
            sfron,
            baselines,
            eval: raw.eval.clone(),
            sample: raw.sample.clone(),
            vae: raw.vae.clone(),
            encode: raw.encode.clone(),
            diffusion,
            study: raw.study.clone(),
            run_dir: PathBuf::from(&raw.run.root).join(name),
            seed: raw.run.seed,
            device: raw.device.kind,
            precision: raw.device.precision,
            channels_last: raw.device.channels_last,
            recompute: raw.device.recompute,
            comm: raw.comm.clone(),
            threads,
            log: raw.log.clone(),
            topology: topology.clone(),
            config,
        })
    }

    /// What `--dry-run` prints: every key with its origin, then the derived values.
    pub fn describe(&self) -> String {
        let t = &self.topology;
        format!(
            "{}\n# derived\nrun_dir = {:?}\nranks = {}  (this is rank {}, local rank {} of {})\nthreads_per_rank = {}\n",
            self.config.table(),
            self.run_dir.display().to_string(),
            t.size,
            t.rank,
            t.local_rank,
            t.local_size,
            self.threads
        )
    }
}

/// The keys of a population study and of rank groups.
fn population_checks(config: &LoadedConfig, topology: &Topology) -> Result<(), ConfigError> {
    let study = &config.raw.study;
    let group = config.raw.comm.group_size as usize;
    if group > 0 && !topology.size.is_multiple_of(group) {
        return Err(config.key_error(
            "comm.group_size",
            format!(
                "{group} does not divide the job's {} ranks into groups",
                topology.size
            ),
        ));
    }
    if study.population == 1 {
        return Err(config.key_error(
            "study.population",
            "KLoM, U-LiRA and the challenge score compare distributions over models: \
             at least 2 (0: no population)",
        ));
    }
    if study.population == 0 {
        if study.subsample {
            return Err(config.key_error(
                "study.subsample",
                "is for a population study: set study.population",
            ));
        }
        if study.only >= 0 {
            return Err(config.key_error(
                "study.only",
                "is for a population study: set study.population",
            ));
        }
    } else if study.only >= i64::from(study.population) || study.only < -1 {
        return Err(config.key_error(
            "study.only",
            format!(
                "names model {}, but the population has models 0..{}",
                study.only,
                study.population - 1
            ),
        ));
    }
    Ok(())
}

/// The network and where its first weights come from.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    pub arch: Arch,
    pub init: Option<PathBuf>,
    /// Load `init` without its head, a fresh one for the data's classes.
    pub replace_head: bool,
    pub batchnorm: BatchNormPlan,
}

/// `model.batchnorm`, and whether a layer above the defaults set it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormPlan {
    pub mode: BatchNormMode,
    pub explicit: bool,
}

/// The learning-rate rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Cosine,
    /// Linear decay to 0 over the steps after warm-up.
    Linear,
    /// The cosine stepped once per epoch.
    CosineEpochs,
    /// Multiply by `gamma` at each of these epochs.
    Step {
        milestones: Vec<u32>,
        gamma: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerPlan {
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    AdamW {
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    },
}

/// A training recipe (the original model or Retrain), validated.
#[derive(Clone, Debug)]
pub struct TrainPlan {
    pub on_remain: bool,
    pub epochs: u32,
    pub batch: usize,
    pub drop_last: bool,
    pub optimizer: OptimizerPlan,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub max_steps: Option<u64>,
    pub val_fraction: f64,
    pub select: Select,
    pub eval_every: u32,
    pub log_every: u64,
    /// `None`: stop at the first non-finite step; `Some(n)`: skip, stop after n in a row.
    pub max_skips: Option<u32>,
    pub verify_every: u64,
    /// Global gradient-norm clip before each step.
    pub clip: Option<f64>,
}

/// What every unlearning method shares, validated.
#[derive(Clone, Debug)]
pub struct UnlearnPlan {
    pub method: UnlearnMethod,
    /// The original model (required by `unlearn`).
    pub from: Option<PathBuf>,
    pub batch: usize,
    pub forget_batch: usize,
    pub optimizer: OptimizerPlan,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_before: bool,
    pub eval_after: bool,
    pub max_skips: Option<u32>,
    pub verify_every: u64,
    /// Save the weights every this many iterations (0 = never).
    pub snapshot_every: u64,
    /// Relative logit noise of the robustness probe (0 = off).
    pub logit_noise: f64,
    pub logit_noise_seed: u64,
    /// `unlearn.remain_classes` (None = every remaining class).
    pub remain_classes: Option<u64>,
}

/// How the saliency gates the forget gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Saliency {
    /// `M = 1[S >= gamma]`.
    Hard {
        gamma: f64,
    },
    /// `min(S, max)`.
    Soft {
        max: f64,
    },
    None,
}

/// SFR-on's settings, validated (DESIGN §1.1-1.2).
#[derive(Clone, Debug)]
pub struct SfronPlan {
    pub iterations: u64,
    pub lr: f64,
    pub forget_every: u64,
    pub alpha: f64,
    pub clip: Option<f64>,
    pub lambda: f64,
    pub beta: f64,
    pub saliency: Saliency,
    pub fisher_batch: usize,
    pub fisher_remain_batches: Option<u64>,
    pub fisher_forget_batches: Option<u64>,
    /// `None`: `<run folder>/fisher.safetensors`.
    pub fisher_cache: Option<PathBuf>,
    pub freeze_bn_on_forget: bool,
    pub loss_precision: LossPrecision,
    pub weight_eps: f64,
    pub lr_schedule: DecaySchedule,
    pub alpha_schedule: DecaySchedule,
    pub remain_clip: Option<f64>,
    pub fisher_clip: Option<f64>,
    pub fisher_guidance: f64,
}

/// An epoch-based baseline's budget: `epochs` passes over its data at a
/// peak learning rate `lr` moved by `schedule`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochPlan {
    pub lr: f64,
    pub epochs: u32,
    pub schedule: EpochSchedule,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaPlan {
    pub budget: EpochPlan,
    pub clip: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SalunPlan {
    pub budget: EpochPlan,
    pub fraction: f64,
    pub mask_batch: usize,
    pub freeze_masked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadTeacherPlan {
    pub budget: EpochPlan,
    pub temperature: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScrubPlan {
    pub budget: EpochPlan,
    pub max_epochs: u32,
    pub gamma: f64,
    pub alpha: f64,
    pub temperature: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct L1SparsePlan {
    pub budget: EpochPlan,
    pub alpha: f64,
    pub no_l1_epochs: u32,
}

/// The baselines' validated sections (DESIGN §1.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baselines {
    pub ft: EpochPlan,
    pub ga: GaPlan,
    pub rl: EpochPlan,
    pub salun: SalunPlan,
    pub bad_teacher: BadTeacherPlan,
    pub scrub: ScrubPlan,
    pub l1_sparse: L1SparsePlan,
}

/// The optimizer of a `[train]` or `[unlearn]` section, validated.
#[allow(clippy::too_many_arguments)]
fn optimizer_plan(
    config: &LoadedConfig,
    section: &str,
    name: OptimizerName,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    betas: [f64; 2],
    eps: f64,
) -> Result<OptimizerPlan, ConfigError> {
    let unit = |key: &str, v: f64, what: &str| {
        if v.is_finite() && (0.0..1.0).contains(&v) {
            Ok(())
        } else {
            Err(config.key_error(
                &format!("{section}.{key}"),
                format!("{v}: {what} must be in [0, 1)"),
            ))
        }
    };
    unit("momentum", momentum, "momentum")?;
    unit("betas", betas[0], "beta1")?;
    unit("betas", betas[1], "beta2")?;
    if !(eps.is_finite() && eps > 0.0) {
        return Err(config.key_error(&format!("{section}.eps"), "must be a positive number"));
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return Err(config.key_error(&format!("{section}.weight_decay"), "must be 0 or more"));
    }
    if nesterov && (momentum == 0.0 || name != OptimizerName::Sgd) {
        return Err(config.key_error(
            &format!("{section}.nesterov"),
            "Nesterov needs optimizer = \"sgd\" and momentum > 0",
        ));
    }
    Ok(match name {
        OptimizerName::Sgd => OptimizerPlan::Sgd {
            momentum,
            nesterov,
            weight_decay,
        },
        OptimizerName::AdamW => OptimizerPlan::AdamW {
            betas,
            eps,
            weight_decay,
        },
    })
}

fn positive(config: &LoadedConfig, key: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(config.key_error(key, format!("{v} must be a positive number")))
    }
}

fn unlearn_plan(config: &LoadedConfig) -> Result<UnlearnPlan, ConfigError> {
    let u = &config.raw.unlearn;
    if u.batch == 0 {
        return Err(config.key_error("unlearn.batch", "must be at least 1 (the global batch)"));
    }
    if u.forget_batch == 0 {
        return Err(config.key_error("unlearn.forget_batch", "must be at least 1"));
    }
    if !(u.logit_noise.is_finite() && (0.0..=1e-2).contains(&u.logit_noise)) {
        return Err(config.key_error(
            "unlearn.logit_noise",
            format!(
                "{}: must be in [0, 0.01] (a perturbation probe; 0 = off)",
                u.logit_noise
            ),
        ));
    }
    let optimizer = optimizer_plan(
        config,
        "unlearn",
        u.optimizer,
        u.momentum,
        u.nesterov,
        u.weight_decay,
        u.betas,
        u.eps,
    )?;
    Ok(UnlearnPlan {
        method: u.method,
        from: (!u.from.trim().is_empty()).then(|| PathBuf::from(&u.from)),
        batch: u.batch as usize,
        forget_batch: u.forget_batch as usize,
        optimizer,
        log_every: u.log_every.max(1) as u64,
        eval_every: u.eval_every,
        eval_before: u.eval_before,
        eval_after: u.eval_after,
        max_skips: match u.nonfinite {
            NonFinite::Skip => Some(u.max_skips.max(1)),
            NonFinite::Error => None,
        },
        verify_every: u.verify_every,
        snapshot_every: u.snapshot_every,
        logit_noise: u.logit_noise,
        logit_noise_seed: u.logit_noise_seed,
        remain_classes: (u.remain_classes > 0).then_some(u.remain_classes),
    })
}

fn sfron_plan(config: &LoadedConfig, unlearn: &UnlearnPlan) -> Result<SfronPlan, ConfigError> {
    let s = &config.raw.sfron;
    positive(config, "sfron.lr", s.lr)?;
    if s.iterations == 0 {
        return Err(config.key_error("sfron.iterations", "must be at least 1"));
    }
    if s.forget_every == 0 {
        return Err(config.key_error("sfron.forget_every", "must be at least 1"));
    }
    if !(s.alpha.is_finite() && s.alpha >= 0.0) {
        return Err(config.key_error("sfron.alpha", "must be 0 or more"));
    }
    if !(s.clip.is_finite() && s.clip >= 0.0) {
        return Err(config.key_error("sfron.clip", "must be 0 (no clipping) or more"));
    }
    if !(s.lambda.is_finite() && s.lambda >= 0.0) {
        return Err(config.key_error("sfron.lambda", "must be 0 or more"));
    }
    if !(s.beta.is_finite() && s.beta > 0.0 && s.beta <= 1.0) {
        return Err(config.key_error("sfron.beta", format!("{}: must be in (0, 1]", s.beta)));
    }
    positive(config, "sfron.gamma", s.gamma)?;
    positive(config, "sfron.soft_max", s.soft_max)?;
    for (key, v) in [
        ("sfron.remain_clip", s.remain_clip),
        ("sfron.fisher_clip", s.fisher_clip),
        ("sfron.fisher_guidance", s.fisher_guidance),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(config.key_error(key, "must be 0 (no clipping) or more"));
        }
    }
    if !(s.weight_eps.is_finite() && s.weight_eps > 0.0) {
        return Err(config.key_error(
            "sfron.weight_eps",
            format!("{}: must be above 0", s.weight_eps),
        ));
    }
    Ok(SfronPlan {
        iterations: s.iterations,
        lr: s.lr,
        forget_every: s.forget_every,
        alpha: s.alpha,
        clip: (s.clip > 0.0).then_some(s.clip),
        lambda: s.lambda,
        beta: s.beta,
        saliency: match s.saliency {
            SaliencyName::Hard => Saliency::Hard { gamma: s.gamma },
            SaliencyName::Soft => Saliency::Soft { max: s.soft_max },
            SaliencyName::None => Saliency::None,
        },
        fisher_batch: match s.fisher_batch {
            0 => unlearn.forget_batch,
            n => n as usize,
        },
        fisher_remain_batches: (s.fisher_remain_batches > 0).then_some(s.fisher_remain_batches),
        fisher_forget_batches: (s.fisher_forget_batches > 0).then_some(s.fisher_forget_batches),
        fisher_cache: (!s.fisher_cache.trim().is_empty()).then(|| PathBuf::from(&s.fisher_cache)),
        freeze_bn_on_forget: s.freeze_bn_on_forget,
        loss_precision: s.loss_precision,
        weight_eps: s.weight_eps,
        lr_schedule: s.lr_schedule,
        alpha_schedule: s.alpha_schedule,
        remain_clip: (s.remain_clip > 0.0).then_some(s.remain_clip),
        fisher_clip: (s.fisher_clip > 0.0).then_some(s.fisher_clip),
        fisher_guidance: s.fisher_guidance,
    })
}

fn epoch_plan(
    config: &LoadedConfig,
    section: &str,
    lr: f64,
    epochs: u32,
    schedule: EpochSchedule,
) -> Result<EpochPlan, ConfigError> {
    positive(config, &format!("{section}.lr"), lr)?;
    if epochs == 0 {
        return Err(config.key_error(&format!("{section}.epochs"), "must be at least 1"));
    }
    Ok(EpochPlan {
        lr,
        epochs,
        schedule,
    })
}

fn baselines_plan(config: &LoadedConfig, unlearn: &UnlearnPlan) -> Result<Baselines, ConfigError> {
    let r = &config.raw;
    let non_negative = |key: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(config.key_error(key, format!("{v} must be 0 or more")))
        }
    };
    non_negative("ga.clip", r.ga.clip)?;
    if !(r.salun.fraction.is_finite() && r.salun.fraction > 0.0 && r.salun.fraction <= 1.0) {
        return Err(config.key_error(
            "salun.fraction",
            format!(
                "{}: the share of weights kept must be in (0, 1]",
                r.salun.fraction
            ),
        ));
    }
    positive(config, "bad_teacher.temperature", r.bad_teacher.temperature)?;
    positive(config, "scrub.temperature", r.scrub.temperature)?;
    non_negative("scrub.gamma", r.scrub.gamma)?;
    non_negative("scrub.alpha", r.scrub.alpha)?;
    non_negative("l1_sparse.alpha", r.l1_sparse.alpha)?;
    if r.l1_sparse.no_l1_epochs > r.l1_sparse.epochs {
        return Err(config.key_error(
            "l1_sparse.no_l1_epochs",
            format!(
                "more than the {} epochs (l1_sparse.epochs)",
                r.l1_sparse.epochs
            ),
        ));
    }
    Ok(Baselines {
        ft: epoch_plan(config, "ft", r.ft.lr, r.ft.epochs, r.ft.schedule)?,
        ga: GaPlan {
            budget: epoch_plan(config, "ga", r.ga.lr, r.ga.epochs, r.ga.schedule)?,
            clip: (r.ga.clip > 0.0).then_some(r.ga.clip),
        },
        rl: epoch_plan(config, "rl", r.rl.lr, r.rl.epochs, r.rl.schedule)?,
        salun: SalunPlan {
            budget: epoch_plan(
                config,
                "salun",
                r.salun.lr,
                r.salun.epochs,
                r.salun.schedule,
            )?,
            fraction: r.salun.fraction,
            mask_batch: match r.salun.mask_batch {
                0 => unlearn.forget_batch,
                n => n as usize,
            },
            freeze_masked: r.salun.freeze_masked,
        },
        bad_teacher: BadTeacherPlan {
            budget: epoch_plan(
                config,
                "bad_teacher",
                r.bad_teacher.lr,
                r.bad_teacher.epochs,
                r.bad_teacher.schedule,
            )?,
            temperature: r.bad_teacher.temperature,
        },
        scrub: ScrubPlan {
            budget: epoch_plan(
                config,
                "scrub",
                r.scrub.lr,
                r.scrub.epochs,
                r.scrub.schedule,
            )?,
            max_epochs: r.scrub.max_epochs,
            gamma: r.scrub.gamma,
            alpha: r.scrub.alpha,
            temperature: r.scrub.temperature,
        },
        l1_sparse: L1SparsePlan {
            budget: epoch_plan(
                config,
                "l1_sparse",
                r.l1_sparse.lr,
                r.l1_sparse.epochs,
                r.l1_sparse.schedule,
            )?,
            alpha: r.l1_sparse.alpha,
            no_l1_epochs: r.l1_sparse.no_l1_epochs,
        },
    })
}

fn model_plan(config: &LoadedConfig, data: &DataPlan) -> Result<ModelPlan, ConfigError> {
    let m = &config.raw.model;
    if !(m.width.is_finite() && m.width > 0.0 && m.width <= 16.0) {
        return Err(config.key_error(
            "model.width",
            format!(
                "{} is not a width multiplier: use a number in (0, 16]",
                m.width
            ),
        ));
    }
    let arch = Arch::parse(&m.arch, m.width).ok_or_else(|| {
        config.key_error(
            "model.arch",
            format!(
                "{:?} is not in the zoo: expected one of {}",
                m.arch,
                Arch::NAMES.join(", ")
            ),
        )
    })?;
    let arch = match arch {
        Arch::Unet(_) => {
            let u = &m.unet;
            let height = square_side(config, data, "ddpm_unet takes square images")?;
            let spec = UnetSpec {
                ch: u.ch,
                ch_mult: u.ch_mult.clone(),
                num_res_blocks: u.num_res_blocks,
                attn_resolutions: u.attn_resolutions.clone(),
                dropout: u.dropout,
                resolution: height as i64,
                resamp_with_conv: u.resamp_with_conv,
                groups: u.groups,
            };
            spec.check()
                .map_err(|e| config.key_error("model.unet", e))?;
            Arch::Unet(spec)
        }
        Arch::Dit(_) => Arch::Dit(dit_spec(config, data)?),
        Arch::Vit(named) => Arch::Vit(vit_spec(config, data, named)?),
        Arch::Swin(named) => Arch::Swin(swin_spec(config, data, named)?),
        Arch::Resnet9 => {
            // Its stride-2 conv and max-pool quarter the side, then a 3x3
            // convolution without padding needs 3 pixels.
            let [_, height, width] = data.train_transform.shape;
            if height.min(width) < 11 {
                return Err(config.key_error(
                    "model.arch",
                    format!(
                        "resnet9 needs images of at least 11x11 (its unpadded 3x3 \
                         convolution sees a quarter of the side); the data's are {height}x{width}"
                    ),
                ));
            }
            Arch::Resnet9
        }
        other => other,
    };
    let init = (!m.init.trim().is_empty()).then(|| PathBuf::from(&m.init));
    if m.replace_head && (init.is_none() || arch.head().is_none()) {
        return Err(config.key_error(
            "model.replace_head",
            match arch.head() {
                None => format!("{} has no classification head to replace", arch.name()),
                Some(_) => "replaces the head of model.init's weights: set model.init".into(),
            },
        ));
    }
    Ok(ModelPlan {
        arch,
        init,
        replace_head: m.replace_head,
        batchnorm: BatchNormPlan {
            mode: m.batchnorm,
            explicit: config.origin("model.batchnorm") != super::DEFAULT_ORIGIN,
        },
    })
}

/// The data's image side, which `what` (a model that "takes square
/// images") needs square: else an error on `model.arch`.
fn square_side(config: &LoadedConfig, data: &DataPlan, what: &str) -> Result<usize, ConfigError> {
    let [_, height, width] = data.train_transform.shape;
    if height != width {
        return Err(config.key_error(
            "model.arch",
            format!("{what}; the data's are {height}x{width}"),
        ));
    }
    Ok(height)
}

/// A shape override: 0 keeps the named model's value.
fn or_named(v: i64, named: i64) -> i64 {
    if v == 0 { named } else { v }
}

/// `dit`'s shape: `[model.dit]`'s named model with its overrides, on the
/// data's (square) side; channels and classes are the data's, set when the
/// model is built ([`crate::model::Model::new`]).
fn dit_spec(config: &LoadedConfig, data: &DataPlan) -> Result<DitSpec, ConfigError> {
    let d = &config.raw.model.dit;
    let named = DitSpec::named(&d.name).map_err(|e| config.key_error("model.dit.name", e))?;
    let channels = data.train_transform.shape[0];
    let height = square_side(config, data, "dit takes square inputs")?;
    let spec = DitSpec {
        depth: or_named(d.depth, named.depth),
        hidden: or_named(d.hidden, named.hidden),
        heads: or_named(d.heads, named.heads),
        patch: or_named(d.patch, named.patch),
        mlp_ratio: if d.mlp_ratio == 0.0 {
            named.mlp_ratio
        } else {
            d.mlp_ratio
        },
        input_size: height as i64,
        in_channels: channels as i64,
        learn_sigma: d.learn_sigma,
        class_dropout_prob: config.raw.diffusion.cond_drop,
        ..named
    };
    spec.check().map_err(|e| config.key_error("model.dit", e))?;
    Ok(spec)
}

/// A ViT's shape: its builder's (`named`, from `model.arch`) with
/// `[model.vit]`'s overrides, on the data's (square) side, which the patch
/// must divide.
fn vit_spec(
    config: &LoadedConfig,
    data: &DataPlan,
    named: VitSpec,
) -> Result<VitSpec, ConfigError> {
    let v = &config.raw.model.vit;
    let height = square_side(config, data, "a ViT takes square images")?;
    let spec = VitSpec {
        patch: or_named(v.patch, named.patch),
        image_size: height as i64,
        depth: or_named(v.depth, named.depth),
        heads: or_named(v.heads, named.heads),
        hidden: or_named(v.hidden, named.hidden),
        mlp_dim: or_named(v.mlp_dim, named.mlp_dim),
    };
    spec.check().map_err(|e| config.key_error("model.vit", e))?;
    Ok(spec)
}

/// A Swin's shape: its builder's (`named`, from `model.arch`) with
/// `[model.swin]`'s overrides, on the data's (square) side, which the
/// patches, mergings and windows must tile.
fn swin_spec(
    config: &LoadedConfig,
    data: &DataPlan,
    named: SwinSpec,
) -> Result<SwinSpec, ConfigError> {
    let v = &config.raw.model.swin;
    let height = square_side(config, data, "a Swin takes square images")?;
    let or_list = |v: &Vec<i64>, named: Vec<i64>| if v.is_empty() { named } else { v.clone() };
    let spec = SwinSpec {
        patch: or_named(v.patch, named.patch),
        embed_dim: or_named(v.embed_dim, named.embed_dim),
        depths: or_list(&v.depths, named.depths),
        heads: or_list(&v.heads, named.heads),
        window: or_named(v.window, named.window),
        mlp_ratio: if v.mlp_ratio == 0.0 {
            named.mlp_ratio
        } else {
            v.mlp_ratio
        },
        stochastic_depth_prob: if v.stochastic_depth_prob < 0.0 {
            named.stochastic_depth_prob
        } else {
            v.stochastic_depth_prob
        },
        image_size: height as i64,
    };
    spec.check()
        .map_err(|e| config.key_error("model.swin", e))?;
    Ok(spec)
}

/// What a task needs of the rest of the configuration: a denoiser reads
/// images in [−1, 1] and has no accuracy to choose an epoch by.
fn task_checks(
    config: &LoadedConfig,
    model: &ModelPlan,
    train: &TrainPlan,
) -> Result<(), ConfigError> {
    if model.arch.task() != crate::model::Task::Denoise {
        return Ok(());
    }
    let transform = config.raw.data.transform;
    let latents = config.raw.data.format == DataFormat::Latents;
    if !latents
        && !matches!(
            transform,
            TransformName::Diffusion | TransformName::DiffusionFlip
        )
    {
        return Err(config.key_error(
            "data.transform",
            format!(
                "{:?} normalises for a classifier; {} reads pixels in [-1, 1]: use \
                 \"diffusion\" (or \"diffusion_flip\" for the release's CIFAR-10 flips)",
                transform.as_str(),
                model.arch.name()
            ),
        ));
    }
    let guided = config.raw.sample.guidance > 0.0 || config.raw.sfron.fisher_guidance > 0.0;
    if matches!(model.arch, Arch::Dit(_)) && config.raw.diffusion.cond_drop == 0.0 && guided {
        return Err(config.key_error(
            "diffusion.cond_drop",
            "0 leaves the DiT without a null class, which classifier-free guidance \
             (sample.guidance, sfron.fisher_guidance) needs: set those to 0 or cond_drop above 0",
        ));
    }
    if train.select != Select::Last {
        return Err(config.key_error(
            "train.select",
            format!(
                "{:?} chooses an epoch by accuracy; a diffusion model has none: use \"last\"",
                train.select.as_str()
            ),
        ));
    }
    Ok(())
}

fn sa_checks(config: &LoadedConfig) -> Result<(), ConfigError> {
    let a = &config.raw.sa;
    for (key, v) in [
        ("sa.iterations", a.iterations),
        ("sa.per_class", a.per_class),
        ("sa.fisher_timesteps", a.fisher_timesteps),
        ("sa.fisher_batch", a.fisher_batch),
    ] {
        if v == 0 {
            return Err(config.key_error(key, "must be at least 1"));
        }
    }
    positive(config, "sa.lr", a.lr)?;
    let t = config.raw.diffusion.timesteps;
    if !(0..=t).contains(&a.sample_steps) {
        return Err(config.key_error(
            "sa.sample_steps",
            format!(
                "{}: 0 (= sample.steps) to diffusion.timesteps = {t}",
                a.sample_steps
            ),
        ));
    }
    for (key, v) in [
        ("sa.gamma", a.gamma),
        ("sa.lambda", a.lambda),
        ("sa.clip", a.clip),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(config.key_error(key, format!("{v}: must be 0 or more")));
        }
    }
    if !(0.0..1.0).contains(&a.ema_decay) {
        return Err(config.key_error(
            "sa.ema_decay",
            format!("{}: a decay in [0, 1)", a.ema_decay),
        ));
    }
    Ok(())
}

fn diffusion_rl_checks(config: &LoadedConfig) -> Result<(), ConfigError> {
    let d = &config.raw.diffusion_rl;
    if d.iterations == 0 {
        return Err(config.key_error("diffusion_rl.iterations", "must be at least 1"));
    }
    positive(config, "diffusion_rl.lr", d.lr)?;
    if d.label_offset < 1 {
        return Err(config.key_error(
            "diffusion_rl.label_offset",
            format!(
                "{}: the pseudo label is another class, use 1 or more",
                d.label_offset
            ),
        ));
    }
    for (key, v) in [
        ("diffusion_rl.forget_alpha", d.forget_alpha),
        ("diffusion_rl.remain_alpha", d.remain_alpha),
        ("diffusion_rl.clip", d.clip),
        ("diffusion_rl.mask_guidance", d.mask_guidance),
        ("diffusion_rl.mask_clip", d.mask_clip),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(config.key_error(key, format!("{v}: must be 0 or more")));
        }
    }
    if !(d.mask_fraction > 0.0 && d.mask_fraction <= 1.0) {
        return Err(config.key_error(
            "diffusion_rl.mask_fraction",
            format!("{}: a share of the weights in (0, 1]", d.mask_fraction),
        ));
    }
    Ok(())
}

fn sample_checks(config: &LoadedConfig, diffusion: &DiffusionSection) -> Result<(), ConfigError> {
    let s = &config.raw.sample;
    if s.steps < 1 || s.steps > diffusion.timesteps {
        return Err(config.key_error(
            "sample.steps",
            format!(
                "{} timesteps to visit: use 1 to diffusion.timesteps ({})",
                s.steps, diffusion.timesteps
            ),
        ));
    }
    if !(s.guidance.is_finite() && s.guidance >= 0.0) {
        return Err(config.key_error(
            "sample.guidance",
            format!(
                "{}: a guidance scale is 0 (conditional only) or more",
                s.guidance
            ),
        ));
    }
    if !(s.eta.is_finite() && s.eta >= 0.0) {
        return Err(config.key_error("sample.eta", format!("{}: use 0 or more", s.eta)));
    }
    for (key, v) in [("sample.per_class", s.per_class), ("sample.batch", s.batch)] {
        if v == 0 {
            return Err(config.key_error(key, "must be at least 1"));
        }
    }
    if let Some(c) = s.classes.iter().find(|&&c| c < 0) {
        return Err(config.key_error("sample.classes", format!("{c} is not a class")));
    }
    Ok(())
}

/// `[diffusion]` checked, its `process` resolved (`auto`: ADM's for a DiT,
/// the release's otherwise).
fn diffusion_plan(
    config: &LoadedConfig,
    model: &ModelPlan,
) -> Result<DiffusionSection, ConfigError> {
    let mut d = config.raw.diffusion.clone();
    if d.process == DiffusionProcess::Auto {
        d.process = match model.arch {
            Arch::Dit(_) => DiffusionProcess::Adm,
            _ => DiffusionProcess::Release,
        };
    }
    if model.arch.learns_sigma() && d.process != DiffusionProcess::Adm {
        return Err(config.key_error(
            "diffusion.process",
            format!(
                "{:?}: a DiT with learn_sigma predicts its variance, which only ADM's process \
                 trains and samples with: use \"adm\" (or model.dit.learn_sigma = false)",
                d.process.as_str()
            ),
        ));
    }
    let d = &d;
    if d.timesteps < 1 {
        return Err(config.key_error("diffusion.timesteps", "must be at least 1"));
    }
    for (key, v) in [
        ("diffusion.beta_start", d.beta_start),
        ("diffusion.beta_end", d.beta_end),
    ] {
        if !(v > 0.0 && v < 1.0) {
            return Err(config.key_error(key, format!("{v}: a variance in (0, 1)")));
        }
    }
    for (key, v) in [
        ("diffusion.cond_drop", d.cond_drop),
        ("diffusion.ema_decay", d.ema_decay),
        ("diffusion.unlearn_ema_decay", d.unlearn_ema_decay),
    ] {
        if !(0.0..1.0).contains(&v) {
            return Err(config.key_error(key, format!("{v}: use [0, 1)")));
        }
    }
    Ok(d.clone())
}

fn train_plan(config: &LoadedConfig, data: &DataPlan) -> Result<TrainPlan, ConfigError> {
    let t = &config.raw.train;
    let unit = |key: &str, v: f64, what: &str| {
        if v.is_finite() && (0.0..1.0).contains(&v) {
            Ok(())
        } else {
            Err(config.key_error(key, format!("{v}: {what} must be in [0, 1)")))
        }
    };
    positive(config, "train.lr", t.lr)?;
    if !(t.clip.is_finite() && t.clip >= 0.0) {
        return Err(config.key_error("train.clip", "must be 0 (no clipping) or more"));
    }
    unit("train.val_fraction", t.val_fraction, "a fraction")?;
    positive(config, "train.gamma", t.gamma)?;
    if t.epochs == 0 {
        return Err(config.key_error("train.epochs", "must be at least 1"));
    }
    if t.batch == 0 {
        return Err(config.key_error("train.batch", "must be at least 1 (the global batch)"));
    }
    if t.schedule == ScheduleName::Step && t.milestones.windows(2).any(|w| w[0] >= w[1]) {
        return Err(config.key_error("train.milestones", "epochs must be increasing"));
    }
    let on_remain = t.on == TrainOn::Remain;
    if on_remain && data.split.is_none() {
        return Err(config.key_error(
            "train.on",
            "\"remain\" (Retrain) needs a split: pass --split MANIFEST or set data.split",
        ));
    }
    if t.select == Select::Val && t.val_fraction <= 0.0 {
        return Err(config.key_error(
            "train.select",
            "\"val\" chooses on held-out validation samples: set train.val_fraction > 0 \
             (or select \"last\")",
        ));
    }
    let optimizer = optimizer_plan(
        config,
        "train",
        t.optimizer,
        t.momentum,
        t.nesterov,
        t.weight_decay,
        t.betas,
        t.eps,
    )?;
    Ok(TrainPlan {
        on_remain,
        epochs: t.epochs,
        batch: t.batch as usize,
        drop_last: t.drop_last,
        optimizer,
        lr: t.lr,
        schedule: match t.schedule {
            ScheduleName::Constant => Schedule::Constant,
            ScheduleName::Cosine => Schedule::Cosine,
            ScheduleName::Linear => Schedule::Linear,
            ScheduleName::CosineEpochs => Schedule::CosineEpochs,
            ScheduleName::Step => Schedule::Step {
                milestones: t.milestones.clone(),
                gamma: t.gamma,
            },
        },
        warmup_steps: t.warmup_steps as u64,
        max_steps: (t.max_steps > 0).then_some(t.max_steps),
        val_fraction: t.val_fraction,
        select: t.select,
        eval_every: t.eval_every,
        log_every: t.log_every.max(1) as u64,
        max_skips: match t.nonfinite {
            NonFinite::Skip => Some(t.max_skips.max(1)),
            NonFinite::Error => None,
        },
        verify_every: t.verify_every,
        clip: (t.clip > 0.0).then_some(t.clip),
    })
}

fn data_plan(config: &LoadedConfig) -> Result<DataPlan, ConfigError> {
    let d = &config.raw.data;
    if d.root.trim().is_empty() {
        return Err(config.key_error("data.root", "must name the dataset folder"));
    }
    if d.prefetch == 0 {
        return Err(config.key_error("data.prefetch", "must be at least 1 (batches read ahead)"));
    }
    if d.workers > MAX_WORKERS {
        return Err(config.key_error(
            "data.workers",
            format!("{} decode threads: allowed 0 to {MAX_WORKERS}", d.workers),
        ));
    }
    let format = match d.format {
        DataFormat::Mnist => Format::Mnist,
        DataFormat::Cifar10 => Format::Cifar10,
        DataFormat::Cifar100 => Format::Cifar100,
        DataFormat::ImageFolder => Format::ImageFolder,
        DataFormat::Tar => Format::Tar,
        DataFormat::Latents => Format::Latents,
    };
    if format == Format::Latents {
        return latent_data_plan(config, d);
    }
    let pick = |train: bool| match d.transform {
        TransformName::Auto => crate::data::default_transform(format, train),
        TransformName::Mnist => Transform::mnist(),
        TransformName::Cifar10 => Transform::cifar(train, false),
        TransformName::Cifar10Released => Transform::cifar10_released(train),
        TransformName::Cifar100 => Transform::cifar(train, true),
        TransformName::ImageNet => Transform::imagenet(train),
        TransformName::TinyImageNet => Transform::tinyimagenet(train),
        TransformName::Diffusion => {
            Transform::diffusion(crate::data::default_transform(format, false).shape, false)
        }
        TransformName::DiffusionFlip => {
            Transform::diffusion(crate::data::default_transform(format, false).shape, train)
        }
    };
    let fixed_size = matches!(format, Format::Mnist | Format::Cifar10 | Format::Cifar100);
    let train_transform = pick(true);
    if fixed_size && train_transform.shape != crate::data::default_transform(format, true).shape {
        return Err(config.key_error(
            "data.transform",
            format!(
                "{:?} does not fit {} images; use \"auto\"",
                d.transform.as_str(),
                format.name()
            ),
        ));
    }
    Ok(DataPlan {
        format,
        root: PathBuf::from(&d.root),
        train_transform,
        test_transform: pick(false),
        ..data_common(d)
    })
}

/// A latent dataset's plan: its transform from its index (the train part's;
/// the test part must agree when it is opened).
fn latent_data_plan(config: &LoadedConfig, d: &DataSection) -> Result<DataPlan, ConfigError> {
    if d.transform != TransformName::Auto {
        return Err(config.key_error(
            "data.transform",
            format!(
                "{:?}: a latent dataset draws its latents as encoded; use \"auto\"",
                d.transform.as_str()
            ),
        ));
    }
    let root = PathBuf::from(&d.root);
    // The index's shape once `sfron encode` has run; before (a dry run, a
    // convert, the encode itself), the one [vae] and [encode] would give.
    // Opening the data names the missing index.
    let t = match crate::data::latents::read_index(&root.join("train")) {
        Ok(index) => Transform::latent(
            index.latent_channels,
            index.latent_side,
            index.scaling_factor,
        ),
        Err(_) => {
            let v = &config.raw.vae;
            let levels = v.block_out.len().max(1) as u32;
            let side = config.raw.encode.image_size as usize >> (levels - 1);
            Transform::latent(
                v.latent_channels.max(1) as usize,
                side.max(1),
                v.scaling_factor,
            )
        }
    };
    Ok(DataPlan {
        format: Format::Latents,
        root,
        train_transform: t.clone(),
        test_transform: t,
        ..data_common(d)
    })
}

/// The settings every data plan shares (format, root and transforms are
/// the caller's).
fn data_common(d: &DataSection) -> DataPlan {
    DataPlan {
        format: Format::Mnist,
        root: PathBuf::new(),
        train_transform: Transform::mnist(),
        test_transform: Transform::mnist(),
        workers: d.workers as usize,
        prefetch: d.prefetch as usize,
        on_corrupt: match d.on_corrupt {
            OnCorrupt::Error => CorruptPolicy::Error,
            OnCorrupt::Skip => CorruptPolicy::Skip,
        },
        split: (!d.split.trim().is_empty()).then(|| PathBuf::from(&d.split)),
        train_limit: (d.train_limit > 0).then_some(d.train_limit as usize),
        test_limit: (d.test_limit > 0).then_some(d.test_limit as usize),
    }
}

/// The first item that appears a second time.
fn repeated<T: Ord>(items: impl IntoIterator<Item = T>) -> Option<T> {
    let mut seen = std::collections::BTreeSet::new();
    items.into_iter().find_map(|item| {
        if seen.contains(&item) {
            Some(item)
        } else {
            seen.insert(item);
            None
        }
    })
}
