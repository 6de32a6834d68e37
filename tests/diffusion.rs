//! The denoising task against PyTorch: the class-conditional UNet of the
//! release (tests/golden/ddpm_reference.py) on the same random weights,
//! inputs, timesteps, classes and dropped conditions, both ways (PyTorch's
//! weights in sfron, sfron's in PyTorch, loaded strictly: every name the
//! release's), and the guided prediction.

use std::collections::BTreeMap;
use std::path::Path;

use sfron::model::unet::{Cond, Dropout, UnetSpec};
use sfron::model::{Arch, Model, weights};
use tch::{Device, Kind, Tensor};

mod support;
use support::temp_dir;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/ddpm_reference.py"
);

/// The shapes tested: a CIFAR-like three-level UNet with attention at
/// 8×8 and convolutional resampling, and an MNIST-like two-level one at
/// 28×28 with 16 channels in 8 groups, one block per level, attention at
/// the top level and pooling resamplers.
fn specs() -> Vec<(UnetSpec, i64, i64)> {
    vec![
        (
            UnetSpec {
                ch: 32,
                ch_mult: vec![1, 2, 2],
                num_res_blocks: 2,
                attn_resolutions: vec![8],
                dropout: 0.1,
                resolution: 16,
                resamp_with_conv: true,
                groups: 32,
            },
            3,
            10,
        ),
        (
            UnetSpec {
                ch: 16,
                ch_mult: vec![1, 2],
                num_res_blocks: 1,
                attn_resolutions: vec![28],
                dropout: 0.0,
                resolution: 28,
                resamp_with_conv: false,
                groups: 8,
            },
            1,
            10,
        ),
    ]
}

fn spec_json(spec: &UnetSpec, channels: i64, classes: i64) -> String {
    serde_json::json!({
        "ch": spec.ch, "ch_mult": spec.ch_mult, "num_res_blocks": spec.num_res_blocks,
        "attn_resolutions": spec.attn_resolutions, "resolution": spec.resolution,
        "resamp_with_conv": spec.resamp_with_conv, "groups": spec.groups,
        "channels": channels, "classes": classes,
    })
    .to_string()
}

fn run_reference(mode: &str, dir: &Path, spec: &str) -> String {
    support::run_python(REFERENCE, &[mode.as_ref(), dir.as_os_str(), spec.as_ref()])
}

/// Eval-mode outputs of one UNet computed twice, relative to the largest
/// output: error_model::forward with the network's weighted layers (every
/// conv and linear counted as if in sequence: an upper bound on the depth)
/// and its largest fan-in (3 × 3 × the widest concatenation). GroupNorm,
/// softmax and swish are elementwise or short reductions of order-1 gain.
/// Weights in the wrong place or a mis-wired skip are off by order 1.
fn tolerance(model: &Model) -> f64 {
    let mut layers = 0.0;
    let mut fan_in: f64 = 0.0;
    for (name, t) in model.parameters() {
        if name.ends_with(".weight") && t.dim() >= 2 {
            layers += 1.0;
            fan_in = fan_in.max((t.numel() as i64 / t.size()[0]) as f64);
        }
    }
    support::error_model::forward(layers, fan_in)
}

