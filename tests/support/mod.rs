//! Helpers shared by the integration test binaries (each binary uses some).

use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
pub mod error_model;

/// Threads per rank of the sfron runs the tests start (`device.threads`):
/// `SFRON_TEST_THREADS`, default 1. Running the suite with 2 checks that no
/// tolerance depends on the thread count (the kernels split their sums
/// differently).
#[allow(dead_code)]
pub fn threads() -> String {
    std::env::var("SFRON_TEST_THREADS")
        .ok()
        .filter(|t| t.parse::<u32>().is_ok_and(|n| n > 0))
        .unwrap_or_else(|| "1".into())
}

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

/// One JSON value per line of `text` (a command's JSON-lines output, a
/// results file); panics on a line that is not JSON.
#[allow(dead_code)]
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The interpreter of the PyTorch references (launch/setup records it).
#[allow(dead_code)]
pub fn python() -> String {
    std::env::var("SFRON_TORCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .expect("SFRON_TORCH_PYTHON is not set: run the tests through launch/test (it sources target/sfron-env.sh)")
}

/// Runs a PyTorch reference script with `args` and returns its stdout then
/// stderr; panics with both when it fails.
#[allow(dead_code)]
pub fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} {args:?} failed:\n{text}");
    text
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
    relative_l2_where(a, b, |n| n.starts_with(prefix))
}

/// `‖a − b‖₂ / ‖b‖₂` over the tensors whose names `keep` accepts (0 when
/// none does).
#[allow(dead_code)]
pub fn relative_l2_where(
    a: &std::path::Path,
    b: &std::path::Path,
    keep: impl Fn(&str) -> bool,
) -> f64 {
    let (num, den) = squared_sums(a, b, keep);
    (num / den.max(1e-300)).sqrt()
}

/// `Σ (a − b)²` and `Σ b²` over the tensors whose names `keep` accepts.
#[allow(dead_code)]
fn squared_sums(
    a: &std::path::Path,
    b: &std::path::Path,
    keep: impl Fn(&str) -> bool,
) -> (f64, f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    let (mut num, mut den) = (0f64, 0f64);
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb, "different tensors");
        if !keep(na) {
            continue;
        }
        for (p, q) in x.iter().zip(y) {
            num += (*p as f64 - *q as f64).powi(2);
            den += (*q as f64).powi(2);
        }
    }
    (num, den)
}

/// `‖a − b‖₂` over every tensor of two weight files with the same names.
#[allow(dead_code)]
pub fn l2_difference(a: &std::path::Path, b: &std::path::Path) -> f64 {
    l2_difference_where(a, b, |_| true)
}

/// `‖a − b‖₂` over the tensors whose names `keep` accepts.
#[allow(dead_code)]
pub fn l2_difference_where(
    a: &std::path::Path,
    b: &std::path::Path,
    keep: impl Fn(&str) -> bool,
) -> f64 {
    squared_sums(a, b, keep).0.sqrt()
}

/// The tensor of two weight files with the largest `‖a − b‖₂ / ‖b‖₂`, and that value.
#[allow(dead_code)]
pub fn worst_relative_l2(a: &std::path::Path, b: &std::path::Path) -> (String, f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    let mut worst = (String::new(), 0f64);
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb, "different tensors");
        let (mut num, mut den) = (0f64, 0f64);
        for (p, q) in x.iter().zip(y) {
            num += (*p as f64 - *q as f64).powi(2);
            den += (*q as f64).powi(2);
        }
        let r = (num / den.max(1e-300)).sqrt();
        if r > worst.1 {
            worst = (na.clone(), r);
        }
    }
    worst
}

