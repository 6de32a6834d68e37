//! From parsed arguments to an exit code: set up the world, resolve the
//! configuration, start logging, run the command, and make sure one rank's
//! failure ends every rank.

use anyhow::{Context, Result};

use crate::cli::{BenchCommand, Cli, Command};
use crate::comm::{Comm, CommMode};
use crate::config::{self, Layers, RunPlan};
use crate::rundir::{self, Faults, RunLock, Status};
use crate::train;
use crate::{bench, device, doctor, eval, exit, fsx, sample, split, study, telemetry, unlearn};

/// Runs the command and returns the process exit code (see [`crate::exit`]).
pub fn run(cli: Cli) -> i32 {
    let comm = match CommMode::from_env().and_then(Comm::init) {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("sfron: error: {e}");
            return exit::ERROR;
        }
    };
    match run_in_world(&comm, &cli) {
        Ok(Status::Done) => exit::OK,
        Ok(Status::Preempted) => exit::RESUMABLE,
        Err(e) => {
            eprintln!("sfron: error (rank {}): {e:#}", comm.rank());
            if comm.size() > 1 {
                // The other ranks may be waiting in a collective: end them too.
                comm.abort(exit::ERROR);
            }
            exit::ERROR
        }
    }
    // `comm` drops here: MPI is finalised after every rank returned.
}

