//! Swin against torchvision's `SwinTransformer` (tests/golden/
//! swin_reference.py) on the same random weights: torchvision's names load
//! unchanged (the relative position index buffer included), the eval-mode
//! logits and the gradients of one training step's summed cross-entropy
//! agree, the train step with stochastic depth dropping the same branches
//! sfron's keys drew; and the parameter counts are torchvision's.

use std::collections::BTreeMap;
use std::path::Path;

use sfron::model::swin::{self, RowKeys, Swin, SwinSpec};
use sfron::model::weights;
use sfron::model::zoo::Classifier;
use sfron::model::{Arch, Model};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

mod support;
use support::{error_model, temp_dir};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/swin_reference.py"
);

/// Small shapes of torchvision's Swin: shifted and unshifted windows, a
/// stage whose grid is one window (no shift, as torchvision), two and
/// three stages, window 7 as the public sizes have, and 1 channel
/// (features.0.0 replaced) as sfron's digits are.
fn cases() -> Vec<(SwinSpec, i64, i64)> {
    let spec = |patch, embed_dim, depths: &[i64], heads: &[i64], window, sd, image_size| SwinSpec {
        patch,
        embed_dim,
        depths: depths.to_vec(),
        heads: heads.to_vec(),
        window,
        mlp_ratio: 4.0,
        stochastic_depth_prob: sd,
        image_size,
    };
    vec![
        (spec(2, 16, &[2, 2], &[2, 4], 4, 0.3, 16), 3, 10),
        (spec(2, 8, &[2, 2, 2], &[1, 2, 4], 2, 0.2, 16), 1, 7),
        (spec(4, 16, &[2, 2], &[2, 4], 7, 0.5, 56), 3, 5),
    ]
}

/// Weighted layers in sequence: the patch embedding, four per block (qkv,
/// proj, the MLP's two), one per merging, and the head.
fn layers(s: &SwinSpec) -> f64 {
    (1 + 4 * s.blocks() + s.depths.len() as i64 - 1 + 1) as f64
}

/// The longest dot product: the widest fan-in (the last stage's MLP, a
/// merging's 4C, the patch) or the attention's sums over a window.
fn fan_in(s: &SwinSpec, channels: i64) -> f64 {
    [
        4 * s.features(),
        channels * s.patch * s.patch,
        s.window * s.window,
    ]
    .into_iter()
    .max()
    .unwrap() as f64
}

/// Logits computed twice (here and by torchvision, whose pooling is an
/// adaptive average pool where sfron takes a mean), relative to the
/// largest: error_model::forward over the layers above. Gradients
/// norm-wise per tensor: the backward pass crosses the layers again and a
/// weight's gradient sums over every token of the batch, with κ = 40 for a
/// bias's cancellation (as tests/vit.rs). A transposed window partition,
/// a missing mask, another merging order or the tanh GELU are off by far
/// more.
fn tolerances(s: &SwinSpec, channels: i64, batch: i64) -> (f64, f64) {
    let forward = error_model::forward(layers(s), fan_in(s, channels));
    let tokens = batch * (s.image_size / s.patch).pow(2);
    let n = fan_in(s, channels).max(tokens as f64);
    let gradient = 2.0 * layers(s) * error_model::sum_difference(n, 40.0);
    (forward, gradient)
}

