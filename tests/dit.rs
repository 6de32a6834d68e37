//! DiT against PyTorch: the reference network of facebookresearch/DiT
//! (tests/golden/dit_reference.py) with every weight randomised, its
//! state_dict loaded strictly into [`Dit`] (every name present with its
//! shape, none extra), then the forward pass with a dropped class, the
//! guided forward pass (`forward_with_cfg`, scale 4) and the gradients of
//! `sum(out²)` compared; and the public sizes' parameter counts.

use std::collections::BTreeMap;
use std::path::Path;

use sfron::model::dit::{Dit, DitSpec, NAMES, sincos_pos_embed_2d};
use sfron::model::weights;
use tch::{Device, Kind, Tensor, nn};

mod support;
use support::{error_model, temp_dir};

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/dit_reference.py");

/// The shapes tested: depth 2, width 64 in 4 heads, patch 2 on 8 × 8 × 4
/// latents with learn_sigma (the layout of the public models, small); and
/// patch 4 on 16 × 16 × 4 latents, width 48 in 3 heads (an odd head count),
/// MLP ratio 2, without learn_sigma (4 output channels, of which the guided
/// forward pass guides 3).
fn specs() -> Vec<DitSpec> {
    vec![
        DitSpec {
            depth: 2,
            hidden: 64,
            heads: 4,
            patch: 2,
            input_size: 8,
            in_channels: 4,
            classes: 10,
            learn_sigma: true,
            class_dropout_prob: 0.1,
            mlp_ratio: 4.0,
        },
        DitSpec {
            depth: 2,
            hidden: 48,
            heads: 3,
            patch: 4,
            input_size: 16,
            in_channels: 4,
            classes: 7,
            learn_sigma: false,
            class_dropout_prob: 0.1,
            mlp_ratio: 2.0,
        },
    ]
}

fn spec_json(s: &DitSpec) -> String {
    serde_json::json!({
        "depth": s.depth, "hidden": s.hidden, "heads": s.heads, "patch": s.patch,
        "input_size": s.input_size, "in_channels": s.in_channels, "classes": s.classes,
        "learn_sigma": s.learn_sigma, "class_dropout_prob": s.class_dropout_prob,
        "mlp_ratio": s.mlp_ratio,
    })
    .to_string()
}