fn inputs(dir: &Path, file: &str) -> BTreeMap<String, Tensor> {
    weights::load(&dir.join(file))
        .unwrap()
        .0
        .into_iter()
        .collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn the_unet_gives_pytorchs_outputs_on_the_same_weights_both_ways() {
    for (k, (spec, channels, classes)) in specs().into_iter().enumerate() {
        let dir = temp_dir(&format!("unet-golden-{k}"));
        let json = spec_json(&spec, channels, classes);
        run_reference("make", &dir, &json);

        // PyTorch → sfron.
        let mut model = Model::new(Arch::Unet(spec.clone()), channels, classes, Device::Cpu);
        model.load(&dir.join("unet.safetensors")).unwrap();
        let io = inputs(&dir, "unet.io.safetensors");
        let keep = io["keep"].to_kind(Kind::Bool);
        let cond = Cond {
            t: &io["t"],
            c: &io["c"],
            keep: Some(&keep),
        };
        let ours = tch::no_grad(|| model.denoise(&io["x"], &cond, &Dropout::Off));
        let allowed = tolerance(&model);
        let diff = max_abs(&(&ours - &io["y"])) / max_abs(&io["y"]);
        assert!(
            diff <= allowed,
            "{}: PyTorch weights in sfron, relative max difference {diff:e} (allowed {allowed:e})",
            spec.name()
        );
        let guided = tch::no_grad(|| model.denoise_guided(&io["x"], &io["t"], &io["c"], 2.0));
        // The guided output is 3 cond − 2 uncond: its error is at most 5
        // times one forward pass's, relative to the larger of the two.
        let scale = max_abs(&io["g"]).max(max_abs(&io["y"]));
        let gdiff = max_abs(&(&guided - &io["g"])) / scale;
        assert!(
            gdiff <= 5.0 * allowed,
            "{}: guided prediction, relative max difference {gdiff:e} (allowed {:e})",
            spec.name(),
            5.0 * allowed
        );
        // Dropped conditions matter (else `keep` would not be tested).
        let all_kept = tch::no_grad(|| {
            let cond = Cond {
                t: &io["t"],
                c: &io["c"],
                keep: None,
            };
            model.denoise(&io["x"], &cond, &Dropout::Off)
        });
        let moved = max_abs(&(&all_kept - &ours).narrow(0, 1, 1)) / max_abs(&io["y"]);
        assert!(
            moved > 10.0 * allowed,
            "the null class changed nothing: {moved:e}"
        );

        // sfron → PyTorch, loaded strictly.
        tch::manual_seed(5);
        let fresh = Model::new(Arch::Unet(spec.clone()), channels, classes, Device::Cpu);
        fresh
            .save(&dir.join("unet.sfron.safetensors"), BTreeMap::new())
            .unwrap();
        let y = tch::no_grad(|| fresh.denoise(&io["x"], &cond, &Dropout::Off));
        let mut io_out: Vec<(String, Tensor)> = ["x", "t", "c", "keep"]
            .iter()
            .map(|n| (n.to_string(), io[*n].shallow_clone()))
            .collect();
        io_out.push(("y".into(), y));
        weights::save(
            &dir.join("unet.sfron_io.safetensors"),
            &io_out,
            &BTreeMap::new(),
        )
        .unwrap();
        let report = run_reference("check", &dir, &json);
        let line = report.lines().find(|l| l.starts_with('{')).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let rel = v["diff"].as_f64().unwrap() / v["scale"].as_f64().unwrap();
        let allowed = tolerance(&fresh);
        assert!(
            rel <= allowed,
            "{}: sfron weights in PyTorch, relative max difference {rel:e} (allowed {allowed:e})",
            spec.name()
        );
        println!(
            "{}: relative differences {diff:e} / guided {gdiff:e} / reverse {rel:e} (allowed {allowed:e})",
            spec.name()
        );
    }
}

/// The Fréchet distance against pytorch-fid's formula (scipy's `sqrtm`) on
/// fixed features: two sets of 64-dimensional features with unlike
/// covariances (one a random linear map of the other's distribution, one
/// shifted). Both sides compute in float64; the eigenvalue route and
/// scipy's Schur-based `sqrtm` each carry round-off of order 1e-12 of the
/// traces, so 1e-8 of `Tr Σ₁ + Tr Σ₂` bounds their difference; a wrong
/// covariance normaliser (N instead of N − 1) moves the distance by
/// 2/N of the traces (4e-3 here), a missing cross term by order 1.
#[test]
fn the_frechet_distance_matches_pytorch_fid_with_scipy_sqrtm() {
    use sfron::eval::generation::{frechet_distance, moments};
    tch::manual_seed(17);
    let opts = (Kind::Double, Device::Cpu);
    let a = Tensor::randn([500, 64], opts);
    let map = Tensor::randn([64, 64], opts) / 8.0;
    let b = Tensor::randn([300, 64], opts).matmul(&map) + 0.3;
    let dir = temp_dir("fid-golden");
    let file = dir.join("features.safetensors");
    weights::save(
        &file,
        &[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    let text = support::run_python(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/fid_reference.py"),
        &[file.as_os_str()],
    );
    let line = text.lines().find(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let theirs = v["fid"].as_f64().unwrap();
    let (mu_a, s_a) = moments(&a);
    let (mu_b, s_b) = moments(&b);
    let ours = frechet_distance(&mu_a, &s_a, &mu_b, &s_b);
    let scale = s_a.trace().double_value(&[]) + s_b.trace().double_value(&[]);
    println!("FID ours {ours:.12} scipy {theirs:.12} (traces {scale:.3})");
    assert!(
        (ours - theirs).abs() <= 1e-8 * scale,
        "ours {ours} vs scipy {theirs}"
    );
}

/// `sfron convert` of the DDPM release's `ckpt.pth` (a list of the
/// DataParallel model's state_dict, the optimizer's, the step and the EMA's):
/// the model's weights, and with `--ema` the EMA's, come out under the
/// release's names without `module.`, bit for bit; a classifier's
/// checkpoint given as a DDPM one is refused with exit 2 and nothing written.
#[test]
fn convert_reads_the_released_ddpm_checkpoint_and_its_ema() {
    let (spec, channels, classes) = specs().remove(1);
    let dir = temp_dir("unet-convert");
    let json = spec_json(&spec, channels, classes);
    run_reference("ckpt", &dir, &json);
    let sets = [
        "model.arch=ddpm_unet".to_string(),
        format!("model.unet.ch={}", spec.ch),
        "model.unet.ch_mult=[1, 2]".into(),
        format!("model.unet.num_res_blocks={}", spec.num_res_blocks),
        "model.unet.attn_resolutions=[28]".into(),
        "model.unet.resamp_with_conv=false".into(),
        format!("model.unet.groups={}", spec.groups),
        "data.transform=diffusion".into(),
        format!("run.root={}", dir.display()),
    ];
    for (flag, expected) in [(None, "raw"), (Some("--ema"), "ema")] {
        let out = dir.join(format!("{expected}.sfron.safetensors"));
        let ckpt = dir.join("ckpt.pth");
        let mut args = vec!["convert", ckpt.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(flag);
        let o = support::sfron(&sets, &args);
        assert!(o.status.success(), "{}", support::text(&o));
        let ours = support::tensors(&out);
        let theirs = support::tensors(&dir.join(format!("{expected}.safetensors")));
        let names = |v: &[(String, Vec<f32>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{expected}: names");
        assert!(ours == theirs, "{expected}: values differ");
    }
    // A classifier's state_dict is not a DDPM checkpoint.
    let classifier = dir.join("classifier.safetensors");
    Model::new(Arch::parse("mnist_cnn", 1.0).unwrap(), 1, 10, Device::Cpu)
        .save(&classifier, BTreeMap::new())
        .unwrap();
    let out = dir.join("refused.safetensors");
    let o = support::sfron(
        &sets,
        &[
            "convert",
            classifier.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", support::text(&o));
    assert!(
        support::text(&o).contains("not a DDPM checkpoint"),
        "{}",
        support::text(&o)
    );
    assert!(!out.exists());
}

/// Bad input to the diffusion commands: exit 2, a message naming the key,
/// file or class, and no run folder left behind.
#[test]
fn bad_diffusion_input_exits_2_naming_it_and_writes_nothing() {
    let dir = temp_dir("unet-bad");
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let classifier = dir.join("classifier.safetensors");
    Model::new(Arch::parse("mnist_cnn", 1.0).unwrap(), 1, 10, Device::Cpu)
        .save(&classifier, BTreeMap::new())
        .unwrap();
    let (spec, _, _) = specs().remove(1);
    let denoiser = dir.join("denoiser.safetensors");
    Model::new(Arch::Unet(spec), 1, 10, Device::Cpu)
        .save(&denoiser, BTreeMap::new())
        .unwrap();
    let base = |name: &str| {
        vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            format!("data.root={mnist}"),
            "model.arch=ddpm_unet".into(),
            "model.unet.ch=16".into(),
            "model.unet.ch_mult=[1, 2]".into(),
            "model.unet.num_res_blocks=1".into(),
            "model.unet.attn_resolutions=[28]".into(),
            "model.unet.resamp_with_conv=false".into(),
            "model.unet.groups=8".into(),
            "data.transform=diffusion".into(),
        ]
    };
    let split = dir.join("split.json");
    let o = support::sfron(
        &base("split-make"),
        &[
            "split",
            "--scenario",
            "class:3",
            "--out",
            split.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", support::text(&o));
    let split = split.display().to_string();
    let cases: Vec<(&str, Vec<String>, Vec<String>, &str)> = vec![
        (
            "guidance",
            vec!["sample.guidance=-1".into()],
            vec![
                "sample".into(),
                "--from".into(),
                denoiser.display().to_string(),
            ],
            "sample.guidance",
        ),
        (
            "steps",
            vec!["sample.steps=0".into()],
            vec![
                "sample".into(),
                "--from".into(),
                denoiser.display().to_string(),
            ],
            "sample.steps",
        ),
        (
            "class",
            vec!["sample.classes=[12]".into()],
            vec![
                "sample".into(),
                "--from".into(),
                denoiser.display().to_string(),
            ],
            "class 12",
        ),
        (
            "classifier-weights",
            vec![],
            vec![
                "sample".into(),
                "--from".into(),
                classifier.display().to_string(),
            ],
            "not the weights of a diffusion model",
        ),
        (
            "transform",
            vec!["data.transform=mnist".into()],
            vec!["train".into()],
            "data.transform",
        ),
        (
            "denoiser-to-classifier-eval",
            vec!["model.arch=mnist_cnn".into(), "data.transform=auto".into()],
            vec![
                "eval".into(),
                "--model".into(),
                denoiser.display().to_string(),
                "--split".into(),
                split.clone(),
            ],
            "ddpm_unet",
        ),
        (
            "classifier-method",
            vec![],
            vec![
                "unlearn".into(),
                "--method".into(),
                "scrub".into(),
                "--from".into(),
                denoiser.display().to_string(),
                "--split".into(),
                split.clone(),
            ],
            "unlearn.method",
        ),
        (
            "inception-missing",
            vec![
                format!("eval.classifier={}", classifier.display()),
                format!(
                    "eval.inception={}",
                    dir.join("no-inception.safetensors").display()
                ),
            ],
            vec![
                "eval".into(),
                "--model".into(),
                denoiser.display().to_string(),
                "--split".into(),
                split.clone(),
            ],
            "no-inception.safetensors",
        ),
        (
            "sa-on-a-classifier",
            vec!["model.arch=mnist_cnn".into(), "data.transform=auto".into()],
            vec![
                "unlearn".into(),
                "--method".into(),
                "sa".into(),
                "--from".into(),
                classifier.display().to_string(),
                "--split".into(),
                split.clone(),
            ],
            "needs a diffusion model",
        ),
    ];
    for (name, extra, args, needle) in cases {
        let mut sets = base(name);
        sets.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::assert_refused(&dir, name, &sets, &args, needle);
    }
}

/// A diffusion study end to end at a tiny scale: original, Retrain, SFR-on
/// (with snapshots) and SA, each judged on generated images, the report
/// with the table, the grids and SFR-on's path; a rerun reuses every stage.
#[test]
fn a_diffusion_study_reports_every_model_against_retrain_and_reruns_from_its_stages() {
    let dir = temp_dir("ddpm-study");
    let common = |name: &str| support::digit_sets(&dir, name, 300);
    // The judge: a digit classifier trained for a few steps.
    let judge = support::train_digit_judge(&dir, 300, 20);
    let mut sets = common("study");
    sets.extend([
        "model.arch=ddpm_unet".to_string(),
        "model.unet.ch=16".into(),
        "model.unet.ch_mult=[1, 2]".into(),
        "model.unet.num_res_blocks=1".into(),
        "model.unet.attn_resolutions=[14]".into(),
        "model.unet.groups=8".into(),
        "data.transform=diffusion".into(),
        "diffusion.ema_decay=0.9".into(),
        "train.batch=32".into(),
        "train.clip=1".into(),
        "train.max_steps=6".into(),
        "unlearn.batch=16".into(),
        "unlearn.forget_batch=8".into(),
        "unlearn.snapshot_every=2".into(),
        "sfron.iterations=4".into(),
        "sfron.fisher_batch=16".into(),
        "sfron.fisher_remain_batches=2".into(),
        "sa.iterations=3".into(),
        "sa.per_class=2".into(),
        "sa.sample_steps=4".into(),
        "sa.fisher_timesteps=4".into(),
        "sample.method=ddpm".into(),
        "sample.steps=5".into(),
        "sample.per_class=3".into(),
        "sample.grid=3".into(),
        "study.scenario=class:3".into(),
        "study.methods=[\"sfron\", \"sa\"]".into(),
        "study.snapshot_per_class=2".into(),
        format!("eval.classifier={}", judge.display()),
    ]);
    let o = support::sfron(&sets, &["study"]);
    let text = support::text(&o);
    assert!(o.status.success(), "{text}");
    let root = dir.join("runs/study");
    let md = std::fs::read_to_string(root.join("report.md")).unwrap();
    for needle in [
        "| Original |",
        "| Retrain |",
        "| SFR-on |",
        "| SA |",
        "FID (classifier)",
        "all ",
        "seed-0/eval/sfron/grid.png",
        "plots/snapshots.svg",
        "| 4 |",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    for name in ["original", "retrain", "sfron", "sa"] {
        assert!(
            root.join(format!("seed-0/eval/{name}/grid.png")).is_file(),
            "{name}"
        );
    }
    for n in [2, 4] {
        assert!(
            root.join(format!("seed-0/eval/sfron-snapshots/iter-{n:06}/eval.json"))
                .is_file()
        );
    }
    assert!(root.join("plots/snapshots.svg").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("report.json")).unwrap()).unwrap();
    let retrain = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "retrain")
        .unwrap();
    assert_eq!(retrain["forget_acc_gap"]["mean"], 0.0);
    // A rerun reuses every stage and writes the same table.
    let again = support::sfron(&sets, &["study"]);
    assert!(again.status.success(), "{}", support::text(&again));
    assert_eq!(
        std::fs::read_to_string(root.join("report.md")).unwrap(),
        md,
        "the rerun's report differs"
    );
}
