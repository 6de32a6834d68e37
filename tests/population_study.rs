//! A population study (`study.population`) on one rank: the subsampled
//! variant's membership table, splits and per-example outputs, the report,
//! and the refusals (group size, N < 2, a folder of another recipe). The
//! multi-rank behaviour (groups, resume after a kill, group invariance) is
//! in tests/mpi.rs, group `population`.

mod support;

use std::path::{Path, PathBuf};

use support::{assert_refused, sfron, temp_dir, text};

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
const PRESET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/mnist_population.toml");

/// The shipped CPU preset shrunk to seconds: 400 digits, 3 models, 8
/// training steps, GA for one epoch.
fn small(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    [
        format!("run.root={}", dir.join("runs").display()),
        format!("run.name={name}"),
        format!("data.root={MNIST}"),
        format!("device.threads={}", support::threads()),
        "data.train_limit=400".into(),
        "data.test_limit=200".into(),
        "study.population=3".into(),
        "study.methods=[\"ga\"]".into(),
        "train.max_steps=8".into(),
        "train.warmup_steps=0".into(),
        "ga.epochs=1".into(),
        "log.level=warn".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    .collect()
}

fn study(sets: &[String]) -> std::process::Output {
    sfron(sets, &["-c", PRESET, "study"])
}

/// Every file under `dir` with its length and modification time.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn subsampled_population_records_membership_and_judges_every_sample() {
    let dir = temp_dir("population-subsample");
    let o = study(&small(&dir, "pop", &["study.subsample=true"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = dir.join("runs/pop");

    // The membership table: 3 models × 400 samples, each row one half.
    let member = support::tensors(&root.join("membership.safetensors"));
    let (name, values) = &member[0];
    assert_eq!(name, "member");
    assert_eq!(values.len(), 3 * 400);
    let rows: Vec<Vec<bool>> = values
        .chunks(400)
        .map(|r| r.iter().map(|&v| v == 1.0).collect())
        .collect();
    for (k, row) in rows.iter().enumerate() {
        assert_eq!(row.iter().filter(|&&m| m).count(), 200, "model {k}");
        assert_eq!(
            row,
            &sfron::study::membership_half(0, k as u32, 400),
            "model {k}"
        );
    }
    assert_ne!(rows[0], rows[1], "each model draws its own half");

    let common: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("split.json")).unwrap()).unwrap();
    let forget: Vec<usize> = serde_json::from_value(common["forget"].clone()).unwrap();
    for (k, row) in rows.iter().enumerate() {
        let split: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("model-{k}/split.json"))).unwrap(),
        )
        .unwrap();
        let mine: Vec<usize> = serde_json::from_value(split["forget"].clone()).unwrap();
        let excluded: Vec<usize> = serde_json::from_value(split["excluded"].clone()).unwrap();
        // Model k forgets the forget samples of its half, never sees the other half.
        let want: Vec<usize> = forget.iter().copied().filter(|&i| row[i]).collect();
        assert_eq!(mine, want, "model {k}'s forget set");
        let out: Vec<usize> = (0..400).filter(|&i| !row[i]).collect();
        assert_eq!(excluded, out, "model {k}'s excluded samples");

        // Its evaluations cover every training sample (forget, remain and
        // excluded rows) and every test sample, each once, with a margin.
        for name in ["original", "retrain", "ga"] {
            let path = root.join(format!("model-{k}/eval/{name}/examples.safetensors"));
            let ex = sfron::eval::Examples::load(&path).unwrap();
            let mut train: Vec<i64> = (0..ex.len())
                .filter(|&r| ex.subset[r] != 2)
                .map(|r| ex.index[r])
                .collect();
            train.sort_unstable();
            assert_eq!(train, (0..400).collect::<Vec<i64>>(), "{}", path.display());
            assert_eq!(ex.subset.iter().filter(|&&s| s == 2).count(), 200);
            assert_eq!(
                ex.subset.iter().filter(|&&s| s == 3).count(),
                200,
                "{}: the excluded half",
                path.display()
            );
            assert!(ex.margin.iter().all(|m| m.is_finite()));
            // The margin agrees with the loss: margin = log(p / (1 − p)), p = e^−loss.
            for r in 0..ex.len() {
                let p = (-f64::from(ex.loss[r])).exp();
                let want = (p / (1.0 - p)).ln();
                let got = f64::from(ex.margin[r]);
                assert!(
                    (got - want).abs() <= 1e-3 * (1.0 + want.abs()) || p > 0.999,
                    "row {r}: margin {got}, log(p/(1-p)) {want}"
                );
            }
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["subsample"], true);
    let names: Vec<&str> = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["original", "ga"]);
    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    assert!(
        md.contains("KLoM") && md.contains("U-LiRA") && md.contains("2406.09073"),
        "{md}"
    );
    assert!(root.join("plots/ulira_roc.svg").is_file());

    // A rerun finds every item done and rewrites only the report.
    let models = listing(&root.join("model-0"));
    let o = study(&small(&dir, "pop", &["study.subsample=true"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let again: Vec<_> = listing(&root.join("model-0"))
        .into_iter()
        .filter(|(p, _, _)| !p.ends_with(".sfron.lock"))
        .collect();
    let models: Vec<_> = models
        .into_iter()
        .filter(|(p, _, _)| !p.ends_with(".sfron.lock"))
        .collect();
    assert_eq!(
        models, again,
        "a rerun of a finished population changed its models"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_of_another_recipe_is_refused_and_left_alone() {
    let dir = temp_dir("population-recipe");
    let o = study(&small(&dir, "pop", &["study.only=0"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = dir.join("runs/pop");
    assert!(
        !root.join("report.md").exists(),
        "study.only writes no report"
    );
    let before = listing(&root);
    let o = study(&small(&dir, "pop", &["study.only=1", "train.lr=0.02"]));
    let message = text(&o);
    assert_eq!(o.status.code(), Some(2), "{message}");
    assert!(
        message.contains("another recipe")
            && message.contains("train.lr")
            && message.contains(&root.display().to_string()),
        "{message}"
    );
    assert_eq!(listing(&root), before, "the refused job wrote something");
    // Another model, population size, method list or thread count is the same recipe.
    let o = study(&small(
        &dir,
        "pop",
        &[
            "study.only=1",
            "study.population=4",
            "study.methods=[\"rl\"]",
            "device.threads=2",
        ],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_group_sizes_and_populations_are_refused_before_anything_is_written() {
    let dir = temp_dir("population-bad");
    // (run name, settings, command, what the message must name)
    let cases: [(&str, &[&str], &str, &str); 5] = [
        // A group of 2 ranks in a job of 1.
        ("groups", &["comm.group_size=2"], "study", "comm.group_size"),
        // Groups are for a population study only.
        ("train", &["comm.group_size=1"], "train", "comm.group_size"),
        // One model is no distribution.
        ("one", &["study.population=1"], "study", "study.population"),
        // A model the population does not have.
        ("only", &["study.only=3"], "study", "study.only"),
        // Membership without a population.
        (
            "subsample",
            &["study.population=0", "study.subsample=true"],
            "study",
            "study.subsample",
        ),
    ];
    for (name, extra, command, needle) in cases {
        assert_refused(
            &dir,
            name,
            &small(&dir, name, extra),
            &["-c", PRESET, command],
            needle,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