fn file(dir: &Path, name: &str) -> BTreeMap<String, Tensor> {
    weights::load(&dir.join(name))
        .unwrap()
        .0
        .into_iter()
        .collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

/// Outputs computed twice, relative to the largest output:
/// error_model::forward with the network's weighted layers counted as if in
/// sequence (the patch embedding, the timestep MLP's two, five per block —
/// qkv, proj, fc1, fc2, adaLN — and the final layer's two; the class table
/// is a lookup, no sum) and the longest dot product: the widest fan-in
/// (fc2's `mlp_hidden`, the timestep MLP's 256) or the attention's sums
/// (`head_dim` for q kᵀ, `T` for the weighted values). LayerNorm, softmax,
/// SiLU and GELU are elementwise or short reductions of order-1 gain (the
/// reference's weights are scaled to keep activations of order 1).
/// Misplaced weights, a transposed unpatchify, sin/cos swapped or a wrong
/// attention scale are off by order 1.
fn forward_tolerance(s: &DitSpec) -> f64 {
    let layers = (1 + 2 + 5 * s.depth + 2) as f64;
    let fan_in = [
        s.mlp_hidden(),
        s.hidden,
        256,
        s.in_channels * s.patch * s.patch,
        s.tokens(),
    ]
    .into_iter()
    .max()
    .unwrap() as f64;
    error_model::forward(layers, fan_in)
}

/// Gradients of `sum(out²)` computed twice, norm-wise per tensor and
/// relative: the backward pass runs through the same layers again (so twice
/// the forward's layers), and a weight gradient sums over the batch's
/// tokens (`N T`) besides the fan-outs: the longest sum is the largest of
/// those and the forward's. Per tensor the cancellation can be larger than
/// the model's κ = 4 (a bias gradient sums one unit's error over every
/// token, of both signs): κ = 40, as error_model::fisher_tensor allows.
fn gradient_tolerance(s: &DitSpec, batch: i64) -> f64 {
    let layers = 2.0 * (1 + 2 + 5 * s.depth + 2) as f64;
    let n = [
        s.mlp_hidden(),
        3 * s.hidden,
        256,
        s.tokens(),
        batch * s.tokens(),
        s.patch * s.patch * s.out_channels(),
    ]
    .into_iter()
    .max()
    .unwrap() as f64;
    layers * error_model::sum_difference(n, 40.0)
}

#[test]
fn dit_gives_the_references_outputs_guidance_and_gradients_on_its_weights() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    for (k, spec) in specs().into_iter().enumerate() {
        let dir = temp_dir(&format!("dit-golden-{k}"));
        let json = spec_json(&spec);
        let text = support::run_python(
            REFERENCE,
            &["make".as_ref(), dir.as_os_str(), json.as_ref()],
        );
        let line = text.lines().find(|l| l.starts_with('{')).unwrap();
        let counts: serde_json::Value = serde_json::from_str(line).unwrap();

        let vs = nn::VarStore::new(Device::Cpu);
        let dit = Dit::new(&vs.root(), &spec);
        // The fixed position embedding as the reference computes it (numpy
        // in float64, then float32): equal to the last bit but for the
        // libm sin/cos of the two languages.
        let state = file(&dir, "dit.safetensors");
        let io = file(&dir, "dit.io.safetensors");
        let ours_pos = vs.variables()["pos_embed"].shallow_clone();
        let pos_diff = max_abs(&(&ours_pos - &state["pos_embed"]));
        assert!(pos_diff <= 1e-6, "pos_embed differs by {pos_diff:e}");
        assert!(!ours_pos.requires_grad(), "pos_embed is not trained");
        println!("spec {k}: pos_embed max |difference| {pos_diff:e}");
        // The parameter counts, as the reference counts them.
        let (all, trainable) = numels(&vs);
        assert_eq!(all, counts["parameters"].as_i64().unwrap());
        assert_eq!(trainable, counts["trainable"].as_i64().unwrap());

        // DiT-XL/2's (16 × 16 tokens of width 1152).
        let xl: Vec<f32> = sincos_pos_embed_2d(1152, 16)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let xl_diff = max_abs(&(Tensor::from_slice(&xl).view([256, 1152]) - &io["pos_xl"]));
        assert!(
            xl_diff <= 1e-6,
            "DiT-XL/2's pos_embed differs by {xl_diff:e}"
        );
        println!("DiT-XL/2 pos_embed max |difference| {xl_diff:e}");

        // Strict load: the reference's names and shapes, nothing missing or extra.
        let tensors: Vec<(String, Tensor)> = state
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        weights::copy_into(&vs, &tensors, &dir.join("dit.safetensors")).unwrap();

        let drop = io["drop"].to_kind(Kind::Bool);
        let x = io["x"].set_requires_grad(true);
        let out = dit.forward(&x, &io["t"], &io["y"], Some(&drop));
        let allowed = forward_tolerance(&spec);
        let scale = max_abs(&io["out"]);
        let diff = max_abs(&(&out.detach() - &io["out"])) / scale;
        assert!(
            diff <= allowed,
            "spec {k}: forward, relative max difference {diff:e} (allowed {allowed:e})"
        );
        // The dropped class matters (else `drop` would not be tested).
        let kept = tch::no_grad(|| dit.forward(&io["x"], &io["t"], &io["y"], None));
        let moved = max_abs(&(&kept - &io["out"]).narrow(0, 1, 1)) / scale;
        assert!(
            moved > 10.0 * allowed,
            "spec {k}: the null class changed nothing ({moved:e})"
        );

        // Guided: uncond + 4 (cond − uncond) = 5 cond − 4 uncond on 3
        // channels; its error is at most 9 times one forward pass's,
        // relative to the larger of the outputs.
        let cfg = tch::no_grad(|| dit.forward_with_cfg(&io["x"], &io["t"], &io["cfg_y"], 4.0));
        let cfg_scale = max_abs(&io["cfg"]).max(scale);
        let cfg_diff = max_abs(&(&cfg - &io["cfg"])) / cfg_scale;
        assert!(
            cfg_diff <= 9.0 * allowed,
            "spec {k}: forward_with_cfg, relative max difference {cfg_diff:e} (allowed {:e})",
            9.0 * allowed
        );

        // Gradients of sum(out²), every trainable parameter and the input.
        let grads = file(&dir, "dit.grad.safetensors");
        let loss = out.square().sum(Kind::Float);
        let params = vs.trainable_variables();
        let named: BTreeMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        assert_eq!(named.len(), params.len());
        let mut inputs: Vec<Tensor> = named.values().map(Tensor::shallow_clone).collect();
        inputs.push(x.shallow_clone());
        let ours = Tensor::run_backward(&[loss], &inputs, false, false);
        let gallowed = gradient_tolerance(&spec, x.size()[0]);
        let mut names: Vec<&str> = named.keys().map(String::as_str).collect();
        names.push("x");
        assert_eq!(
            names.len(),
            grads.len(),
            "the reference's gradients are every trainable parameter and x"
        );
        let mut worst = (String::new(), 0f64);
        for (name, g) in names.iter().zip(&ours) {
            let reference = &grads[*name];
            let rel = norm(&(g - reference)) / norm(reference).max(1e-30);
            if rel > worst.1 {
                worst = (name.to_string(), rel);
            }
        }
        assert!(
            worst.1 <= gallowed,
            "spec {k}: gradient of {}, relative difference {:e} (allowed {gallowed:e})",
            worst.0,
            worst.1
        );
        println!(
            "spec {k} ({threads} threads): relative differences forward {diff:e} (allowed \
             {allowed:e}), cfg {cfg_diff:e} (allowed {:e}), worst gradient {} {:e} (allowed \
             {gallowed:e})",
            9.0 * allowed,
            worst.0,
            worst.1
        );
    }
}

