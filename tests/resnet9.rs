//! `resnet9` against the KLoM benchmark's ResNet-9 in PyTorch (tests/golden/
//! resnet9_reference.py, unlearning_bench/models.py's network) on the same
//! random weights: sfron's weights load into PyTorch with
//! `load_state_dict(strict=True)` and PyTorch's state_dict (its
//! `num_batches_tracked` included) back into sfron, the eval-mode logits and
//! the gradients of one training step's summed cross-entropy agree, and the
//! parameter counts are PyTorch's. A state_dict PyTorch saved
//! (`torch.save`, then `safetensors.torch.save_file`) loads unchanged
//! through `model.init`, and through `model.replace_head` onto other
//! classes with the bias-free head redrawn; `sfron train` runs on the digits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sfron::model::norm::NormSync;
use sfron::model::resnet9::{self, ResNet9};
use sfron::model::weights;
use sfron::model::zoo::Classifier;
use sfron::model::{Arch, Model};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

mod support;
use support::{error_model, temp_dir};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/resnet9_reference.py"
);

/// `(channels, classes, side)`: CIFAR's shape as the benchmark trains it,
/// and the digits' (1 channel, 28 × 28: 5 × 5 before the last pool).
const CASES: [(i64, i64, i64); 2] = [(3, 10, 32), (1, 7, 28)];

/// Weighted layers in sequence: the eight convs (the residual bodies'
/// four included) and the linear head.
const LAYERS: f64 = 9.0;

/// The widest fan-in: the 3×3 convs over 256 channels (the second
/// residual's and the last conv's).
const FAN_IN: f64 = 256.0 * 9.0;

/// Logits computed twice (here on the tests' threads, by PyTorch on one:
/// the kernels split their sums differently), relative to the largest:
/// error_model::forward over the layers above; the max-pools pick, the
/// final scale by 0.2 is one rounding. Gradients norm-wise per tensor: the
/// backward pass crosses the layers again, and the longest sum is a
/// weight's gradient (or a BatchNorm layer's statistics) over the batch
/// times the first layers' output pixels, with κ = 40 for a BatchNorm
/// bias's cancellation (as tests/vit.rs and tests/swin.rs). A misplaced
/// weight, a wrong padding or stride, an average pool for a max-pool or
/// another logit scale than 0.2 are off by order 1 (an average pool: 1.3
/// of the largest logit, 0.25 for 0.2: 0.25, tried).
fn tolerances(side: i64, batch: i64) -> (f64, f64) {
    let forward = error_model::forward(LAYERS, FAN_IN);
    let n = FAN_IN.max((batch * side * side) as f64);
    let gradient = 2.0 * LAYERS * error_model::sum_difference(n, 40.0);
    (forward, gradient)
}

/// Moves every BatchNorm tensor off its initialisation (scales in
/// [0.5, 1.5], shifts and running means N(0, 0.1²), running variances in
/// [0.5, 1.5]), so that eval mode's statistics and the affine terms show in
/// the logits; the convs and the head keep libtorch's initialisation.
fn randomise(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if t.dim() != 1 {
                continue;
            }
            if name.ends_with("running_var") || name.ends_with(".1.weight") {
                let _ = t.uniform_(0.5, 1.5);
            } else {
                t.copy_(&(t.randn_like() * 0.1));
            }
        }
    });
}

/// The reference's printed `{"parameters": n}`.
fn reference_parameters(text: &str) -> i64 {
    let line = text.lines().find(|l| l.starts_with('{')).unwrap();
    let counts: serde_json::Value = serde_json::from_str(line).unwrap();
    counts["parameters"].as_i64().unwrap()
}

