//! Subcommands and flags, nothing else.

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::raw::{DeviceKind, LogFormat, LogRanks};

const AFTER_HELP: &str = "\
Exit codes:
  0   done
  2   error (bad input, failed check, a rank panicked or died)
  75  interrupted (SIGTERM/SIGUSR1), checkpoint written: run the same command again to resume

Configuration layers, lowest first: built-in defaults < --config FILE <
environment (SFRON_RUN_ROOT, SFRON_SEED, SFRON_DEVICE, SFRON_THREADS, SFRON_DATA_ROOT,
SFRON_LOG_LEVEL, SFRON_LOG_RANKS, SFRON_LOG_FORMAT) < --set key=value < the
shorthand flags (--device, --threads, --log-ranks, --log-format).
SFRON_COMM=auto|mpi|local chooses the communicator (auto: MPI under mpirun/srun).";

/// sfron: machine unlearning (SFR-on and baselines) as a distributed job.
#[derive(Debug, Parser)]
#[command(name = "sfron", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (layered over the built-in defaults).
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Set one key, e.g. `--set device.threads=4` (repeatable, highest precedence).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Shorthand for `--set device.kind=...`.
    #[arg(long, global = true, value_parser = PossibleValuesParser::new(DeviceKind::NAMES))]
    pub device: Option<String>,
    /// Shorthand for `--set device.threads=N` (CPU threads per rank; 0 = automatic).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<u32>,
    /// Shorthand for `--set log.ranks=...`: `zero` logs warnings only on ranks > 0.
    #[arg(long, global = true, value_parser = PossibleValuesParser::new(LogRanks::NAMES))]
    pub log_ranks: Option<String>,
    /// Shorthand for `--set log.format=...`.
    #[arg(long, global = true, value_parser = PossibleValuesParser::new(LogFormat::NAMES))]
    pub log_format: Option<String>,
    /// Print the resolved configuration and plan, then exit.
    #[arg(long, global = true)]
    pub dry_run: bool,
}

/// `--set` given after the subcommand. (A clap `global` list would let these
/// replace the ones given before the subcommand; both must count.)
#[derive(Debug, Default, Args)]
pub struct MoreSets {
    /// Set one key, e.g. `--set device.threads=4` (repeatable, highest precedence).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl Command {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Doctor(_) => "doctor",
            Command::Split(_) => "split",
            Command::Train(_) => "train",
            Command::Unlearn(_) => "unlearn",
            Command::Eval(_) => "eval",
            Command::Study(_) => "study",
            Command::Sample(_) => "sample",
            Command::Encode(_) => "encode",
            Command::Convert(_) => "convert",
            Command::Bench(_) => "bench",
        }
    }

    /// The `--set`s given after the subcommand, then what its shorthand flags stand for.
    pub fn sets(&self) -> Vec<String> {
        match self {
            Command::Doctor(a) => a.more.sets.clone(),
            Command::Split(a) => a.more.sets.clone(),
            Command::Convert(a) => a.more.sets.clone(),
            Command::Train(a) => {
                let mut sets = a.more.sets.clone();
                sets.extend(a.shorthand_sets());
                sets
            }
            Command::Unlearn(a) => {
                let mut sets = a.more.sets.clone();
                sets.extend(a.shorthand_sets());
                sets
            }
            Command::Bench(BenchCommand::Data(a)) => a.more.sets.clone(),
            Command::Bench(BenchCommand::Step(a)) => a.more.sets.clone(),
            Command::Bench(BenchCommand::Reduce(a)) => a.more.sets.clone(),
            Command::Bench(BenchCommand::ImagenetShape(a)) => a.more.sets.clone(),
            Command::Bench(BenchCommand::Index(a)) => a.more.sets.clone(),
            Command::Eval(a) => {
                let mut sets = a.more.sets.clone();
                if let Some(split) = &a.split {
                    sets.push(format!("data.split={}", split.display()));
                }
                sets
            }
            Command::Study(a) => a.more.sets.clone(),
            Command::Sample(a) => {
                let mut sets = a.more.sets.clone();
                sets.extend(a.shorthand_sets());
                sets
            }
            Command::Encode(a) => {
                let mut sets = a.more.sets.clone();
                if let Some(v) = &a.vae {
                    sets.push(format!("encode.vae={}", v.display()));
                }
                if let Some(o) = &a.out {
                    sets.push(format!("encode.out={}", o.display()));
                }
                sets
            }
        }
    }
}