#[test]
fn a_file_lacking_a_tensor_or_with_a_wrong_shape_is_refused_naming_it() {
    let spec = &specs()[0];
    let vs = nn::VarStore::new(Device::Cpu);
    let _dit = Dit::new(&vs.root(), spec);
    // One tensor left out, one of the wrong shape.
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n != "blocks.1.attn.qkv.bias")
        .map(|(n, t)| {
            if n == "y_embedder.embedding_table.weight" {
                (n, Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)))
            } else {
                (n, t)
            }
        })
        .collect();
    let err = weights::copy_into(&vs, &tensors, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing blocks.1.attn.qkv.bias"), "{err}");
    assert!(err.contains("y_embedder.embedding_table.weight"), "{err}");
}

/// The public configurations: the paper's sizes, and DiT-XL/2's parameter
/// count as the reference's train.py logs it (`sum(p.numel() for p in
/// model.parameters())`, 675,129,632: the frozen pos_embed's 256 × 1152 =
/// 294,912 included, 674,834,720 trained). Built on the CPU (2.7 GB, a
/// few seconds of initialisation).
#[test]
fn the_public_sizes_and_dit_xl_2s_parameter_count() {
    let xl2 = DitSpec::named("DiT-XL/2").unwrap();
    assert_eq!(
        (xl2.depth, xl2.hidden, xl2.heads, xl2.patch),
        (28, 1152, 16, 2)
    );
    assert_eq!(
        (
            xl2.input_size,
            xl2.in_channels,
            xl2.classes,
            xl2.out_channels()
        ),
        (32, 4, 1000, 8)
    );
    assert!(xl2.learn_sigma && xl2.class_dropout_prob == 0.1 && xl2.mlp_ratio == 4.0);
    for name in NAMES {
        let s = DitSpec::named(name).unwrap();
        let (size, patch) = name.trim_start_matches("DiT-").split_once('/').unwrap();
        let expected = match size {
            "S" => (12, 384, 6),
            "B" => (12, 768, 12),
            "L" => (24, 1024, 16),
            _ => (28, 1152, 16),
        };
        assert_eq!((s.depth, s.hidden, s.heads), expected, "{name}");
        assert_eq!(s.patch.to_string(), patch, "{name}");
    }
    for bad in ["DiT-XXL/2", "DiT-XL/3", "XL/2", ""] {
        let err = DitSpec::named(bad).unwrap_err();
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }

    let count = |spec: &DitSpec| {
        let vs = nn::VarStore::new(Device::Cpu);
        let _dit = Dit::new(&vs.root(), spec);
        numels(&vs)
    };
    assert_eq!(count(&xl2), (675_129_632, 674_834_720));
}

