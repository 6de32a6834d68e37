//! End-to-end tests of the `sfron` binary in one process (no mpirun).

use std::process::{Command, Output};

mod support;
use support::temp_dir;

fn sfron(args: &[&str]) -> Output {
    support::sfron_alone()
        .args(args)
        .output()
        .expect("run sfron")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn doctor_alone_passes_and_saves_the_resolved_config() {
    let root = temp_dir("doctor");
    let root_s = root.display().to_string();
    let out = sfron(&[
        "doctor",
        "--set",
        &format!("run.root={root_s}"),
        "--set",
        "run.name=check",
        "--device",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("world       1 rank(s), backend local"),
        "{stdout}"
    );
    assert!(stdout.contains("libtorch    2.11"), "{stdout}");
    assert!(
        stdout.contains("all checks passed on 1 rank(s)"),
        "{stdout}"
    );
    let saved = std::fs::read_to_string(root.join("check/config.toml")).unwrap();
    assert!(
        saved.contains("kind = \"cpu\"") && saved.contains("name = \"check\""),
        "{saved}"
    );
    assert!(saved.starts_with("# resolved by sfron"), "{saved}");
    // The saved file is a valid --config for the same run.
    let again = sfron(&[
        "doctor",
        "--config",
        &root.join("check/config.toml").display().to_string(),
        "--dry-run",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("device.kind = \"cpu\""));
    assert!(
        std::fs::read_to_string(root.join("check/doctor.txt"))
            .unwrap()
            .contains("all checks passed")
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let root = temp_dir("dry");
    let out = sfron(&[
        "doctor",
        "--dry-run",
        "--set",
        &format!("run.root={}", root.display()),
        "--threads",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("device.threads = 3") && stdout.contains("# --set device.threads=3"),
        "{stdout}"
    );
    assert!(stdout.contains("threads_per_rank = 3"), "{stdout}");
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "dry run wrote files"
    );
}

/// Every shipped preset resolves into a plan (values in range, keys known,
/// a diffusion preset's transform and UNet shape accepted) and names an
/// architecture of the zoo.
#[test]
fn every_shipped_preset_resolves() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let root = temp_dir("preset");
        let out = sfron(&[
            "--config",
            path.to_str().unwrap(),
            "--set",
            &format!("run.root={}", root.display()),
            "train",
            "--dry-run",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        seen += 1;
    }
    assert!(seen >= 6, "{seen} presets");
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = temp_dir("bad");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[log]\nformat = \"xml\"\n").unwrap();
    let out = sfron(&["--config", &file.display().to_string(), "doctor"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("`log.format`") && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("text, json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_loss_precision_and_noise_out_of_range_exit_2_naming_the_key() {
    let root = temp_dir("bad-sfron-keys");
    let run_root = format!("run.root={}", root.display());
    let out = sfron(&[
        "--set",
        &run_root,
        "--set",
        "sfron.loss_precision=fast",
        "unlearn",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sfron.loss_precision") && stderr.contains("exact, released"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = sfron(&[
        "--set",
        &run_root,
        "--set",
        "unlearn.logit_noise=0.5",
        "unlearn",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("`unlearn.logit_noise`"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn cuda_request_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() {
        return; // On a GPU machine this request is valid; nothing to check.
    }
    let out = sfron(&[
        "doctor",
        "--device",
        "cuda",
        "--set",
        &format!("run.root={}", temp_dir("cuda").display()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("`device.kind`") && stderr.contains("--set device.kind=cuda"),
        "{stderr}"
    );
}

#[test]
fn unknown_comm_mode_is_refused() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sfron"));
    let out = cmd
        .env("SFRON_COMM", "nccl")
        .args(["doctor", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("SFRON_COMM=\"nccl\""));
}

#[test]
fn help_documents_exit_codes_and_environment() {
    let out = sfron(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("75  interrupted") && stdout.contains("2   error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SFRON_DEVICE") && stdout.contains("SFRON_COMM"),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = sfron(&["doctor", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("possible values: auto, cpu, cuda"));
}

#[test]
fn split_writes_the_same_manifest_twice_and_refuses_bad_scenarios() {
    let root = temp_dir("split");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let run = |out: &str, scenario: &str| {
        sfron(&[
            "split",
            "--scenario",
            scenario,
            "--out",
            out,
            "--set",
            &format!("data.root={data}"),
            "--set",
            "run.seed=4",
        ])
    };
    let (a, b) = (root.join("a.json"), root.join("b.json"));
    for path in [&a, &b] {
        let out = run(&path.display().to_string(), "random:0.25");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("forget      2000 samples"),
            "{}",
            text(&out.stdout)
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let manifest = sfron::data::Manifest::load(&a).unwrap();
    assert_eq!(manifest.forget.len(), 2000);

    let out = run(&root.join("c.json").display().to_string(), "class:11");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("class:11") && text(&out.stderr).contains("0..9"),
        "{}",
        text(&out.stderr)
    );
    assert!(!root.join("c.json").exists(), "a refused split left a file");

    let out = sfron(&[
        "split",
        "--scenario",
        "random:0.1",
        "--set",
        "data.root=/nonexistent/mnist",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/mnist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_data_reports_rates_for_each_transform_and_worker_count() {
    let root = temp_dir("bench");
    let out = sfron(&[
        "bench",
        "data",
        "--root",
        &root.join("imgs").display().to_string(),
        "--generate",
        "24",
        "--images",
        "20",
        "--batch",
        "8",
        "--workers",
        "0,2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = support::json_lines(&text(&out.stdout));
    assert_eq!(lines.len(), 4);
    for line in &lines {
        assert_eq!(line["images"], 20);
        assert!(line["images_per_second"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn set_before_and_after_the_subcommand_both_count() {
    let out = sfron(&[
        "--set",
        "run.name=before",
        "train",
        "--set",
        "run.seed=7",
        "--on",
        "all",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("name = \"before\""), "{stdout}");
    assert!(stdout.contains("seed = 7"), "{stdout}");
}
