//! `sfron eval` and `sfron study` in one process: the metrics and both
//! MIAs against scikit-learn and PyTorch (`tests/golden/eval_reference.py`),
//! bad inputs, and a whole study run twice (the second reuses every stage).
//! (1, 2 and 3 ranks are compared in `tests/mpi.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod support;
use support::{python, sfron, temp_dir, text};

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
    text(o)
}

/// A 2,000-digit slice of the shipped MNIST (500 test digits).
fn base(root: &Path, name: &str) -> Vec<String> {
    vec![
        format!("run.root={}", root.display()),
        format!("run.name={name}"),
        format!("data.root={MNIST}"),
        "data.train_limit=2000".into(),
        "data.test_limit=500".into(),
        "data.workers=0".into(),
        format!("device.threads={}", support::threads()),
    ]
}

/// An original, an undertrained model, a random 10% split and Retrain.
struct Fixture {
    root: PathBuf,
}

impl Fixture {
    fn model(&self, name: &str) -> PathBuf {
        self.root.join(name).join("model.safetensors")
    }
    fn split(&self) -> PathBuf {
        self.root.join("split.json")
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let f = Fixture {
            root: temp_dir("eval-fixture"),
        };
        let split = f.split().display().to_string();
        ok(
            &sfron(
                &base(&f.root, "split"),
                &["split", "--scenario", "random:0.1", "--out", &split],
            ),
            "split",
        );
        for (name, steps, on) in [
            ("original", 120, "all"),
            ("early", 4, "all"),
            ("retrain", 120, "remain"),
        ] {
            let mut sets = base(&f.root, name);
            sets.extend([
                "train.batch=64".into(),
                format!("train.max_steps={steps}"),
                "train.eval_every=0".into(),
            ]);
            ok(
                &sfron(&sets, &["train", "--on", on, "--split", &split]),
                "training",
            );
        }
        f
    })
}

fn eval(f: &Fixture, name: &str, model: &str, reference: Option<&str>) -> PathBuf {
    let mut sets = base(&f.root, name);
    sets.push("eval.logits=true".into());
    sets.push("eval.batch=100".into());
    let model = f.model(model).display().to_string();
    let split = f.split().display().to_string();
    let mut args = vec!["eval", "--model", &model, "--split", &split];
    let reference = reference.map(|r| f.model(r).display().to_string());
    if let Some(r) = &reference {
        args.extend(["--reference", r]);
    }
    let out = ok(&sfron(&sets, &args), "eval");
    assert!(out.contains("MIA(entropy)"), "{out}");
    f.root.join(name)
}

fn reference_check(dir: &Path, reference: Option<&Path>) {
    let mut cmd = Command::new(python());
    cmd.arg(format!("{ROOT}/tests/golden/eval_reference.py"))
        .arg(dir.join("examples.safetensors"))
        .arg(dir.join("eval.json"));
    if let Some(r) = reference {
        cmd.arg(r.join("examples.safetensors"));
    }
    let o = cmd.output().expect("run tests/golden/eval_reference.py");
    println!("{}", text(&o));
    assert!(o.status.success(), "{}: {}", dir.display(), text(&o));
}

#[test]
fn eval_matches_scikit_learn_and_pytorch() {
    let f = fixture();
    let retrain = eval(f, "eval-retrain", "retrain", None);
    reference_check(&retrain, None);
    for model in ["original", "early"] {
        let dir = eval(f, &format!("eval-{model}"), model, Some("retrain"));
        reference_check(&dir, Some(&retrain));
        let e: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(retrain.join("eval.json")).unwrap())
                .unwrap();
        // The reference's metrics are Retrain's own evaluation.
        assert_eq!(e["reference_metrics"], r["metrics"]);
        let g = &e["gap"];
        let m = &e["metrics"];
        let rm = &r["metrics"];
        let d = |k: &str| (m[k].as_f64().unwrap() - rm[k].as_f64().unwrap()).abs();
        let avg = (d("forget_acc") + d("remain_acc") + d("test_acc") + d("mia_entropy")) / 4.0;
        assert!((g["avg_gap"].as_f64().unwrap() - avg).abs() < 1e-9, "{g}");
        assert!(e["time_ratio"].as_f64().unwrap() > 0.0, "{e}");
    }
}

#[test]
fn eval_refuses_bad_input_and_writes_nothing() {
    let f = fixture();
    let model = f.model("original").display().to_string();
    let split = f.split().display().to_string();
    let cases: Vec<(&str, Vec<String>, Vec<String>, &str)> = vec![
        (
            "no-split",
            vec![],
            vec!["--model".into(), model.clone()],
            "needs a split",
        ),
        (
            "missing-model",
            vec![],
            vec![
                "--model".into(),
                "/nonexistent/m.safetensors".into(),
                "--split".into(),
                split.clone(),
            ],
            "/nonexistent/m.safetensors",
        ),
        (
            "other-arch",
            vec!["model.arch=resnet18_cifar".into()],
            vec![
                "--model".into(),
                model.clone(),
                "--split".into(),
                split.clone(),
            ],
            "model.safetensors",
        ),
        (
            "bad-batch",
            vec!["eval.batch=0".into()],
            vec![
                "--model".into(),
                model.clone(),
                "--split".into(),
                split.clone(),
            ],
            "eval.batch",
        ),
    ];
    for (name, extra, args, expect) in cases {
        let mut sets = base(&f.root, &format!("bad-{name}"));
        sets.extend(extra);
        let mut all = vec!["eval"];
        all.extend(args.iter().map(String::as_str));
        let o = sfron(&sets, &all);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {t}");
        assert!(t.contains(expect), "{name}: expected {expect:?} in:\n{t}");
        assert!(!t.contains("panicked"), "{name}: {t}");
        assert!(
            !f.root.join(format!("bad-{name}/eval.json")).exists(),
            "{name}: wrote eval.json"
        );
    }
}