/// Elements of every variable of `vs` (the reference's
/// `model.parameters()`, frozen `pos_embed` included) and of the trained ones.
fn numels(vs: &nn::VarStore) -> (i64, i64) {
    let all = vs.variables().values().map(|t| t.numel() as i64).sum();
    let trainable = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    (all, trainable)
}

/// A small DiT on the shipped digits through the commands, under ADM's
/// process: `train` (the loss is ADM's MSE plus the variational bound, so
/// it starts near 1 per element plus the bound's bits), `sample` with the
/// respaced DDPM sampler (learned variance) and with DDIM, and `unlearn`
/// with SFR-on; then the configurations that must be refused (exit 2, the
/// key named, no run folder).
#[test]
fn a_small_dit_trains_samples_and_unlearns_and_bad_dit_settings_are_refused() {
    let dir = temp_dir("dit-cli");
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let base = |name: &str| {
        vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            format!("data.root={mnist}"),
            "data.train_limit=200".into(),
            "data.workers=0".into(),
            "data.transform=diffusion".into(),
            format!("device.threads={}", support::threads()),
            "log.level=warn".into(),
            "model.arch=dit".into(),
            "model.dit.name=DiT-S/4".into(),
            "model.dit.depth=2".into(),
            "model.dit.hidden=32".into(),
            "model.dit.heads=2".into(),
            "diffusion.ema_decay=0.9".into(),
            "train.batch=16".into(),
            "train.max_steps=4".into(),
            "sample.per_class=1".into(),
            "sample.classes=[2, 5]".into(),
            "sample.steps=6".into(),
        ]
    };
    let o = support::sfron(&base("train"), &["train"]);
    assert!(o.status.success(), "{}", support::text(&o));
    let run = dir.join("runs/train");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .find(|l| l.contains("\"step\""))
            .unwrap(),
    )
    .unwrap();
    let loss = first["loss"].as_f64().unwrap();
    assert!(
        loss.is_finite() && loss > 0.5 && loss < 50.0,
        "first loss {loss}"
    );
    // Activation checkpointing (device.recompute): the same training, its
    // gradients equal up to the conditioning's reassociation (≤ 4 (depth +
    // 1) u relative, recomputed_blocks_give_the_gradients_of_the_kept_graph),
    // which moves each AdamW update by about twice that fraction of the
    // learning rate: after 4 steps far below 1e-6 of the weights' norm.
    let mut sets = base("train-recompute");
    sets.push("device.recompute=true".into());
    let o = support::sfron(&sets, &["train"]);
    assert!(o.status.success(), "{}", support::text(&o));
    let recomputed = dir.join("runs/train-recompute/model.safetensors");
    let d = support::relative_l2_difference(&run.join("model.safetensors"), &recomputed, "");
    assert!(d <= 1e-6, "recomputed blocks moved the weights by {d:e}");
    let from = run.display().to_string();
    for (name, method) in [("sample-ddpm", "ddpm"), ("sample-ddim", "ddim")] {
        let mut sets = base(name);
        sets.push(format!("sample.method={method}"));
        sets.push(format!("sample.png_files={}", method == "ddim"));
        let o = support::sfron(&sets, &["sample", "--from", &from]);
        assert!(o.status.success(), "{name}: {}", support::text(&o));
        let out = dir.join("runs").join(name);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("sample.json")).unwrap())
                .unwrap();
        assert_eq!(meta["process"], "adm");
        assert_eq!(
            meta["steps"], 6,
            "the respaced process takes sample.steps steps"
        );
        let (tensors, _) = weights::load(&out.join("samples.safetensors")).unwrap();
        let images = &tensors.iter().find(|(n, _)| n == "images").unwrap().1;
        assert_eq!(images.size(), [2, 1, 28, 28]);
        // The .npz for FID tools, as numpy reads it.
        let text = support::run_python(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/read_npz.py"),
            &[
                out.join("samples.npz").as_os_str(),
                out.join("samples.safetensors").as_os_str(),
            ],
        );
        let line = text.lines().find(|l| l.starts_with('{')).unwrap();
        let npz: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(npz["shape"], serde_json::json!([2, 28, 28, 1]), "{npz}");
        assert_eq!(npz["dtype"], "uint8");
        assert_eq!(npz["labels"], serde_json::json!([2, 5]));
        assert_eq!(npz["equal"], true, "{npz}");
        let pngs = ["0002-000000.png", "0005-000000.png"];
        let written = pngs.iter().all(|p| out.join("samples").join(p).is_file());
        assert_eq!(written, method == "ddim", "{name}: per-image PNGs");
    }
    let split = dir.join("split.json").display().to_string();
    let o = support::sfron(
        &base("split"),
        &["split", "--scenario", "class:3", "--out", &split],
    );
    assert!(o.status.success(), "{}", support::text(&o));
    let weights_file = run.join("model.safetensors").display().to_string();
    // SFR-on with unlearn.remain_classes = 2: the remain steps and the
    // remain Fisher read only the two drawn classes (not the forgotten 3).
    let mut sets = base("sfron");
    sets.extend([
        "unlearn.batch=16".into(),
        "unlearn.forget_batch=8".into(),
        "sfron.iterations=3".into(),
        "sfron.fisher_batch=16".into(),
        "sfron.fisher_remain_batches=2".into(),
        "unlearn.remain_classes=2".into(),
    ]);
    let trace = dir.join("two.trace.jsonl");
    let o = support::sfron(
        &sets,
        &[
            "unlearn",
            "--method",
            "sfron",
            "--from",
            &weights_file,
            "--split",
            &split,
            "--trace",
            trace.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", support::text(&o));
    assert!(dir.join("runs/sfron/model.safetensors").is_file());
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs/sfron/unlearn.json")).unwrap(),
    )
    .unwrap();
    let kept: Vec<i64> = serde_json::from_value(summary["remain_classes"].clone()).unwrap();
    assert_eq!(kept.len(), 2, "{summary}");
    assert!(!kept.contains(&3), "{summary}");
    let ds = sfron::data::Dataset::open(
        sfron::data::Format::Mnist,
        Path::new(mnist),
        sfron::data::Part::Train,
    )
    .unwrap();
    let mut read = 0;
    for line in std::fs::read_to_string(&trace).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let phase = v["phase"].as_str().unwrap();
        if phase == "remain" || phase == "fisher_remain" {
            for i in v["indices"].as_array().unwrap() {
                let label = ds.labels[i.as_u64().unwrap() as usize];
                assert!(kept.contains(&label), "{phase} read class {label}");
                read += 1;
            }
        }
    }
    assert!(
        read >= 3 * 16,
        "the trace holds the remain batches ({read} samples)"
    );

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("name", vec!["model.dit.name=DiT-XXL/2"], "model.dit.name"),
        (
            "release",
            vec!["diffusion.process=release"],
            "diffusion.process",
        ),
        ("patch", vec!["model.dit.patch=3"], "model.dit"),
        ("heads", vec!["model.dit.heads=3"], "model.dit"),
        (
            "null-class",
            vec!["diffusion.cond_drop=0"],
            "diffusion.cond_drop",
        ),
        (
            "recompute-cnn",
            vec!["model.arch=mnist_cnn", "device.recompute=true"],
            "device.recompute",
        ),
    ];
    for (name, extra, needle) in cases {
        let mut sets = base(name);
        sets.extend(extra.iter().map(|s| s.to_string()));
        support::assert_refused(&dir, name, &sets, &["train"], needle);
    }
}