impl GlobalArgs {
    /// `--set` strings (before, then after the subcommand) followed by the
    /// shorthand flags, lowest precedence first.
    pub fn all_sets(&self, command: &Command) -> Vec<String> {
        let mut sets = self.sets.clone();
        sets.extend(command.sets());
        if let Some(d) = &self.device {
            sets.push(format!("device.kind={d}"));
        }
        if let Some(n) = self.threads {
            sets.push(format!("device.threads={n}"));
        }
        if let Some(r) = &self.log_ranks {
            sets.push(format!("log.ranks={r}"));
        }
        if let Some(f) = &self.log_format {
            sets.push(format!("log.format={f}"));
        }
        sets
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the installation and the job: ranks, hosts, devices, libtorch,
    /// MPI, and a sum, broadcast and agreement across all ranks.
    Doctor(DoctorArgs),
    /// Choose the forget set of the training data and write a split manifest
    /// (JSON) that every later command of the study reads.
    Split(SplitArgs),
    /// Train a model: the original on the whole training set, or Retrain
    /// (`--on remain --split MANIFEST`). Resumes from the run folder's newest
    /// checkpoint; exits 75 after a checkpoint when SIGTERM/SIGUSR1 arrives.
    Train(TrainArgs),
    /// Make a trained model forget the split's forget set (`--method sfron
    /// --from ORIGINAL --split MANIFEST`). Writes the unlearned weights, run
    /// state and metrics to the run folder; resumes and exits 75 like `train`.
    Unlearn(UnlearnArgs),
    /// Evaluate a model on a split (FA, UA, RA, TA, both MIAs, and with
    /// `--reference RETRAIN` the KL/JS and the gaps to it); writes
    /// `eval.json` and the per-example `examples.safetensors`.
    Eval(EvalArgs),
    /// Generate images with a diffusion model (`[sample]`): per class,
    /// seeded, sharded across ranks (the same images for any rank count);
    /// rank 0 writes `samples.safetensors` (uint8 images and labels) and
    /// `grid.png` to the run folder.
    Sample(SampleArgs),
    /// Encode the images of `data.root` (train and test) with a VAE
    /// (`[vae]`, `--vae` weights) into a latent dataset at `--out`
    /// (`data.format = "latents"` reads it): ADM's centre crop to
    /// `encode.image_size`, the posterior moments of each image and its
    /// mirror, sharded across ranks, resumable.
    Encode(EncodeArgs),
    /// The whole study from one config: split, original, Retrain, every
    /// method of `study.methods` per seed of `study.seeds`, evaluations and
    /// the report. Stages whose outputs exist and match are reused.
    Study(StudyArgs),
    /// Convert a checkpoint of the SFR-on authors' released code
    /// (torch.save of their CIFAR ResNet-18's state_dict, or a dict holding
    /// it under "state_dict") to sfron's safetensors: `shortcut` becomes
    /// `downsample`, `linear` becomes `fc`. The model is `model.arch`
    /// (resnet18_cifar; ddpm_unet for the DDPM release's ckpt.pth, with
    /// --ema for its EMA weights; dit for DiT-XL-2-256x256.pt or a DiT
    /// train.py checkpoint, its shape read from the file but for
    /// model.dit.heads); nothing is written unless every tensor fits.
    Convert(ConvertArgs),
    /// Measure a part of sfron (rates, printed as JSON lines).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images per second of the input pipeline on an ImageFolder, for the
    /// ImageNet train and eval transforms.
    Data(BenchDataArgs),
    /// Milliseconds of an SFR-on iteration (forget + remain step) against
    /// bare libtorch's forward+backward+SGD on the same batches; the
    /// model is `model.arch`, the optimizer `unlearn.optimizer`, the step
    /// constants those of `[sfron]`.
    Step(BenchStepArgs),
    /// All-reduce times against the ring model, 1 KiB to 128 MiB, and the
    /// gradient buffers of ResNet-18 and ResNet-50 (run it under mpirun).
    Reduce(BenchReduceArgs),
    /// Write a dataset of ImageNet-1k's shape (1,000 classes, 1,281,167
    /// training and 50,000 validation samples, times --scale) of tiny JPEGs,
    /// as WebDataset tar shards or an ImageFolder.
    ImagenetShape(BenchImagenetShapeArgs),
    /// Time what grows with the dataset (`data.*`): indexing, a split
    /// manifest's check, the sampler's epoch for --ranks world sizes; JSON
    /// lines with the peak resident memory.
    Index(BenchIndexArgs),
}

#[derive(Debug, Args)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Images per rank in each of the forget and remain batches.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Image side in pixels (square).
    #[arg(long, default_value_t = 32)]
    pub image: i64,
    #[arg(long, default_value_t = 3)]
    pub channels: i64,
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    /// Timed iterations.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Time sfron alone (no bare libtorch loop).
    #[arg(long)]
    pub no_bare: bool,
}