fn run_in_world(comm: &Comm, cli: &Cli) -> Result<Status> {
    let layers = Layers {
        file: cli.global.config.clone(),
        env: Layers::env_from_process(),
        sets: cli.global.all_sets(&cli.command),
    };
    let loaded = config::load(&layers)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let plan = RunPlan::new(loaded, comm.topology(), cores)?;
    comm.set_segment_bytes(plan.comm.segment_kib as usize * 1024);
    if cli.global.dry_run {
        if comm.is_root() {
            print!("{}", plan.describe());
        }
        return Ok(Status::Done);
    }
    require_task(&plan, &cli.command)?;
    let span = telemetry::init(&plan.log, comm.rank());
    let _entered = span.enter();
    let device = device::select(&plan)?;
    tracing::info!(ranks = comm.size(), backend = comm.backend(), device = %device::describe(device), "started");
    if plan.comm.group_size > 0
        && !(matches!(cli.command, Command::Study(_)) && plan.study.population > 0)
    {
        anyhow::bail!(
            "comm.group_size splits the job into groups for a population study \
             (study.population); sfron {} runs one model on all ranks: unset comm.group_size",
            cli.command.name()
        );
    }
    // Every command that writes the run folder holds it for the whole job;
    // a population study's jobs share its folder and claim its items one by
    // one instead (several jobs of a SLURM array may work on it at once).
    let _lock = match &cli.command {
        Command::Bench(_) | Command::Convert(_) => None,
        Command::Study(_) if plan.study.population > 0 => None,
        other => Some(RunLock::acquire(
            comm,
            &plan.run_dir,
            &format!("sfron {}", other.name()),
        )?),
    };
    match &cli.command {
        Command::Train(args) => {
            return train::run(comm, &plan, device, Faults::from_args(&args.faults));
        }
        Command::Unlearn(args) => {
            return unlearn::run(comm, &plan, device, args);
        }
        Command::Eval(args) => {
            return eval::run(comm, &plan, device, args);
        }
        Command::Study(_) => {
            return study::run(comm, &plan, &layers, device);
        }
        Command::Sample(_) => {
            return sample::run(comm, &plan, device);
        }
        Command::Encode(_) => {
            return crate::encode::run(comm, &plan, device);
        }
        Command::Doctor(args) => {
            let report = doctor::run(comm, &plan, device, args)?;
            if comm.is_root() {
                print!("{report}");
                save_run_files(&plan, &[("doctor.txt", report.as_bytes())])?;
            }
        }
        Command::Split(args) => {
            if comm.is_root() {
                let out = args
                    .out
                    .clone()
                    .unwrap_or_else(|| plan.run_dir.join("split.json"));
                let summary = split::run(&plan, &args.scenario, &out)?;
                print!("{summary}");
                save_run_files(&plan, &[])?;
            }
            comm.barrier();
        }
        Command::Convert(args) => {
            if comm.is_root() {
                let model =
                    crate::model::convert::released(&args.checkpoint, plan.model.arch, args.ema)?;
                let mut meta = std::collections::BTreeMap::new();
                meta.insert(
                    "sfron.converted_from".into(),
                    args.checkpoint.display().to_string(),
                );
                if args.ema {
                    // Marks the file as EMA weights for `sample` and `eval`.
                    meta.insert(rundir::EMA_DECAY.into(), "released".into());
                }
                model.save(&args.out, meta)?;
                println!(
                    "{}: {} with {} classes, converted from the released {}",
                    args.out.display(),
                    model.arch.name(),
                    model.classes,
                    args.checkpoint.display()
                );
            }
            comm.barrier();
        }
        Command::Bench(BenchCommand::Data(args)) => {
            if comm.is_root() {
                if let Some(n) = args.generate {
                    bench::generate_image_folder(&args.root, n, 10)?;
                }
                for rate in bench::data_rates(&args.root, args.images, args.batch, &args.workers)? {
                    println!("{}", serde_json::to_string(&rate)?);
                }
            }
            comm.barrier();
        }
        Command::Bench(BenchCommand::ImagenetShape(a)) => {
            if comm.is_root() {
                let t0 = std::time::Instant::now();
                let (train, val) = bench::scale::generate(&a.out, a.scale, a.format)?;
                println!(
                    "{}",
                    serde_json::json!({"bench": "imagenet_shape", "format": a.format.name(),
                        "scale": a.scale, "train": train, "val": val,
                        "seconds": t0.elapsed().as_secs_f64(), "root": a.out})
                );
            }
            comm.barrier();
        }
        Command::Bench(BenchCommand::Index(a)) => {
            if comm.is_root() {
                for row in bench::scale::index(&plan, a.split.as_deref(), &a.ranks)? {
                    println!("{row}");
                }
            }
            comm.barrier();
        }
        Command::Bench(BenchCommand::Step(a)) => {
            let options = bench::step::StepOptions {
                batch: a.batch,
                image: a.image,
                channels: a.channels,
                classes: a.classes,
                iterations: a.iterations.max(1),
                warmup: a.warmup,
                bare: !a.no_bare,
            };
            let report = bench::step::run(comm, &plan, device, &options)?;
            if comm.is_root() {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Command::Bench(BenchCommand::Reduce(a)) => {
            let strategy = crate::comm::buckets::Strategy::from_mib(
                plan.comm.first_bucket_mib,
                plan.comm.bucket_mib,
            );
            let model = bench::reduce::ring_model(comm);
            let print = |line: String| {
                if comm.is_root() {
                    println!("{line}");
                }
            };
            print(serde_json::to_string(&model)?);
            let sizes: Vec<usize> = a.kib.iter().map(|k| k * 1024).collect();
            for row in bench::reduce::buffers(comm, &model, &sizes)? {
                print(serde_json::to_string(&row)?);
            }
            if !a.no_models {
                for (arch, classes) in [
                    (crate::model::Arch::Resnet18, 10),
                    (crate::model::Arch::Resnet50, 1000),
                ] {
                    for row in bench::reduce::gradients(comm, &model, arch, classes, strategy)? {
                        print(serde_json::to_string(&row)?);
                    }
                }
            }
        }
    }
    Ok(Status::Done)
}

/// Refuses a command that does not take the configured model's task
/// (a diffusion model given to a classifier command, or the reverse),
/// before anything is written.
fn require_task(plan: &RunPlan, command: &Command) -> Result<()> {
    use crate::model::Task;
    let task = plan.model.arch.task();
    let takes: &[Task] = match command {
        Command::Train(_) | Command::Doctor(_) | Command::Split(_) | Command::Encode(_) => {
            &[Task::Classify, Task::Denoise]
        }
        Command::Sample(_) => &[Task::Denoise],
        Command::Eval(_) | Command::Unlearn(_) | Command::Study(_) => {
            &[Task::Classify, Task::Denoise]
        }
        Command::Convert(_) => &[Task::Classify, Task::Denoise],
        _ => &[Task::Classify],
    };
    if !takes.contains(&task) {
        anyhow::bail!(
            "sfron {} takes a {}, and model.arch = {} is a {}",
            command.name(),
            takes
                .iter()
                .map(|t| t.noun())
                .collect::<Vec<_>>()
                .join(" or "),
            plan.model.arch.name(),
            task.noun()
        );
    }
    Ok(())
}

/// Rank 0 saves the resolved configuration, and `files`, in the run folder.
fn save_run_files(plan: &RunPlan, files: &[(&str, &[u8])]) -> Result<()> {
    rundir::save_config(plan)?;
    for (name, bytes) in files {
        let path = plan.run_dir.join(name);
        fsx::write_atomic(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(run_dir = %plan.run_dir.display(), "saved the resolved config");
    Ok(())
}