/// `sfron convert` of DiT checkpoints as the reference writes them: the
/// public file's plain state_dict, and train.py's `{"model", "ema", "opt",
/// "args"}` (its model, and with --ema its EMA); the shape is read from the
/// file (here 8 × 8 latents, whatever the configured data), the heads from
/// `[model.dit]`; every tensor equal to the reference's. Heads that do not
/// divide the width are refused naming the file.
#[test]
fn convert_reads_dit_checkpoints_and_their_ema() {
    let spec = &specs()[0];
    let dir = temp_dir("dit-convert");
    let json = spec_json(spec);
    support::run_python(
        REFERENCE,
        &["make".as_ref(), dir.as_os_str(), json.as_ref()],
    );
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let sets = |name: &str, heads: i64| {
        vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            format!("data.root={mnist}"),
            "data.transform=diffusion".into(),
            "model.arch=dit".into(),
            "model.dit.name=DiT-S/2".into(),
            format!("model.dit.heads={heads}"),
            "log.level=warn".into(),
        ]
    };
    for (name, file, ema, expected) in [
        ("public", "dit.pt", false, "dit.safetensors"),
        ("train-model", "dit-train.pt", false, "dit.safetensors"),
        ("train-ema", "dit-train.pt", true, "dit.ema.safetensors"),
    ] {
        let out = dir.join(format!("{name}.safetensors"));
        let checkpoint = dir.join(file).display().to_string();
        let out_s = out.display().to_string();
        let mut args = vec!["convert", checkpoint.as_str(), "--out", out_s.as_str()];
        if ema {
            args.push("--ema");
        }
        let o = support::sfron(&sets(name, spec.heads), &args);
        assert!(o.status.success(), "{name}: {}", support::text(&o));
        assert!(
            support::same_bits(&out, &dir.join(expected)),
            "{name}: the converted tensors differ from {expected}"
        );
    }
    let o = support::sfron(
        &sets("bad-heads", 3),
        &[
            "convert",
            dir.join("dit.pt").to_str().unwrap(),
            "--out",
            dir.join("bad.safetensors").to_str().unwrap(),
        ],
    );
    let text = support::text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("dit.pt") && text.contains("heads"), "{text}");
    assert!(!dir.join("bad.safetensors").exists());
}