#[derive(Debug, Args)]
pub struct BenchReduceArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Buffer sizes in KiB, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,16,64,256,1024,4096,16384,65536,131072"
    )]
    pub kib: Vec<usize>,
    /// Skip the model gradient rows.
    #[arg(long)]
    pub no_models: bool,
}

#[derive(Debug, Args)]
pub struct BenchImagenetShapeArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Where to write train/ and val/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Fraction of ImageNet's size, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// tar (WebDataset shards) or imagefolder.
    #[arg(long, value_enum, default_value_t = crate::bench::scale::ShapeFormat::Tar)]
    pub format: crate::bench::scale::ShapeFormat,
}

#[derive(Debug, Args)]
pub struct BenchIndexArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// A split manifest of the dataset: time reading and checking it.
    #[arg(long, value_name = "MANIFEST")]
    pub split: Option<PathBuf>,
    /// World sizes whose epoch of shares to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    pub ranks: Vec<usize>,
}

#[derive(Debug, Args)]
pub struct BenchDataArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// ImageFolder root (with train/<class>/*.jpg).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// First generate this many ImageNet-like JPEGs under --root (kept for
    /// later runs).
    #[arg(long, value_name = "N")]
    pub generate: Option<usize>,
    /// Images to time per configuration.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Worker counts to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Shorthand for `--set train.on=...`: `all` (the original model) or
    /// `remain` (Retrain on the split's remain set).
    #[arg(long, value_parser = PossibleValuesParser::new(crate::config::raw::TrainOn::NAMES))]
    pub on: Option<String>,
    /// Shorthand for `--set data.split=FILE` (a manifest from `sfron split`).
    #[arg(long, value_name = "MANIFEST")]
    pub split: Option<PathBuf>,
    /// Shorthand for `--set model.init=FILE`: start from these weights.
    #[arg(long, value_name = "WEIGHTS")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// Test-only faults of `train` and `unlearn`, to prove the guards work.
#[derive(Debug, Default, Args, Clone, Copy)]
pub struct FaultArgs {
    /// Test-only: a NaN in rank `--fault-rank`'s gradient at this step.
    #[arg(long, hide = true)]
    pub fault_nan_at: Option<u64>,
    /// Test-only: rank `--fault-rank` sends itself SIGTERM at this step.
    #[arg(long, hide = true)]
    pub fault_signal_at: Option<u64>,
    /// Test-only: rank `--fault-rank` perturbs its weights after this step.
    #[arg(long, hide = true)]
    pub fault_perturb_at: Option<u64>,
    /// Test-only: rank `--fault-rank` sends itself SIGTERM during the remain
    /// Fisher pass (unlearn).
    #[arg(long, hide = true)]
    pub fault_signal_in_fisher: bool,
    /// Test-only: the rank the faults hit.
    #[arg(long, hide = true, default_value_t = 0)]
    pub fault_rank: usize,
}

#[derive(Debug, Default, Args)]
pub struct UnlearnArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Shorthand for `--set unlearn.method=...`.
    #[arg(long, value_parser = PossibleValuesParser::new(crate::config::raw::UnlearnMethod::NAMES))]
    pub method: Option<String>,
    /// Shorthand for `--set unlearn.from=FILE`: the original model's weights.
    #[arg(long, value_name = "WEIGHTS")]
    pub from: Option<PathBuf>,
    /// Shorthand for `--set data.split=FILE` (a manifest from `sfron split`).
    #[arg(long, value_name = "MANIFEST")]
    pub split: Option<PathBuf>,
    /// Write every global batch's sample indices (Fisher passes, forget and
    /// remain steps) to this JSON-lines file (rank 0), for reference checks.
    #[arg(long, hide = true, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    #[command(flatten)]
    pub faults: FaultArgs,
}

