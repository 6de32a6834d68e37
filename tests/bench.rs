//! The benchmark tools run end to end and say what they measured: `launch/bench`
//! on a tiny model (sfron and PyTorch, 1 and 2 ranks, the reductions, the
//! report), and `launch/gpu-check` parsed and dry-run (no GPU here). The
//! numbers themselves are never asserted: they are measured, in
//! BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

mod support;
use support::text;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[cfg(feature = "mpi")]
#[test]
fn launch_bench_runs_every_measurement_on_a_tiny_model_and_writes_its_section() {
    let dir = support::temp_dir("bench-tiny");
    let md = dir.join("BENCHMARKS.md");
    std::fs::write(
        &md,
        "# Benchmarks\n\n## Input pipeline (`launch/bench-data`)\n\nkept\n",
    )
    .unwrap();
    let o = Command::new(Path::new(ROOT).join("launch/bench"))
        .current_dir(ROOT)
        .envs([
            ("ARCH", "mnist_cnn_bn"),
            ("IMAGE", "28"),
            ("CHANNELS", "1"),
            ("BATCH", "4"),
            ("ITERATIONS", "2"),
            ("WARMUP", "1"),
            ("ROUNDS", "1"),
            ("R50_ITERATIONS", "0"),
            ("REDUCE_KIB", "1,64,4096"),
            ("SFRON_NO_SETUP", "1"),
        ])
        .env("BENCH_MD", &md)
        .env("BENCH_OUT", &dir)
        .env("DDPM", "0")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = support::json_lines(&std::fs::read_to_string(dir.join("results.jsonl")).unwrap());
    let label = |l: &str| rows.iter().find(|r| r["label"] == l).cloned();
    for l in [
        "sfron_1x1",
        "pytorch_1x1",
        "sfron_2x1",
        "sfron_1x2",
        "ddp_2x1",
    ] {
        let r = label(l).unwrap_or_else(|| panic!("no {l} row in {rows:?}"));
        assert!(r["sfron_iteration_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    let one = label("sfron_1x1").unwrap();
    assert!(one["ratio_to_bare"].as_f64().unwrap() > 0.0, "{one}");
    assert_eq!(label("sfron_2x1").unwrap()["ranks"], 2);
    assert_eq!(label("ddp_2x1").unwrap()["ranks"], 2);
    let reductions = rows.iter().filter(|r| r["bench"] == "reduce").count();
    assert_eq!(
        reductions,
        3 * 3,
        "one_call, scratch, segmented for 3 sizes"
    );
    let written = std::fs::read_to_string(&md).unwrap();
    for needle in [
        "## Input pipeline",
        "kept",
        "## Step, scaling and reductions (`launch/bench`)",
        "SFR-on iteration / bare libtorch",
        "sfron / PyTorch, same loop",
        "PyTorch DDP gloo",
        "Ring model: 4-byte sum",
        "| 4 MiB |",
    ] {
        assert!(
            written.contains(needle),
            "{needle:?} missing from\n{written}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `launch/<script>` with `envs` (setup skipped), its output under
/// `out`; returns its results.jsonl under `out/<name>` and its text, after
/// checking it exited 0.
fn run_step_bench(
    script: &str,
    envs: &[(&str, &str)],
    out: &Path,
    name: &str,
) -> (Vec<serde_json::Value>, String) {
    let o = Command::new(Path::new(ROOT).join("launch").join(script))
        .current_dir(ROOT)
        .envs(envs.iter().copied())
        .env("SFRON_NO_SETUP", "1")
        .env("BENCH_OUT", out)
        .output()
        .unwrap();
    let text = text(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    let rows = support::json_lines(
        &std::fs::read_to_string(out.join(name).join("results.jsonl")).unwrap(),
    );
    (rows, text)
}

/// `launch/bench-ddpm` at a tiny scale: both sides measured for both
/// steps, and the table printed with a ratio per row.
#[test]
fn launch_bench_ddpm_times_both_steps_on_both_sides() {
    let dir = support::temp_dir("bench-ddpm");
    let envs = [
        ("BATCH", "8"),
        ("THREADS", "1"),
        ("ITERATIONS", "2"),
        ("WARMUP", "1"),
        ("STEPS", "2"),
        ("ROUNDS", "1"),
    ];
    let (rows, out) = run_step_bench("bench-ddpm", &envs, &dir, "ddpm");
    for side in ["sfron", "pytorch"] {
        for what in ["train", "sample"] {
            let r = rows
                .iter()
                .find(|r| r["side"] == side && r["what"] == what)
                .unwrap_or_else(|| panic!("no {side} {what} row in {rows:?}"));
            assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    for needle in [
        "| training step |",
        "| guided sampling step |",
        "sfron / PyTorch",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from\n{out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `launch/bench-dit` at a tiny batch: both sides time a training step and
/// the table row is printed; the recompute rows measure both settings.
#[test]
fn launch_bench_dit_times_a_training_step_on_both_sides() {
    let dir = support::temp_dir("bench-dit");
    let envs = [
        ("BATCH", "2"),
        ("THREADS", "1"),
        ("ITERATIONS", "1"),
        ("WARMUP", "1"),
        ("ROUNDS", "1"),
        ("RECOMPUTE_BATCH", "2"),
    ];
    let (rows, out) = run_step_bench("bench-dit", &envs, &dir, "dit");
    for (side, what) in [
        ("sfron", "train"),
        ("pytorch", "train"),
        ("sfron", "keep"),
        ("sfron", "recompute"),
    ] {
        let r = rows
            .iter()
            .find(|r| r["side"] == side && r["what"] == what)
            .unwrap_or_else(|| panic!("no {side} {what} row in {rows:?}"));
        assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    let peak = |what: &str| rows.iter().find(|r| r["what"] == what).unwrap()["peak_mib"].as_f64();
    assert!(peak("keep").unwrap() > 0.0 && peak("recompute").unwrap() > 0.0);
    assert!(out.contains("| training step |"), "{out}");
    assert!(out.contains("| recompute / kept |"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `launch/bench-imagenet` at two tiny scales in both formats: every
/// measurement runs on the generated data (the index sees every generated
/// sample, the sampler's shares cover the remain set, the capped SFR-on run
/// finishes) and the section lands in BENCHMARKS.md.
#[test]
fn launch_bench_imagenet_measures_both_formats_and_writes_its_section() {
    let dir = support::temp_dir("bench-imagenet");
    let md = dir.join("BENCHMARKS.md");
    let o = Command::new(Path::new(ROOT).join("launch/bench-imagenet"))
        .current_dir(ROOT)
        .envs([
            ("SCALES", "0.001 0.002"),
            ("FORMATS", "tar imagefolder"),
            ("SFRON_NO_SETUP", "1"),
            ("SFRON_COMM", "local"),
        ])
        .env("ROOT", &dir)
        .env("BENCH_MD", &md)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = support::json_lines(&std::fs::read_to_string(dir.join("rows.jsonl")).unwrap());
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        // ImageNet's 1,281,167 times the scale, each of the 1,000 classes
        // rounded (and kept at one sample at least).
        let want = r["scale"].as_f64().unwrap() * 1_281_167.0;
        let got = r["train"].as_f64().unwrap();
        assert!((got - want).abs() <= 1000.0 && got >= 1000.0, "{r}");
        assert!(r["sfron_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["manifest_random_kb"].as_f64().unwrap() > 0.0, "{r}");
    }
    let written = std::fs::read_to_string(&md).unwrap();
    for needle in [
        "## ImageNet's cardinality (`launch/bench-imagenet`)",
        "| tar | 1,000 |",
        "| imagefolder |",
        "Fastest-growing time",
    ] {
        assert!(
            written.contains(needle),
            "{needle:?} missing from\n{written}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpu_check_parses_and_its_dry_run_lists_every_step() {
    let script = Path::new(ROOT).join("launch/gpu-check");
    let o = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(&script).arg("--dry-run").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    for step in [
        "doctor:",
        "sfron_fp32:",
        "pytorch_fp32:",
        "sfron_bf16:",
        "pytorch_bf16:",
    ] {
        assert!(out.contains(step), "{step} missing from\n{out}");
    }
    assert!(out.contains("device.precision=\"bf16\" --set device.channels_last=true"));
    assert!(out.contains("--bf16 --channels-last"));
    // Without the binary it refuses clearly instead of half-running.
    let o = Command::new(&script)
        .env("SFRON_BIN", "/nonexistent/sfron")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/sfron is not an executable"));
}