/// A diffusion study of a small DiT (ADM's process) with `study.judge_raw`:
/// every model with an EMA is judged on its EMA and on its raw weights,
/// the report has both rows and says which is which.
#[test]
fn a_dit_study_reports_ema_and_raw_rows() {
    let dir = temp_dir("dit-study");
    let common = |name: &str| support::digit_sets(&dir, name, 200);
    // The judge: a digit classifier trained for a few steps.
    let judge = support::train_digit_judge(&dir, 200, 10);
    let mut sets = common("study");
    sets.extend([
        "model.arch=dit".to_string(),
        "model.dit.name=DiT-S/4".into(),
        "model.dit.depth=1".into(),
        "model.dit.hidden=32".into(),
        "model.dit.heads=2".into(),
        "data.transform=diffusion".into(),
        "diffusion.ema_decay=0.9".into(),
        "diffusion.unlearn_ema_decay=0.9".into(),
        "train.batch=32".into(),
        "train.max_steps=4".into(),
        "unlearn.batch=16".into(),
        "unlearn.forget_batch=8".into(),
        "sfron.iterations=3".into(),
        "sfron.fisher_batch=16".into(),
        "sfron.fisher_remain_batches=1".into(),
        "sample.steps=3".into(),
        "sample.per_class=2".into(),
        "sample.grid=2".into(),
        "study.scenario=class:3".into(),
        "study.methods=[\"sfron\"]".into(),
        "study.judge_raw=true".into(),
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
        "| SFR-on (raw) |",
        "| Retrain (raw) |",
        "rows marked (raw) sample the same run's raw weights",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    for name in ["sfron", "sfron-raw"] {
        let e: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("seed-0/eval/{name}/eval.json"))).unwrap(),
        )
        .unwrap();
        let want = if name.ends_with("raw") { "raw" } else { "ema" };
        assert_eq!(e["weights"], want, "{name}");
    }
}

