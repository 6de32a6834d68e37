//! `sfron doctor`: what this job is made of, and proof that its collectives
//! work. Prints ranks, hosts, devices, libtorch and MPI, then checks a sum, a
//! mean, a byte and tensor broadcast, and an agreement across every rank,
//! failing loudly when any rank sees a wrong value.

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

use crate::cli::{DoctorArgs, Fault};
use crate::comm::{Comm, ReduceOp};
use crate::config::RunPlan;
use crate::device::{self, TorchInfo};

/// One collective check: `Err` carries what this rank saw.
type Check = fn(&Comm, Device) -> Result<(), String>;

pub fn run(comm: &Comm, plan: &RunPlan, device: Device, args: &DoctorArgs) -> Result<String> {
    let torch = TorchInfo::probe();
    let me = format!(
        "rank {:>3}  host {}  local rank {}/{}  device {}  threads {}  pid {}",
        comm.rank(),
        hostname(),
        comm.local_rank(),
        comm.local_size(),
        device::describe(device),
        plan.threads,
        std::process::id()
    );
    let ranks = comm.all_gather_bytes(me.as_bytes());

    if let Some(fault) = args.fault
        && comm.rank() == args.fault_rank
    {
        inject(fault)?;
    }

    let mut report = String::new();
    report.push_str(&format!("sfron {} doctor\n", env!("CARGO_PKG_VERSION")));
    report.push_str(&format!(
        "world       {} rank(s), backend {}\n",
        comm.size(),
        comm.backend()
    ));
    for line in &ranks {
        report.push_str(&format!("  {}\n", String::from_utf8_lossy(line)));
    }
    report.push_str(&format!(
        "libtorch    {} at {}\n",
        torch.version, torch.lib_dir
    ));
    report.push_str(&format!(
        "cuda        linked {}, usable {}, {} device(s)\n",
        yes_no(torch.built_with_cuda),
        yes_no(torch.cuda_available),
        torch.cuda_devices
    ));
    let mpi = Comm::library_version().unwrap_or_else(|| "not compiled in (--no-mpi)".into());
    report.push_str(&format!(
        "mpi         {}\n",
        mpi.lines().next().unwrap_or("")
    ));

    report.push_str(&format!(
        "nccl        {}\n",
        crate::comm::nccl::version().unwrap_or_else(|e| format!("not loaded ({e})"))
    ));
    report.push_str(&format!(
        "bf16        {}\n",
        match crate::model::layout::autocast_available() {
            Ok(()) => "autocast switches bound".to_string(),
            Err(e) => format!("unavailable ({e})"),
        }
    ));

    let checks: [(&str, Check); 5] = [
        ("sum", check_sum),
        ("mean", check_mean),
        ("broadcast bytes", check_broadcast_bytes),
        ("broadcast tensor", check_broadcast_tensor),
        ("agree", check_agree),
    ];
    let mut failed = Vec::new();
    let mut record = |name: &'static str, local: Result<String, String>| {
        let everyone_ok = comm.all_agree(local.is_ok());
        if let Err(why) = &local {
            tracing::error!(check = name, "{why}");
        }
        let line = match local {
            Ok(detail) if everyone_ok => format!("ok{detail}"),
            _ => "FAILED (see the failing ranks' logs)".into(),
        };
        report.push_str(&format!("check       {name:<17} {line}\n"));
        if !everyone_ok {
            failed.push(name);
        }
    };
    for (name, check) in checks {
        record(name, check(comm, device).map(|()| String::new()));
    }
    // The gradient path: buckets on this rank's device, on the data plane
    // `comm.gpu_plane` picks (NCCL, or pinned host buffers through MPI).
    let buckets = check_buckets(comm, plan, device).map(|plane| format!(" ({plane})"));
    record("gradient buckets", buckets);
    if !failed.is_empty() {
        if comm.is_root() {
            print!("{report}");
        }
        bail!(
            "doctor: collective check(s) failed across {} ranks: {}",
            comm.size(),
            failed.join(", ")
        );
    }
    report.push_str(&format!("all checks passed on {} rank(s)\n", comm.size()));
    Ok(report)
}

fn inject(fault: Fault) -> Result<()> {
    tracing::warn!(?fault, "injecting a test fault");
    match fault {
        Fault::Panic => panic!("doctor --fault panic: injected panic"),
        Fault::Kill => {
            // SAFETY: sends a signal to this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL returned");
        }
        Fault::Error => bail!("doctor --fault error: injected error"),
    }
}