#[test]
fn swin_gives_torchvisions_logits_and_gradients_on_its_weights() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    let batch = 4;
    for (k, (spec, channels, classes)) in cases().into_iter().enumerate() {
        let dir = temp_dir(&format!("swin-golden-{k}"));
        // The train step's drops: sfron's, from the rows' keys.
        let keys: Vec<u64> = (0..batch as u64).map(|i| 1000 * k as u64 + i).collect();
        let scales = swin::drop_scales(&spec, &keys);
        assert!(
            scales.eq(0.0).any().int64_value(&[]) == 1,
            "case {k}: the keys drop no branch; the test would not see the drops"
        );
        weights::save(
            &dir.join("swin.scales.safetensors"),
            &[("scales".to_string(), scales)],
            &BTreeMap::new(),
        )
        .unwrap();
        let json = serde_json::json!({
            "patch": spec.patch, "embed_dim": spec.embed_dim, "depths": spec.depths,
            "heads": spec.heads, "window": spec.window,
            "stochastic_depth_prob": spec.stochastic_depth_prob, "image_size": spec.image_size,
            "channels": channels, "classes": classes, "batch": batch,
        })
        .to_string();
        let text = support::run_python(REFERENCE, &[dir.as_os_str(), json.as_ref()]);
        let line = text.lines().find(|l| l.starts_with('{')).unwrap();
        let counts: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            swin::parameter_count(&spec, channels, classes),
            counts["parameters"].as_i64().unwrap(),
            "case {k}: parameter count"
        );

        let vs = nn::VarStore::new(Device::Cpu);
        let row_keys = RowKeys::default();
        let net = Swin::new(&vs.root(), &spec, channels, classes, &row_keys);
        // The train step drops what the keys drew.
        let train = |x: &Tensor| {
            row_keys.set(Some(keys.clone()));
            let logits = net.forward_t(x, true);
            row_keys.set(None);
            logits
        };
        support::check_against_golden(
            &format!("case {k}"),
            &vs,
            (&net, &train),
            (
                &dir.join("swin.safetensors"),
                &dir.join("swin.io.safetensors"),
            ),
            tolerances(&spec, channels, batch),
        );
        let x = Tensor::zeros(
            [2, channels, spec.image_size, spec.image_size],
            (Kind::Float, Device::Cpu),
        );
        let features = tch::no_grad(|| net.features_t(&x, false));
        assert_eq!(features.size(), [2, spec.features()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// torchvision's sizes: swin_t, swin_s and swin_b have torchvision's
/// documented parameter counts, and an image side the patches, mergings
/// and windows do not tile is refused naming the side and the tile.
#[test]
fn the_public_sizes_and_a_side_that_does_not_tile() {
    let t = SwinSpec::named("swin_t").unwrap();
    assert_eq!(swin::parameter_count(&t, 3, 1000), 28_288_354);
    let b = SwinSpec::named("swin_b").unwrap();
    assert_eq!(swin::parameter_count(&b, 3, 1000), 87_768_224);
    assert_eq!(t.tile(), 224);
    let bad = SwinSpec {
        image_size: 64,
        ..t.clone()
    };
    let e = bad.check().unwrap_err();
    assert!(e.contains("64") && e.contains("224"), "{e}");
    assert!(SwinSpec::named("swin_x").is_err());
    assert_eq!(t.name(), "swin_t");
}

/// A classifier's head: another variant's weights are refused naming the
/// tensors, another number of classes is refused pointing at
/// model.replace_head, and loading without the head keeps every other
/// tensor and gives the head PyTorch's nn.Linear initialisation bounds.
#[test]
fn heads_are_replaced_only_when_asked_and_variants_do_not_mix() {
    let dir = temp_dir("swin-heads");
    let small = |depths: &[i64]| SwinSpec {
        patch: 2,
        embed_dim: 8,
        depths: depths.to_vec(),
        heads: vec![1, 2],
        window: 2,
        mlp_ratio: 4.0,
        stochastic_depth_prob: 0.1,
        image_size: 8,
    };
    tch::manual_seed(1);
    let source = Model::new(Arch::Swin(small(&[2, 2])), 3, 10, Device::Cpu);
    let path = dir.join("swin10.safetensors");
    // As a torchvision export: no sfron metadata.
    weights::save(&path, &source.state(), &BTreeMap::new()).unwrap();

    let mut other = Model::new(Arch::Swin(small(&[2, 4])), 3, 10, Device::Cpu);
    let e = other.load(&path).unwrap_err().to_string();
    assert!(
        e.contains("missing features.3.2") && e.contains("swin10"),
        "{e}"
    );

    let mut seven = Model::new(Arch::Swin(small(&[2, 2])), 3, 7, Device::Cpu);
    let e = seven.load(&path).unwrap_err().to_string();
    assert!(
        e.contains("10 classes") && e.contains("model.replace_head"),
        "{e}"
    );
    seven.load_replacing_head(&path).unwrap();
    let src: BTreeMap<String, Tensor> = source.state().into_iter().collect();
    for (name, t) in seven.state() {
        if name.starts_with("head.") {
            assert_eq!(t.size()[0], 7);
            let bound = 1.0 / (small(&[2, 2]).features() as f64).sqrt();
            assert!(t.abs().max().double_value(&[]) <= bound, "{name}");
            assert!(
                t.abs().max().double_value(&[]) > bound / 4.0,
                "{name} not re-drawn"
            );
        } else {
            assert!(t.equal(&src[&name]), "{name} not loaded");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small Swin's `--set`s: patch 2, width 16, two stages of two blocks
/// (window 7 on 28 × 28; the study sets window 4 for 32 × 32).
const SMALL_SWIN: [&str; 5] = [
    "model.arch=swin_t",
    "model.swin.patch=2",
    "model.swin.embed_dim=16",
    "model.swin.depths=[2, 2]",
    "model.swin.heads=[2, 4]",
];

/// `sfron train` of a small Swin on the digits from weights: each bad
/// input exits 2 naming the key or file, with no run folder: an image side
/// the Swin cannot tile (swin_t's 224 against the digits' 28), another
/// variant's weights, another number of classes without
/// model.replace_head, model.replace_head without weights. With it, the
/// 7-class weights fine-tune on the 10 digits.
#[test]
fn bad_swin_inputs_are_refused_and_a_head_is_replaced_on_request() {
    let dir = temp_dir("swin-cli");
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let small = |depths: &[i64], classes: i64, file: &str| {
        let spec = SwinSpec {
            patch: 2,
            embed_dim: 16,
            depths: depths.to_vec(),
            heads: vec![2, 4],
            window: 7,
            mlp_ratio: 4.0,
            stochastic_depth_prob: 0.2,
            image_size: 28,
        };
        let model = Model::new(Arch::Swin(spec), 1, classes, Device::Cpu);
        let path = dir.join(file);
        weights::save(&path, &model.state(), &BTreeMap::new()).unwrap();
        path.display().to_string()
    };
    let other = small(&[2, 4], 10, "swin-other-variant.safetensors");
    let seven = small(&[2, 2], 7, "swin-seven.safetensors");
    let base = |name: &str| {
        let mut sets = vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            format!("data.root={mnist}"),
            "data.train_limit=64".into(),
            "data.workers=0".into(),
            format!("device.threads={}", support::threads()),
            "log.level=warn".into(),
            "train.batch=16".into(),
            "train.max_steps=2".into(),
            "train.eval_every=0".into(),
        ];
        sets.extend(SMALL_SWIN.map(String::from));
        sets
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("side", vec!["model.swin.patch=0".into()], "model.swin"),
        (
            "variant",
            vec![format!("model.init={other}")],
            "swin-other-variant",
        ),
        (
            "classes",
            vec![format!("model.init={seven}")],
            "model.replace_head",
        ),
        (
            "no-init",
            vec!["model.replace_head=true".into()],
            "model.replace_head",
        ),
    ];
    for (name, extra, needle) in cases {
        let mut sets = base(name);
        sets.extend(extra);
        support::assert_refused(&dir, name, &sets, &["train"], needle);
    }
    let mut sets = base("fine-tune");
    sets.extend([
        format!("model.init={seven}"),
        "model.replace_head=true".into(),
    ]);
    let o = support::sfron(&sets, &["train"]);
    assert_eq!(o.status.code(), Some(0), "{}", support::text(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CPU-sized Swin (patch 2, width 16, two stages of two blocks, window 4,
/// stochastic depth 0.2) on 32 × 32 RGB images (an ImageFolder of the
/// shipped digits, padded and coloured, with the CIFAR transform) runs
/// through `sfron study`: original, Retrain, SFR-on and its R ablation, GA,
/// evaluations and the report with a row for each.
#[test]
fn a_tiny_swin_study_on_32_pixel_images_reports_every_method() {
    let dir = temp_dir("swin-study");
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let digits = sfron::data::dataset::Dataset::open(
        sfron::data::Format::Mnist,
        Path::new(mnist),
        sfron::data::dataset::Part::Train,
    )
    .unwrap();
    let images = dir.join("digits32");
    for i in 0..500 {
        let img = digits.load(i).unwrap();
        let label = digits.labels[i];
        let part = if i < 400 { "train" } else { "val" };
        let folder = images.join(part).join(format!("{label}"));
        std::fs::create_dir_all(&folder).unwrap();
        let rgb = image::RgbImage::from_fn(32, 32, |x, y| {
            let v = if (2..30).contains(&x) && (2..30).contains(&y) {
                img.data[((y - 2) * 28 + x - 2) as usize]
            } else {
                0
            };
            image::Rgb([v, v / 2 + (label as u8) * 10, 255 - v])
        });
        rgb.save(folder.join(format!("{i}.png"))).unwrap();
    }
    let mut sets: Vec<String> = vec![
        format!("run.root={}", dir.join("runs").display()),
        "run.name=study".into(),
        "data.format=imagefolder".into(),
        format!("data.root={}", images.display()),
        "data.transform=cifar10".into(),
        "data.workers=0".into(),
        format!("device.threads={}", support::threads()),
        "log.level=warn".into(),
        "model.swin.window=4".into(),
        "train.batch=32".into(),
        "train.optimizer=adamw".into(),
        "train.lr=0.002".into(),
        "train.max_steps=20".into(),
        "train.eval_every=0".into(),
        "study.scenario=random:0.1".into(),
        r#"study.methods=["sfron", "sfron_r", "ga"]"#.into(),
        "unlearn.optimizer=adamw".into(),
        "sfron.iterations=6".into(),
        "sfron.lr=1e-4".into(),
        "sfron.alpha=5".into(),
        "sfron.fisher_remain_batches=2".into(),
        "ga.epochs=1".into(),
        "ga.lr=1e-5".into(),
    ];
    sets.extend(SMALL_SWIN.map(String::from));
    let o = support::sfron(&sets, &["study"]);
    let text = support::text(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    let md = std::fs::read_to_string(dir.join("runs/study/report.md")).unwrap();
    for row in [
        "| Original |",
        "| Retrain |",
        "| SFR-on |",
        "| SFR-on: R |",
        "| GA |",
    ] {
        assert!(md.contains(row), "{row:?} not in report.md:\n{md}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