/// Every file's bytes under `dir`, by relative path (checkpoints left out).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == sfron::rundir::LOCK_FILE) {
                // The run-folder lock names its latest holder: not an output.
                continue;
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                let mtime = p.metadata().unwrap().modified().unwrap();
                out.push((rel, std::fs::read(&p).unwrap(), mtime));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn study_twice_reuses_every_stage_and_reports_the_same() {
    let root = temp_dir("study");
    let mut sets = base(&root, "study");
    sets.extend([
        "data.train_limit=1200".into(),
        "data.test_limit=300".into(),
        "train.batch=64".into(),
        "train.max_steps=40".into(),
        "train.eval_every=0".into(),
        "study.scenario=random:0.1".into(),
        "study.seeds=[3, 4]".into(),
        r#"study.methods=["sfron", "ft", "rl"]"#.into(),
        "sfron.iterations=10".into(),
        "ft.epochs=1".into(),
        "rl.epochs=1".into(),
    ]);
    let first = ok(&sfron(&sets, &["study"]), "the first study");
    let dir = root.join("study");
    for file in [
        "report.md",
        "report.json",
        "plots/entropy.svg",
        "plots/per_class.svg",
        "plots/curves-sfron.svg",
        "seed-3/eval/sfron/examples.safetensors",
        "seed-4/eval/original/eval.json",
    ] {
        assert!(dir.join(file).exists(), "{file} missing:\n{first}");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for row in [
        "| Original |",
        "| Retrain |",
        "| SFR-on |",
        "| FT |",
        "| RL |",
        " ± ",
    ] {
        assert!(md.contains(row), "{row:?} not in report.md:\n{md}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([3, 4]));
    assert_eq!(report["rows"].as_array().unwrap().len(), 5);
    // The two seeds forget different samples.
    let s3 = std::fs::read_to_string(dir.join("seed-3/split.json")).unwrap();
    let s4 = std::fs::read_to_string(dir.join("seed-4/split.json")).unwrap();
    assert_ne!(s3, s4);

    let before = snapshot(&dir);
    let second = ok(&sfron(&sets, &["study"]), "the second study");
    // original, then per seed Retrain, 3 methods and 5 evaluations.
    let stages = 1 + 2 * (1 + 3 + 5);
    assert_eq!(second.matches("reused").count(), stages, "{second}");
    assert!(!second.contains("unlearn:sfron: in "), "{second}");
    let after = snapshot(&dir);
    assert_eq!(before.len(), after.len());
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{} changed on the second run", a.0);
        if !a.0.starts_with("report") && !a.0.starts_with("plots") && !a.0.ends_with("config.toml")
        {
            assert_eq!(a.2, b.2, "{} was rewritten", a.0);
        }
    }

    // A changed FT rate reruns FT and its evaluations only.
    sets.push("ft.lr=0.02".into());
    let third = ok(&sfron(&sets, &["study"]), "the study with a new FT rate");
    assert_eq!(third.matches("reused").count(), stages - 2 * 2, "{third}");
    assert!(third.contains("unlearn:ft: in "), "{third}");
}

/// `train.select = "test"` keeps the epoch of the best test accuracy (the
/// released practice): train.json and the weights' metadata say so, and a
/// study that starts from such an original says so in its report;
/// `"val"` without held-out samples is refused.
#[test]
fn a_model_chosen_by_the_test_set_is_reported_as_such() {
    let root = temp_dir("select");
    let mut sets = base(&root, "picked");
    sets.extend([
        "data.train_limit=600".into(),
        "data.test_limit=200".into(),
        "train.batch=64".into(),
        "train.epochs=3".into(),
        "train.select=test".into(),
    ]);
    ok(&sfron(&sets, &["train"]), "train with select = test");
    let dir = root.join("picked");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["selected"]["by"], "test", "{summary}");
    let (_, meta) = sfron::model::weights::load(&dir.join("model.safetensors")).unwrap();
    assert_eq!(meta["sfron.selected_by"], "test");
    assert!(dir.join("best.safetensors").exists());

    let mut study = base(&root, "study");
    study.extend([
        "data.train_limit=600".into(),
        "data.test_limit=200".into(),
        "train.batch=64".into(),
        "train.epochs=1".into(),
        "study.scenario=random:0.1".into(),
        "study.seeds=[0]".into(),
        r#"study.methods=["ft"]"#.into(),
        "ft.epochs=1".into(),
        format!("study.original={}", dir.join("model.safetensors").display()),
    ]);
    ok(&sfron(&study, &["study"]), "the study");
    let md = std::fs::read_to_string(root.join("study/report.md")).unwrap();
    assert!(
        md.contains("the original") && md.contains("kept the epoch of its best test accuracy"),
        "{md}"
    );
    assert!(
        !md.contains("Retrain (seed 0) ("),
        "Retrain kept its last epoch:\n{md}"
    );

    let mut val = base(&root, "val");
    val.push("train.select=val".into());
    let o = sfron(&val, &["train"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("train.select"), "{}", text(&o));
}