/// Rank r contributes r + 1 in every element: the sum is n(n+1)/2, exactly.
fn check_sum(comm: &Comm, _device: Device) -> Result<(), String> {
    let n = comm.size() as i64;
    let mut ints = vec![comm.rank() as i64 + 1; 1001];
    comm.sum(&mut ints);
    let mut floats = vec![comm.rank() as f32 + 1.0; 1001];
    comm.sum(&mut floats);
    let want = n * (n + 1) / 2;
    if ints.iter().any(|&x| x != want) || floats.iter().any(|&x| x != want as f32) {
        return Err(format!(
            "sum: expected {want} in every element, got e.g. {} / {}",
            ints[0], floats[0]
        ));
    }
    let mut max = [comm.rank() as f64];
    comm.reduce(&mut max, ReduceOp::Max);
    if max[0] != (n - 1) as f64 {
        return Err(format!("max: expected {}, got {}", n - 1, max[0]));
    }
    Ok(())
}

fn check_mean(comm: &Comm, device: Device) -> Result<(), String> {
    let n = comm.size() as f64;
    let mut t = Tensor::full([7], comm.rank() as f64 * 2.0, (Kind::Double, device));
    comm.mean_tensor(&mut t).map_err(|e| e.to_string())?;
    let want = n - 1.0;
    let got = Vec::<f64>::try_from(&t.to_device(Device::Cpu)).map_err(|e| e.to_string())?;
    if got.iter().any(|&x| x != want) {
        return Err(format!("mean: expected {want}, got {got:?}"));
    }
    Ok(())
}

fn check_broadcast_bytes(comm: &Comm, _device: Device) -> Result<(), String> {
    let expected: Vec<u8> = (0..4099u32)
        .map(|i| ((i * 31 + comm.size() as u32) % 251) as u8)
        .collect();
    let mut bytes = if comm.is_root() {
        expected.clone()
    } else {
        vec![7u8; 3]
    };
    comm.broadcast_bytes(&mut bytes, 0);
    if bytes != expected {
        return Err(format!(
            "broadcast: got {} bytes that differ from rank 0's {}",
            bytes.len(),
            expected.len()
        ));
    }
    Ok(())
}

fn check_broadcast_tensor(comm: &Comm, device: Device) -> Result<(), String> {
    let expected = Tensor::arange(4096, (Kind::Float, device)).reshape([64, 64]);
    let mut t = if comm.is_root() {
        expected.copy()
    } else {
        Tensor::zeros([64, 64], (Kind::Float, device))
    };
    comm.broadcast_tensor(&mut t, 0)
        .map_err(|e| e.to_string())?;
    if !t.equal(&expected) {
        return Err("broadcast of a 64x64 tensor: values differ from rank 0's".into());
    }
    Ok(())
}

fn check_agree(comm: &Comm, _device: Device) -> Result<(), String> {
    if !comm.all_agree(true) {
        return Err("agree(true on every rank) returned false".into());
    }
    let last_dissents = comm.all_agree(comm.rank() + 1 != comm.size());
    if last_dissents {
        return Err("agree(false on the last rank) returned true".into());
    }
    Ok(())
}

/// Sums rank-dependent integers through the engine's reducer on `device`;
/// returns the data plane's name.
fn check_buckets(comm: &Comm, plan: &RunPlan, device: Device) -> Result<String, String> {
    use crate::comm::buckets::{Reducer, Strategy};
    let sizes = [1000usize, 300_000, 7, 70_000];
    let strategy = Strategy::Buckets {
        first: 4096,
        cap: 512 << 10,
    };
    let mut reducer = Reducer::new(comm, &sizes, 4, strategy, device, plan.comm.gpu_plane)
        .map_err(|e| e.to_string())?;
    let total: usize = sizes.iter().sum::<usize>() + 4;
    let flat = tch::Tensor::zeros([total as i64], (tch::Kind::Float, device));
    let pattern = tch::Tensor::arange(total as i64, (tch::Kind::Int64, device))
        .remainder(97)
        .to_kind(tch::Kind::Float);
    let r = comm.rank() as f64 + 1.0;
    reducer
        .sum(comm, &flat, |b| {
            let (at, len) = (b.range.start as i64, b.range.len() as i64);
            flat.narrow(0, at, len)
                .copy_(&(pattern.narrow(0, at, len) * r));
        })
        .map_err(|e| e.to_string())?;
    let s = comm.size() as f64;
    let want = pattern * (s * (s + 1.0) / 2.0);
    let diff = (flat - want).abs().max().double_value(&[]);
    if diff != 0.0 {
        return Err(format!("bucketed sum off by {diff}"));
    }
    Ok(reducer.plane().to_string())
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// This host's name (for the rank table).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