/// Entries of two hard masks (`masks`: files of 0/1 tensors named like the
/// parameters) that differ, split into those that rounding explains by the
/// two runs' saliencies `S = (F_f + 1e-15)/(F_r + 1e-15)` (`fishers`: files
/// of `forget.<param>`, `remain.<param>`) and those it does not
/// ([`error_model::mask_flip_explained`]): `(unexplained, explained)`.
#[allow(dead_code)]
pub fn mask_differences(
    fishers: (&std::path::Path, &std::path::Path),
    masks: (&std::path::Path, &std::path::Path),
    gamma: f64,
    rel: f64,
) -> (usize, usize) {
    let saliency = |path: &std::path::Path| {
        let all: std::collections::BTreeMap<String, Vec<f32>> = tensors(path).into_iter().collect();
        all.iter()
            .filter_map(|(n, f)| {
                let p = n.strip_prefix("forget.")?;
                let r = &all[&format!("remain.{p}")];
                let s = f
                    .iter()
                    .zip(r)
                    .map(|(f, r)| (*f as f64 + 1e-15) / (*r as f64 + 1e-15))
                    .collect::<Vec<f64>>();
                Some((p.to_string(), s))
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (sa, sb) = (saliency(fishers.0), saliency(fishers.1));
    let (ma, mb) = (tensors(masks.0), tensors(masks.1));
    let (mut unexplained, mut explained) = (0, 0);
    for ((n, x), (nb, y)) in ma.iter().zip(&mb) {
        assert_eq!(n, nb, "different tensors");
        for (k, (p, q)) in x.iter().zip(y).enumerate() {
            if p == q {
                continue;
            }
            if error_model::mask_flip_explained(sa[n][k], sb[n][k], gamma, rel) {
                explained += 1;
            } else {
                unexplained += 1;
            }
        }
    }
    (unexplained, explained)
}

/// Runs sfron with `sets` and `args` and asserts the refusal every bad input
/// gets: exit code 2, `needle` (the key or file) in the message, and no run
/// folder `runs/<name>` under `dir`.
#[allow(dead_code)]
pub fn assert_refused(
    dir: &std::path::Path,
    name: &str,
    sets: &[String],
    args: &[&str],
    needle: &str,
) {
    let o = sfron(sets, args);
    let text = text(&o);
    assert_eq!(o.status.code(), Some(2), "{name}: {text}");
    assert!(text.contains(needle), "{name}: no {needle:?} in {text}");
    assert!(
        !dir.join("runs").join(name).exists(),
        "{name}: a run folder was left behind"
    );
}

/// A small VAE (1 image channel, widths 16/32, one block per level, 4
/// latent channels, 8 groups, scaling 0.5) with libtorch's initialisation
/// under `seed`, saved to `path`; its spec.
#[allow(dead_code)]
pub fn write_small_vae(path: &std::path::Path, seed: i64) -> sfron::model::vae::VaeSpec {
    let spec = sfron::model::vae::VaeSpec {
        in_channels: 1,
        out_channels: 1,
        block_out: vec![16, 32],
        layers_per_block: 1,
        latent_channels: 4,
        groups: 8,
        scaling_factor: 0.5,
    };
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = sfron::model::vae::SdVae::new(&vs.root(), &spec);
    let state: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    sfron::model::weights::save(path, &state, &Default::default()).unwrap();
    spec
}

/// The `--set`s of a run named `name` under `dir/runs` on the first
/// `limit` shipped digits, quiet, with the test threads.
#[allow(dead_code)]
pub fn digit_sets(dir: &std::path::Path, name: &str, limit: u64) -> Vec<String> {
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    vec![
        format!("run.root={}", dir.join("runs").display()),
        format!("run.name={name}"),
        format!("data.root={mnist}"),
        format!("data.train_limit={limit}"),
        "data.workers=0".into(),
        format!("device.threads={}", threads()),
        "log.level=warn".into(),
    ]
}

/// A digit classifier trained for `steps` steps as `dir/runs/judge` (the
/// judge of generated digits); its weights file.
#[allow(dead_code)]
pub fn train_digit_judge(dir: &std::path::Path, limit: u64, steps: u64) -> std::path::PathBuf {
    let mut sets = digit_sets(dir, "judge", limit);
    sets.extend([
        "model.arch=mnist_cnn".into(),
        format!("train.max_steps={steps}"),
    ]);
    let o = sfron(&sets, &["train"]);
    assert!(o.status.success(), "{}", text(&o));
    dir.join("runs/judge/model.safetensors")
}

/// A network's eval-mode forward pass, and its train-mode logits of `x`.
#[allow(dead_code)]
pub type NetUnderTest<'a> = (
    &'a dyn tch::nn::ModuleT,
    &'a dyn Fn(&tch::Tensor) -> tch::Tensor,
);

/// A classifier against its PyTorch reference's outputs `io` (`x`, `y`,
/// eval-mode `logits`, `grad.<name>` of the summed cross-entropy of one
/// train-mode pass): after a strict load of `state` (the reference's names
/// and shapes, nothing missing or extra) into `vs`, the eval logits of
/// `net` within `forward` of the largest, and the gradient of every
/// trainable variable of the train-mode logits `train(x)` within
/// `gradient`, norm-wise per tensor. `case` names the case in messages.
#[allow(dead_code)]
pub fn check_against_golden(
    case: &str,
    vs: &tch::nn::VarStore,
    (net, train): NetUnderTest,
    (state, io): (&std::path::Path, &std::path::Path),
    (forward, gradient): (f64, f64),
) {
    use tch::{Kind, Reduction, Tensor};
    let (tensors, _) = sfron::model::weights::load(state).unwrap();
    sfron::model::weights::copy_into(vs, &tensors, state).unwrap();
    let io: std::collections::BTreeMap<String, Tensor> = sfron::model::weights::load(io)
        .unwrap()
        .0
        .into_iter()
        .collect();
    let norm = |t: &Tensor| t.to_kind(Kind::Double).norm().double_value(&[]);

    let logits = tch::no_grad(|| net.forward_t(&io["x"], false));
    let want = &io["logits"];
    let diff = (&logits - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    println!("{case}: logits relative max difference {diff:e} (allowed {forward:e})");
    assert!(diff <= forward, "{case}: logits differ by {diff:e}");

    let loss =
        train(&io["x"]).cross_entropy_loss::<Tensor>(&io["y"], None, Reduction::Sum, -100, 0.0);
    let vars = vs.variables();
    let names: Vec<&String> = vars
        .iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    let params: Vec<Tensor> = names.iter().map(|n| vars[*n].shallow_clone()).collect();
    let grads = Tensor::run_backward(&[loss], &params, false, false);
    let mut worst = 0f64;
    for (name, g) in names.iter().zip(&grads) {
        let want = &io[&format!("grad.{name}")];
        let d = norm(&(g - want)) / norm(want).max(f64::MIN_POSITIVE);
        worst = worst.max(d);
        assert!(
            d <= gradient,
            "{case}: gradient of {name} differs by {d:e} (allowed {gradient:e})"
        );
    }
    let expected = io.keys().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(names.len(), expected, "{case}: the reference's parameters");
    println!("{case}: worst gradient relative difference {worst:e} (allowed {gradient:e})");
}
