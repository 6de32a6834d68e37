//! `sfron train` in one process: exact resume after SIGTERM, checkpoints that
//! survive SIGKILL, refusal of corrupted or foreign inputs, the non-finite
//! policy. (Multi-rank training is tested in `tests/mpi.rs`.)

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use sfron::engine::checkpoint;

mod support;
use support::{same_bits, temp_dir, test_seed};

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");

/// Settings of a short, fast run: batch 32, no decode threads, a metrics line
/// and a checkpoint every few steps.
fn sets(root: &Path, name: &str, steps: u64) -> Vec<String> {
    [
        format!("run.root={}", root.display()),
        format!("run.name={name}"),
        format!("data.root={MNIST}"),
        "data.workers=0".into(),
        "train.batch=32".into(),
        "train.epochs=2".into(),
        format!("train.max_steps={steps}"),
        "train.log_every=1".into(),
        "train.eval_every=0".into(),
        "checkpoint.every_steps=5".into(),
        format!("device.threads={}", support::threads()),
    ]
    .into()
}

fn command(sets: &[String], extra: &[&str]) -> std::process::Command {
    let mut cmd = support::sfron_alone();
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.arg("train").args(extra);
    cmd
}

fn train(sets: &[String], extra: &[&str]) -> Output {
    command(sets, extra).output().expect("run sfron train")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn model(root: &Path, name: &str) -> PathBuf {
    root.join(name).join("model.safetensors")
}

/// Every file under `dir` with its bytes (to prove nothing was written).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else if p.file_name().is_some_and(|n| n == sfron::rundir::LOCK_FILE) {
                // The run-folder lock names its latest holder: not an output.
                continue;
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sigterm_at_a_random_step_then_rerun_ends_bit_identical() {
    let root = temp_dir("train-sigterm");
    let steps = 24;
    let straight = train(&sets(&root, "straight", steps), &[]);
    assert_eq!(straight.status.code(), Some(0), "{}", text(&straight));
    let k = 1 + test_seed("sigterm step") % (steps - 2);
    let s = sets(&root, "cut", steps);
    let cut = train(&s, &["--fault-signal-at", &k.to_string()]);
    assert_eq!(
        cut.status.code(),
        Some(75),
        "signal at step {k}: {}",
        text(&cut)
    );
    assert!(
        !model(&root, "cut").exists(),
        "no final model after preemption"
    );
    let newest = checkpoint::newest(&root.join("cut/checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(
        newest.step,
        k + 1,
        "the checkpoint holds the step that finished"
    );
    let resumed = train(&s, &[]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    assert!(text(&resumed).contains("resuming"), "{}", text(&resumed));
    assert!(
        same_bits(&model(&root, "straight"), &model(&root, "cut")),
        "signal at step {k}: resumed weights differ from the uninterrupted run"
    );
    // Metrics hold each step once, in order.
    let metrics = std::fs::read_to_string(root.join("cut/metrics.jsonl")).unwrap();
    let steps_seen: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps_seen, (1..=steps).collect::<Vec<_>>());
    // Running it again once done changes nothing.
    let again = train(&s, &[]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(same_bits(&model(&root, "straight"), &model(&root, "cut")));
    std::fs::remove_dir_all(&root).unwrap();
}

fn spawn(sets: &[String]) -> Child {
    command(sets, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sfron train")
}

fn step_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn external_sigterm_and_sigusr1_exit_75_and_resume_exactly() {
    let root = temp_dir("train-external");
    let steps = 150;
    let straight = train(&sets(&root, "straight", steps), &[]);
    assert_eq!(straight.status.code(), Some(0), "{}", text(&straight));
    let s = sets(&root, "cut", steps);
    for signal in [libc::SIGTERM, libc::SIGUSR1] {
        let mut child = spawn(&s);
        let metrics = root.join("cut/metrics.jsonl");
        let start = Instant::now();
        let before = step_lines(&metrics);
        while step_lines(&metrics) < before + 3 && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(75), "signal {signal}: {err}");
    }
    let resumed = train(&s, &[]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    assert!(same_bits(&model(&root, "straight"), &model(&root, "cut")));
    std::fs::remove_dir_all(&root).unwrap();
}

/// SIGKILL at random moments of a run that checkpoints every step: the newest
/// complete checkpoint always reads back, and finishing the run gives the
/// uninterrupted weights. `SFRON_KILL_TRIALS` sets the number of kills (20).
#[test]
fn sigkill_while_checkpointing_never_breaks_the_newest_checkpoint() {
    let trials: u64 = std::env::var("SFRON_KILL_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let root = temp_dir("train-sigkill");
    let steps = 400;
    let mut s = sets(&root, "killed", steps);
    s.push("checkpoint.every_steps=1".into());
    s.push("checkpoint.keep_last=2".into());
    let mut rng = test_seed("sigkill delays");
    let dir = root.join("killed/checkpoints");
    let mut progress = Vec::new();
    for trial in 0..trials {
        let mut child = spawn(&s);
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = 300 + (rng >> 33) % 700;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        match checkpoint::newest(&dir) {
            Ok(newest) => progress.push(newest.map_or(0, |c| c.step)),
            Err(e) => panic!("trial {trial} (killed after {delay} ms, {status}): {e:#}"),
        }
    }
    println!("{trials} kills; newest checkpoint after each: {progress:?}");
    let finished = train(&s, &[]);
    assert_eq!(finished.status.code(), Some(0), "{}", text(&finished));
    let straight = train(&sets(&root, "straight", steps), &[]);
    assert_eq!(straight.status.code(), Some(0), "{}", text(&straight));
    assert!(same_bits(
        &model(&root, "straight"),
        &model(&root, "killed")
    ));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_flipped_byte_or_another_recipe_is_refused_and_nothing_is_written() {
    let root = temp_dir("train-flip");
    let s = sets(&root, "run", 10);
    let first = train(&s, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let mut longer = sets(&root, "run", 20);
    // Another learning rate: a different recipe, refused.
    longer.push("train.lr=0.01".into());
    let before = snapshot(&root);
    let o = train(&longer, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("another configuration"), "{}", text(&o));
    assert_eq!(snapshot(&root), before, "a refused resume wrote something");
    // One flipped byte in the newest checkpoint.
    let newest = checkpoint::list(&root.join("run/checkpoints"))
        .pop()
        .unwrap()
        .1;
    let file = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let before = snapshot(&root);
    let o = train(&sets(&root, "run", 20), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("fails its checksum") && text(&o).contains(&file.display().to_string()),
        "{}",
        text(&o)
    );
    assert_eq!(
        snapshot(&root),
        before,
        "a refused checkpoint wrote something"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_nan_step_is_skipped_bitwise_and_the_policy_stops_runs() {
    let root = temp_dir("train-nan");
    let k = 7;
    let o = train(&sets(&root, "k", k), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = train(
        &sets(&root, "nan", k + 1),
        &["--fault-nan-at", &k.to_string()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("non-finite"), "{}", text(&o));
    assert!(
        same_bits(&model(&root, "k"), &model(&root, "nan")),
        "the skipped step changed the weights"
    );
    // `error`: stop at once.
    let mut s = sets(&root, "strict", k + 5);
    s.push("train.nonfinite=error".into());
    let o = train(&s, &["--fault-nan-at", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not finite"), "{}", text(&o));
    // `skip` with max_skips = 1: stop with the last good step checkpointed.
    let mut s = sets(&root, "limit", k + 5);
    s.push("train.max_skips=1".into());
    let o = train(&s, &["--fault-nan-at", &k.to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("1 non-finite steps in a row"),
        "{}",
        text(&o)
    );
    let last = checkpoint::newest(&root.join("limit/checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(last.step, k);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A copy of the shipped MNIST with one training label changed: another dataset.
fn other_mnist(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for name in [
        "train-images-idx3-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(Path::new(MNIST).join(name), dir.join(name)).unwrap();
    }
    let mut labels = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(Path::new(MNIST).join("train-labels-idx1-ubyte.gz")).unwrap(),
    )
    .read_to_end(&mut labels)
    .unwrap();
    labels[8] = (labels[8] + 1) % 10;
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels).unwrap();
}

#[test]
fn bad_inputs_exit_2_name_the_problem_and_write_nothing() {
    let root = temp_dir("train-bad");
    // Weights of another architecture, and a truncated copy of them.
    let mut bn = sets(&root, "bn", 2);
    bn.push("model.arch=mnist_cnn_bn".into());
    let o = train(&bn, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let bn_weights = model(&root, "bn");
    let truncated = root.join("truncated.safetensors");
    let bytes = std::fs::read(&bn_weights).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // A split made for another dataset.
    let other = root.join("other-mnist");
    other_mnist(&other);
    let manifest = root.join("other-split.json");
    let o = support::sfron_alone()
        .args(["--set", &format!("data.root={}", other.display())])
        .args(["--set", &format!("run.root={}", root.display())])
        .args(["split", "--scenario", "random:0.1", "--out"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--init".into(), truncated.display().to_string()],
            "truncated.safetensors".into(),
        ),
        (
            vec!["--init".into(), bn_weights.display().to_string()],
            "mnist_cnn_bn".into(),
        ),
        (
            vec![
                "--on".into(),
                "remain".into(),
                "--split".into(),
                manifest.display().to_string(),
            ],
            "other-split.json".into(),
        ),
        (vec!["--on".into(), "remain".into()], "train.on".into()),
    ];
    for (args, needle) in cases {
        let s = sets(&root, "victim", 5);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = train(&s, &args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(&needle),
            "{args:?} should name {needle}: {}",
            text(&o)
        );
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
        assert!(
            !root.join("victim").exists(),
            "{args:?} wrote into the run folder"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn retrain_on_the_remain_set_never_reads_a_forgotten_sample_and_records_the_split() {
    let root = temp_dir("train-retrain");
    let manifest = root.join("split.json");
    let o = support::sfron_alone()
        .args(["--set", &format!("data.root={MNIST}")])
        .args(["--set", &format!("run.root={}", root.display())])
        .args(["split", "--scenario", "class:3", "--out"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mut s = sets(&root, "retrain", 60);
    s.push("train.eval_every=1".into());
    let split = manifest.display().to_string();
    let o = train(&s, &["--on", "remain", "--split", &split]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(root.join("retrain/split.json").is_file());
    let (_, meta) = sfron::model::weights::load(&model(&root, "retrain")).unwrap();
    let m = sfron::data::Manifest::load(&manifest).unwrap();
    assert_eq!(meta["sfron.split"], m.hash());
    assert_eq!(meta["sfron.command"], "retrain");
    std::fs::remove_dir_all(&root).unwrap();
}

/// bf16 autocast and the channels-last layout train on the CPU. The layout
/// changes the convolution kernels, not the result beyond their rounding
/// (the same recipe: a run may resume in either layout); bf16 changes the
/// numbers (within a few percent after 10 steps) and is part of the recipe.
#[test]
fn bf16_and_channels_last_train_on_the_cpu_and_bf16_is_part_of_the_recipe() {
    let root = temp_dir("train-compute");
    let run = |name: &str, steps: u64, extra: &[&str]| {
        let mut s = sets(&root, name, steps);
        s.push("model.arch=\"mnist_cnn_bn\"".into());
        // The smooth regime of tests/support/error_model.rs.
        s.push("train.lr=0.01".into());
        s.extend(extra.iter().map(|e| e.to_string()));
        train(&s, &[])
    };
    for (name, steps, extra) in [
        ("fp32", 10, &[][..]),
        (
            "bf16",
            10,
            &["device.precision=\"bf16\"", "device.channels_last=true"][..],
        ),
        ("fp32-1", 1, &[][..]),
        ("nhwc-1", 1, &["device.channels_last=true"][..]),
    ] {
        let o = run(name, steps, extra);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", text(&o));
    }
    let (fp32, bf16) = (model(&root, "fp32"), model(&root, "bf16"));
    // One step in each layout. The layout changes which convolution kernel
    // runs (oneDNN chooses per layout), not only the order of sums:
    // measured 1.2e-4 of the step here, far above the probabilistic
    // sum-order model of error_model. Bound: any stable convolution errs by
    // at most the worst-case γ_k ≈ k U of its k = 3·3·32 = 288-term dot
    // products, 1.7e-5, and transform-based kernels (Winograd) by up to a
    // hundred times that: 1.7e-3 of the step; allowed 1e-2. A layout bug
    // (weights read transposed) is of order 1. Over ten steps from a fresh
    // BatchNorm model the difference grows a thousandfold (measured), so
    // one step is compared.
    let step = support::error_model::path(&root.join("fp32-1/metrics.jsonl"), 0.0);
    let layout = support::l2_difference(&model(&root, "nhwc-1"), &model(&root, "fp32-1")) / step;
    let mixed = support::relative_l2_difference(&bf16, &fp32, "");
    println!(
        "channels-last vs fp32, one step: {layout:.2e} of the step; bf16 vs fp32, ten steps: relative L2 {mixed:.2e}"
    );
    assert!(
        layout <= 1e-2,
        "channels-last moved the weights by {layout} of the step"
    );
    // bf16 (8-bit mantissa, U = 2^-8) must change the numbers by far more
    // than float32 rounding, and by far less than a broken run (order 1).
    assert!(
        mixed > 1e-6 && mixed < 0.2,
        "bf16 vs fp32 relative L2 {mixed}: bf16 should change the numbers a little"
    );
    // Extending the fp32 run in bf16 is another recipe; in channels-last it resumes.
    let o = run("fp32", 12, &["device.precision=\"bf16\""]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("another configuration"), "{}", text(&o));
    let o = run("fp32", 12, &["device.channels_last=true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

/// A run folder belongs to one job at a time: a second `sfron train` on a
/// folder in use exits 2 naming the folder and the holder, and writes
/// nothing; the lock of a job killed with SIGKILL does not block the next
/// one, which resumes; a lock held by another process (here the test
/// itself) keeps eval and study out of their folders the same way.
#[test]
fn a_run_folder_in_use_is_refused_and_a_killed_holder_blocks_nothing() {
    let root = temp_dir("train-lock");
    let s = sets(&root, "busy", 400);
    let mut first = spawn(&s);
    let metrics = root.join("busy/metrics.jsonl");
    let start = Instant::now();
    while step_lines(&metrics) < 3 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = train(&s, &[]);
    let err = text(&second);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&root.join("busy").display().to_string())
            && err.contains(&format!("pid {}", first.id()))
            && err.contains("host ")
            && err.contains("sfron train"),
        "{err}"
    );
    // SIGKILL: no chance to clean up; the kernel drops the lock.
    // SAFETY: signals our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    assert!(root.join("busy").join(".sfron.lock").exists());
    let mut s = s;
    s.push("train.max_steps=6".into());
    let third = train(&s, &[]);
    assert_eq!(third.status.code(), Some(0), "{}", text(&third));

    // Held by another process: nothing in the folder changes.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("busy/.sfron.lock"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on our own descriptor; released when `held` closes.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let before = snapshot(&root.join("busy"));
    let again = train(&s, &[]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let eval = support::sfron(
        &[
            format!("run.root={}", root.display()),
            "run.name=busy".into(),
            format!("data.root={MNIST}"),
        ],
        &["eval", "--model", model(&root, "busy").to_str().unwrap()],
    );
    assert_eq!(eval.status.code(), Some(2), "{}", text(&eval));
    assert!(
        text(&eval).contains("in use by another job"),
        "{}",
        text(&eval)
    );
    assert_eq!(
        snapshot(&root.join("busy")),
        before,
        "the refused jobs wrote"
    );
    drop(held);
    std::fs::remove_dir_all(&root).unwrap();
}