/// `loss` of two forward passes of `dit` (one with class dropout), as a
/// step that accumulates two batches does, under bf16 autocast when
/// `bf16`; its value and gradients, with (`recompute`) or without
/// activation checkpointing, and how many trunks were deferred.
fn loss_and_gradients(
    dit: &mut Dit,
    params: &[Tensor],
    recompute: bool,
    bf16: bool,
) -> (f64, Vec<Tensor>, usize) {
    use sfron::model::layout::Autocast;
    use sfron::model::recompute::Recompute;
    let queue = Recompute::default();
    dit.set_recompute(recompute.then(|| queue.clone()), bf16);
    queue.attach();
    let draw = |seed: i64, shape: &[i64]| {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    };
    let x = draw(11, &[4, 4, 8, 8]);
    let target = draw(12, &[4, 8, 8, 8]);
    let t = Tensor::from_slice(&[3.0f32, 250.0, 999.0, 0.0]);
    let y = Tensor::from_slice(&[0i64, 7, 3, 9]);
    let drop = Tensor::from_slice(&[true, false, false, true]);
    let loss = {
        let _autocast = bf16.then(|| Autocast::bf16(Device::Cpu).unwrap());
        let first = dit.forward(&x, &t, &y, Some(&drop)).to_kind(Kind::Float);
        let second = dit
            .forward(&(&x * 0.5), &(&t + 1.0), &y, None)
            .to_kind(Kind::Float);
        (first - target).square().sum(Kind::Float) + second.narrow(1, 0, 4).sin().sum(Kind::Float)
    };
    let deferred = queue.pending();
    let value = loss.double_value(&[]);
    (value, queue.backward(&loss, params), deferred)
}

/// Activation checkpointing moves where the backward pass finds the
/// activations, not the gradients: the recomputed blocks run the same
/// kernels on the same inputs, so every gradient is the kept graph's except
/// through the conditioning, which feeds `depth + 1` layers and whose
/// gradient sums their terms, possibly in another order: float32
/// reassociation of `depth + 1` terms, then carried through the timestep
/// MLP and the class table: per tensor, norm-wise, `4 (depth + 1) u`
/// (u = 2⁻²⁴, κ = 4 for cancellation among the terms). Under bf16
/// autocast one more rounding: within one autocast region the kept graph
/// casts each weight to bf16 once (autocast's cache), so the gradients of
/// the two forward passes meet and are summed in bf16, while each
/// recomputation is its own region and they are summed in float32: one
/// bf16 rounding of a two-term sum, `4 · 2⁻⁸` (κ = 4). A block left out of
/// the recomputation, a block recomputed with the wrong input or without
/// autocast, or a lost conditioning gradient is off by order 1.
#[test]
fn recomputed_blocks_give_the_gradients_of_the_kept_graph() {
    let spec = DitSpec {
        depth: 3,
        hidden: 32,
        heads: 2,
        ..specs()[0].clone()
    };
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut dit = Dit::new(&vs.root(), &spec);
    // adaLN-Zero and the final layer start at zero, where most gradients
    // vanish: move every trained weight off its initialisation.
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            v += v.randn_like() * 0.1;
        }
    });
    let params = vs.trainable_variables();
    for bf16 in [false, true] {
        let (kept_loss, kept, none) = loss_and_gradients(&mut dit, &params, false, bf16);
        let (loss, recomputed, deferred) = loss_and_gradients(&mut dit, &params, true, bf16);
        assert_eq!((none, deferred), (0, 2), "one trunk per forward pass");
        assert_eq!(
            loss, kept_loss,
            "bf16 {bf16}: the forward pass computes the same"
        );
        let bf16_rounding = if bf16 { 4.0 * 2f64.powi(-8) } else { 0.0 };
        let tol = 4.0 * (spec.depth + 1) as f64 * 2f64.powi(-24) + bf16_rounding;
        let mut reached = 0;
        for (i, (a, b)) in kept.iter().zip(&recomputed).enumerate() {
            assert_eq!(a.defined(), b.defined(), "parameter {i}");
            if !a.defined() {
                continue;
            }
            reached += 1;
            let d = norm(&(b - a));
            assert!(
                d <= tol * norm(a),
                "bf16 {bf16}, parameter {i} {:?}: |Δ| {d:e} against |g| {:e}",
                a.size(),
                norm(a)
            );
        }
        assert_eq!(reached, params.len(), "every parameter gets a gradient");
    }
}
