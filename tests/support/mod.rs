//! Helpers shared by the integration test binaries (each binary uses some).

use std::path::PathBuf;
use std::process::Command;

/// A new empty folder under the system temp folder, unique to this test
/// binary's process.
#[allow(dead_code)]
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sfron-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[allow(dead_code)]
/// The built `sfron`, as if started from a plain shell: no MPI launcher
/// variables, no SLURM task count, no `SFRON_*` configuration variables.
pub fn sfron_alone() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sfron"));
    for var in sfron::comm::LAUNCHER_VARS {
        cmd.env_remove(var);
    }
    for (var, _) in sfron::config::ENV_KEYS {
        cmd.env_remove(var);
    }
    cmd.env_remove("SLURM_STEP_NUM_TASKS")
        .env_remove("SFRON_COMM");
    cmd
}

/// `sfron --set S… ARGS…` alone (see [`sfron_alone`]), run to completion.
#[allow(dead_code)]
pub fn sfron(sets: &[String], args: &[&str]) -> std::process::Output {
    let mut cmd = sfron_alone();
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(args).output().expect("run sfron")
}

/// A finished command's stdout then stderr.
#[allow(dead_code)]
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The interpreter of the PyTorch references (launch/setup records it).
#[allow(dead_code)]
pub fn python() -> String {
    std::env::var("SFRON_TORCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .expect("SFRON_TORCH_PYTHON is not set: run the tests through launch/test (it sources target/sfron-env.sh)")
}

/// The tensors of a safetensors file, by name, as f32 values.
#[allow(dead_code)]
pub fn tensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let (tensors, _) = sfron::model::weights::load(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    tensors
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = Vec::try_from(t.to_kind(tch::Kind::Float).reshape([-1])).unwrap();
            (n, v)
        })
        .collect()
}

/// Largest per-tensor relative difference `max|a−b| / max|b|` between two
/// weight files with the same names (panics when the names differ).
#[allow(dead_code)]
pub fn max_relative_difference(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "different tensors");
    ta.iter()
        .zip(&tb)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
            let diff = x
                .iter()
                .zip(y)
                .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
            diff / scale
        })
        .fold(0.0, f64::max)
}

/// Whether two weight files hold bit-identical tensors.
#[allow(dead_code)]
pub fn same_bits(a: &std::path::Path, b: &std::path::Path) -> bool {
    let bits = |p| {
        tensors(p)
            .into_iter()
            .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    };
    bits(a) == bits(b)
}

/// A seed for randomised tests: `SFRON_TEST_SEED` or the clock (printed, so
/// a failure can be replayed).
#[allow(dead_code)]
pub fn test_seed(what: &str) -> u64 {
    let seed = std::env::var("SFRON_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{what}: SFRON_TEST_SEED={seed}");
    seed
}

/// Norm-wise relative difference `‖a − b‖₂ / ‖b‖₂` over the tensors whose
/// names start with `prefix` (all of them for ""), in two weight files.
#[allow(dead_code)]
pub fn relative_l2_difference(a: &std::path::Path, b: &std::path::Path, prefix: &str) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    let (mut num, mut den) = (0f64, 0f64);
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb, "different tensors");
        if !na.starts_with(prefix) {
            continue;
        }
        for (p, q) in x.iter().zip(y) {
            num += (*p as f64 - *q as f64).powi(2);
            den += (*q as f64).powi(2);
        }
    }
    (num / den.max(1e-300)).sqrt()
}