/// A state_dict of the reference, initialised and moved off its
/// initialisation by PyTorch under `seed`, published as a user would
/// (`torch.save`, then `save_file`), at `dir/file`.
fn pytorch_export(dir: &Path, file: &str, channels: i64, classes: i64, seed: i64) -> PathBuf {
    let path = dir.join(file);
    let spec = serde_json::json!({ "channels": channels, "classes": classes, "seed": seed });
    let text = support::run_python(
        REFERENCE,
        &[
            "export".as_ref(),
            path.as_os_str(),
            spec.to_string().as_ref(),
        ],
    );
    assert_eq!(
        reference_parameters(&text),
        resnet9::parameter_count(channels, classes)
    );
    path
}

/// The tensors of a weights file by name, `num_batches_tracked` left out.
fn by_name(path: &Path) -> BTreeMap<String, Tensor> {
    weights::load(path)
        .unwrap()
        .0
        .into_iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .collect()
}

#[test]
fn resnet9_gives_the_references_logits_and_gradients_on_its_weights() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    let batch = 4;
    for (k, (channels, classes, side)) in CASES.into_iter().enumerate() {
        let dir = temp_dir(&format!("resnet9-golden-{k}"));
        tch::manual_seed(k as i64);
        let source = nn::VarStore::new(Device::Cpu);
        let _ = ResNet9::new(&source.root(), channels, classes, &NormSync::default());
        randomise(&source);
        let state: Vec<(String, Tensor)> = source.variables().into_iter().collect();
        weights::save(&dir.join("resnet9.safetensors"), &state, &BTreeMap::new()).unwrap();
        let json = serde_json::json!({
            "channels": channels, "classes": classes, "batch": batch, "side": side,
        })
        .to_string();
        let text = support::run_python(
            REFERENCE,
            &["golden".as_ref(), dir.as_os_str(), json.as_ref()],
        );
        let parameters: i64 = source
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let reference = reference_parameters(&text);
        assert_eq!(parameters, reference, "case {k}: parameter count");
        assert_eq!(
            resnet9::parameter_count(channels, classes),
            reference,
            "case {k}: resnet9::parameter_count"
        );

        // PyTorch's state_dict into a network of another initialisation.
        tch::manual_seed(100 + k as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet9::new(&vs.root(), channels, classes, &NormSync::default());
        let train = |x: &Tensor| net.forward_t(x, true);
        support::check_against_golden(
            &format!("case {k}"),
            &vs,
            (&net, &train),
            (
                &dir.join("resnet9.torch.safetensors"),
                &dir.join("resnet9.io.safetensors"),
            ),
            tolerances(side, batch),
        );
        let x = Tensor::zeros([2, channels, side, side], (Kind::Float, Device::Cpu));
        let features = tch::no_grad(|| net.features_t(&x, false));
        assert_eq!(features.size(), [2, 128]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The KLoM benchmark's CIFAR-10 network has PyTorch's count (the golden
/// test compares the count with PyTorch's for its cases), and the arch
/// parses and names itself `resnet9`, with BatchNorm and head `9`.
#[test]
fn the_cifar10_size_and_the_arch() {
    assert_eq!(resnet9::parameter_count(3, 10), 2_274_880);
    let arch = Arch::parse("resnet9", 1.0).unwrap();
    assert_eq!(arch, Arch::Resnet9);
    assert_eq!(arch.name(), "resnet9");
    assert!(Arch::NAMES.contains(&"resnet9"));
    assert!(arch.has_batch_norm());
    assert_eq!(arch.head(), Some("9"));
}

/// A PyTorch export loads unchanged through `Model::load` (its
/// `num_batches_tracked` ignored); other classes are refused pointing at
/// model.replace_head, and replacing the head keeps every other tensor and
/// draws the bias-free `9.weight` within nn.Linear's ±1/√128.
#[test]
fn pytorch_weights_load_and_the_bias_free_head_is_replaced_on_request() {
    let dir = temp_dir("resnet9-heads");
    let path = pytorch_export(&dir, "resnet9-10.safetensors", 3, 10, 3);
    let file = by_name(&path);

    let mut ten = Model::new(Arch::Resnet9, 3, 10, Device::Cpu);
    ten.load(&path).unwrap();
    let state: BTreeMap<String, Tensor> = ten.state().into_iter().collect();
    assert_eq!(
        state.keys().collect::<Vec<_>>(),
        file.keys().collect::<Vec<_>>()
    );
    for (name, t) in &state {
        assert!(t.equal(&file[name]), "{name} not loaded");
    }

    let mut seven = Model::new(Arch::Resnet9, 3, 7, Device::Cpu);
    let e = seven.load(&path).unwrap_err().to_string();
    assert!(
        e.contains("10 classes") && e.contains("model.replace_head"),
        "{e}"
    );
    seven.load_replacing_head(&path).unwrap();
    let bound = 1.0 / 128f64.sqrt();
    for (name, t) in seven.state() {
        if name == "9.weight" {
            assert_eq!(t.size(), [7, 128]);
            let max = t.abs().max().double_value(&[]);
            assert!(max <= bound && max > bound / 4.0, "{name}: {max}");
        } else {
            assert!(t.equal(&file[&name]), "{name} not loaded");
        }
    }
    assert!(!seven.state().iter().any(|(n, _)| n == "9.bias"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `sfron train` of `resnet9` on the digits (1 channel, 28 × 28): from a
/// fresh initialisation; from a PyTorch export through model.init; and
/// from a 7-class export, refused without model.replace_head and
/// fine-tuned on the 10 digits with it. With a learning rate of 1e-30
/// the one step moves no weight, so the saved weights show what was
/// loaded: the file's, bit for bit (the BatchNorm running statistics
/// excepted, which the train-mode pass updates), the head apart when it
/// was replaced.
#[test]
fn sfron_trains_resnet9_on_digits_from_scratch_and_from_pytorch_weights() {
    let dir = temp_dir("resnet9-cli");
    let ten = pytorch_export(&dir, "torch-10.safetensors", 1, 10, 1);
    let seven = pytorch_export(&dir, "torch-7.safetensors", 1, 7, 2);
    let sets = |name: &str, extra: &[String]| {
        let mut sets = support::digit_sets(&dir, name, 64);
        sets.extend([
            "model.arch=resnet9".into(),
            "data.test_limit=32".into(),
            "train.batch=16".into(),
            "train.eval_every=0".into(),
        ]);
        sets.extend_from_slice(extra);
        sets
    };
    let run = |name: &str, extra: &[String]| {
        let o = support::sfron(&sets(name, extra), &["train"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", support::text(&o));
        by_name(&dir.join("runs").join(name).join("model.safetensors"))
    };

    let scratch = run("scratch", &["train.max_steps=2".into()]);
    assert_eq!(
        scratch.keys().collect::<Vec<_>>(),
        by_name(&ten).keys().collect::<Vec<_>>(),
        "the saved names are the reference's"
    );

    let still = |init: &Path| {
        vec![
            format!("model.init={}", init.display()),
            "train.max_steps=1".into(),
            "train.lr=1e-30".into(),
            "train.momentum=0".into(),
            "train.weight_decay=0".into(),
        ]
    };
    let loaded = |saved: &BTreeMap<String, Tensor>, file: &BTreeMap<String, Tensor>, skip: &str| {
        for (name, t) in saved {
            if !name.contains("running_") && name != skip {
                assert!(t.equal(&file[name]), "{name} is not the file's");
            }
        }
    };
    let from_ten = run("init", &still(&ten));
    loaded(&from_ten, &by_name(&ten), "");

    support::assert_refused(
        &dir,
        "classes",
        &sets("classes", &still(&seven)),
        &["train"],
        "model.replace_head",
    );
    let mut replace = still(&seven);
    replace.push("model.replace_head=true".into());
    let tuned = run("fine-tune", &replace);
    assert_eq!(tuned["9.weight"].size(), [10, 128]);
    assert!(!tuned.contains_key("9.bias"));
    loaded(&tuned, &by_name(&seven), "9.weight");
    std::fs::remove_dir_all(&dir).unwrap();
}