impl UnlearnArgs {
    /// The `--set`s these flags stand for.
    pub fn shorthand_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(m) = &self.method {
            sets.push(format!("unlearn.method={m}"));
        }
        if let Some(from) = &self.from {
            sets.push(format!("unlearn.from={}", from.display()));
        }
        if let Some(split) = &self.split {
            sets.push(format!("data.split={}", split.display()));
        }
        sets
    }
}

impl TrainArgs {
    /// The `--set`s these flags stand for.
    pub fn shorthand_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(on) = &self.on {
            sets.push(format!("train.on={on}"));
        }
        if let Some(split) = &self.split {
            sets.push(format!("data.split={}", split.display()));
        }
        if let Some(init) = &self.init {
            sets.push(format!("model.init={}", init.display()));
        }
        sets
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// The weights to evaluate (safetensors).
    #[arg(long, value_name = "WEIGHTS")]
    pub model: PathBuf,
    /// Shorthand for `--set data.split=FILE` (a manifest from `sfron split`).
    #[arg(long, value_name = "MANIFEST")]
    pub split: Option<PathBuf>,
    /// Retrain's weights: adds KL/JS on the forget set and the gaps.
    #[arg(long, value_name = "WEIGHTS")]
    pub reference: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Shorthand for `--set encode.vae=FILE`: the VAE weights (safetensors).
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// Shorthand for `--set encode.out=DIR`: the latent dataset's folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Shorthand for `--set sample.from=PATH`: a weights file or a run folder.
    #[arg(long, value_name = "PATH")]
    pub from: Option<PathBuf>,
    /// Shorthand for `--set sample.weights=...`: a run folder's `ema` or `raw` weights.
    #[arg(long, value_parser = PossibleValuesParser::new(crate::config::raw::SampleWeights::NAMES))]
    pub weights: Option<String>,
    /// Shorthand for `--set sample.per_class=N`.
    #[arg(long, value_name = "N")]
    pub per_class: Option<u64>,
    /// Shorthand for `--set sample.guidance=W`.
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Shorthand for `--set sample.steps=N`.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub steps: Option<i64>,
}

impl SampleArgs {
    pub fn shorthand_sets(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(p) = &self.from {
            sets.push(format!("sample.from={}", p.display()));
        }
        if let Some(w) = &self.weights {
            sets.push(format!("sample.weights={w}"));
        }
        if let Some(n) = self.per_class {
            sets.push(format!("sample.per_class={n}"));
        }
        if let Some(w) = self.guidance {
            sets.push(format!("sample.guidance={w:?}"));
        }
        if let Some(n) = self.steps {
            sets.push(format!("sample.steps={n}"));
        }
        sets
    }
}

#[derive(Debug, Args)]
pub struct StudyArgs {
    #[command(flatten)]
    pub more: MoreSets,
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// `random:FRACTION` (seeded by run.seed), `class:3,5`, or `list:FILE`
    /// (one sample index or id per line).
    #[arg(long, value_name = "SCENARIO")]
    pub scenario: String,
    /// Where to write the manifest [default: <run folder>/split.json].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// The released checkpoint (e.g. ResNet18-CIFAR10.pth).
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Where to write the safetensors weights.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The EMA weights instead of the model's: a DDPM checkpoint's (the
    /// last state_dict of its list) or a DiT train.py checkpoint's ("ema").
    #[arg(long)]
    pub ema: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub more: MoreSets,
    /// Test-only: make one rank fail after the topology exchange.
    #[arg(long, hide = true, value_enum)]
    pub fault: Option<Fault>,
    /// Test-only: the rank that fails (default 1).
    #[arg(long, hide = true, default_value_t = 1)]
    pub fault_rank: usize,
}

/// Faults `doctor --fault` injects, to test that one failing rank ends the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// A Rust panic.
    Panic,
    /// SIGKILL to itself.
    Kill,
    /// An ordinary error return.
    Error,
}
