//! Models against real PyTorch (the venv's torch + torchvision, via
//! `SFRON_TORCH_PYTHON`, which launch/setup records): PyTorch weights load in
//! sfron and give the same eval logits, and sfron's weights load in PyTorch and
//! give sfron's logits. Also the refusals: truncated file, flipped byte,
//! another architecture, missing and unexpected names.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sfron::model::{Arch, Model, weights};
use tch::{Device, Kind, Tensor};

mod support;
use support::{python, temp_dir};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/models.py");
const ARCHS: [&str; 5] = [
    "resnet18_cifar",
    "resnet18",
    "resnet50",
    "mnist_cnn",
    "mnist_cnn_bn",
];

/// Eval-mode logits of one architecture computed twice (PyTorch and sfron
/// share libtorch, but not necessarily the thread count, hence the kernels'
/// float32 sum orders), relative to the largest logit: error_model::forward
/// with the architecture's depth in weighted layers and its largest fan-in
/// (3×3×512 for the ResNets, 9216 for the MNIST nets' fc1). Measured: 0 to
/// 1e-6 relative; weights in the wrong place are off by order 1.
fn forward_tolerance(name: &str) -> f64 {
    let (layers, fan_in) = match name {
        "resnet18_cifar" | "resnet18" => (18.0, 4608.0),
        "resnet50" => (50.0, 4608.0),
        "mnist_cnn" | "mnist_cnn_bn" => (4.0, 9216.0),
        other => panic!("no error model for {other}"),
    };
    support::error_model::forward(layers, fan_in)
}

fn run_script(mode: &str, dir: &Path) -> String {
    support::run_python(SCRIPT, &[mode.as_ref(), dir.as_os_str()])
}

fn model(name: &str) -> Model {
    let arch = Arch::parse(name, 1.0).unwrap();
    let channels = if name.starts_with("mnist") { 1 } else { 3 };
    Model::new(arch, channels, 10, Device::Cpu)
}

fn io(dir: &Path, file: &str) -> (Tensor, Tensor) {
    let (mut tensors, _) = weights::load(&dir.join(file)).unwrap();
    let y = tensors.pop().unwrap();
    let x = tensors.pop().unwrap();
    assert_eq!((x.0.as_str(), y.0.as_str()), ("x", "y"));
    (x.1, y.1)
}

#[test]
fn weights_move_between_pytorch_and_sfron_with_the_same_logits() {
    let dir = temp_dir("roundtrip");
    run_script("make", &dir);
    for name in ARCHS {
        // PyTorch → sfron.
        let mut m = model(name);
        m.load(&dir.join(format!("{name}.safetensors"))).unwrap();
        let (x, y) = io(&dir, &format!("{name}.io.safetensors"));
        let ours = tch::no_grad(|| m.forward_t(&x, false));
        let diff = (&ours - &y).abs().max().double_value(&[]);
        let allowed = forward_tolerance(name) * y.abs().max().double_value(&[]);
        assert!(
            diff <= allowed,
            "{name}: PyTorch weights in sfron, max |logit difference| {diff:e} (allowed {allowed:e})"
        );

        // sfron → PyTorch: a different, sfron-made state (random BN statistics too).
        tch::manual_seed(7);
        let fresh = model(name);
        tch::no_grad(|| {
            for (n, mut t) in fresh.state() {
                if n.ends_with("running_var") {
                    t.copy_(&(Tensor::rand_like(&t) + 0.5));
                } else if n.ends_with("running_mean") {
                    t.copy_(&(Tensor::randn_like(&t) * 0.1));
                }
            }
        });
        fresh
            .save(
                &dir.join(format!("{name}.sfron.safetensors")),
                BTreeMap::new(),
            )
            .unwrap();
        let y = tch::no_grad(|| fresh.forward_t(&x, false));
        weights::save(
            &dir.join(format!("{name}.sfron_io.safetensors")),
            &[("x".into(), x), ("y".into(), y)],
            &BTreeMap::new(),
        )
        .unwrap();
    }
    let report = run_script("check", &dir);
    println!("{report}");
    for line in report.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = v["arch"].as_str().unwrap();
        let (diff, scale) = (v["diff"].as_f64().unwrap(), v["scale"].as_f64().unwrap());
        assert!(
            diff <= forward_tolerance(name) * scale,
            "{name}: sfron weights in PyTorch, max |logit difference| {diff:e} of logits up to {scale}"
        );
    }
    assert_eq!(
        report.lines().filter(|l| l.starts_with('{')).count(),
        ARCHS.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_or_foreign_weights_are_refused_by_name() {
    let dir = temp_dir("refuse");
    tch::manual_seed(1);
    let m = model("mnist_cnn");
    let path = dir.join("w.safetensors");
    m.save(&path, BTreeMap::new()).unwrap();

    // Round trip is exact.
    let mut back = model("mnist_cnn");
    back.load(&path).unwrap();
    for ((n, a), (_, b)) in m.state().iter().zip(back.state()) {
        assert!(a.equal(&b), "{n} changed in a round trip");
    }

    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let err = back.load(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("truncated.safetensors") && err.contains("not a complete safetensors"),
        "{err}"
    );

    let flipped = dir.join("flipped.safetensors");
    let mut f = bytes.clone();
    let at = f.len() - 12345;
    f[at] ^= 0x10;
    std::fs::write(&flipped, f).unwrap();
    let err = back.load(&flipped).unwrap_err().to_string();
    assert!(
        err.contains("flipped.safetensors") && err.contains("checksum mismatch"),
        "{err}"
    );

    let err = model("mnist_cnn_bn").load(&path).unwrap_err().to_string();
    assert!(
        err.contains("mnist_cnn model") && err.contains("mnist_cnn_bn"),
        "{err}"
    );

    // A foreign file without sfron metadata: every problem listed at once.
    let foreign = dir.join("foreign.safetensors");
    let mut state: Vec<(String, Tensor)> = m
        .state()
        .into_iter()
        .filter(|(n, _)| n != "fc2.bias")
        .collect();
    state.push((
        "fc3.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    state.retain(|(n, _)| n != "conv1.weight");
    state.push((
        "conv1.weight".into(),
        Tensor::zeros([32, 1, 5, 5], (Kind::Float, Device::Cpu)),
    ));
    let plain: Vec<(&str, Tensor)> = state
        .iter()
        .map(|(n, t)| (n.as_str(), t.shallow_clone()))
        .collect();
    Tensor::write_safetensors(&plain, &foreign).unwrap();
    let before = back.state()[0].1.copy();
    let err = back.load(&foreign).unwrap_err().to_string();
    assert!(
        err.contains("missing fc2.bias") && err.contains("unexpected fc3.weight"),
        "{err}"
    );
    assert!(
        err.contains("conv1.weight: file [32, 1, 5, 5], model [32, 1, 3, 3]"),
        "{err}"
    );
    assert!(
        back.state()[0].1.equal(&before),
        "a refused load changed the weights"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sfron convert`: a released checkpoint (the SFR-on authors' CIFAR
/// ResNet-18 names, as `torch.save(state_dict)` and as a `.pth.tar` dict
/// with a `module.` prefix) becomes sfron weights that give PyTorch's eval
/// logits (error_model::forward); a file that is no checkpoint, or the
/// checkpoint of another network, exits 2 naming the problem and writes
/// nothing.
#[test]
fn released_checkpoints_convert_to_the_same_logits() {
    let dir = temp_dir("released");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/released.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (x, y) = io(&dir, "released.io.safetensors");
    let convert = |input: &str, output: &str| {
        support::sfron(
            &["model.arch=resnet18_cifar".into()],
            &[
                "convert",
                dir.join(input).to_str().unwrap(),
                "--out",
                dir.join(output).to_str().unwrap(),
            ],
        )
    };
    for (input, output) in [
        ("released.pth", "a.safetensors"),
        ("released.pth.tar", "b.safetensors"),
    ] {
        let o = convert(input, output);
        assert_eq!(o.status.code(), Some(0), "{}", support::text(&o));
        let mut m = model("resnet18_cifar");
        m.load(&dir.join(output)).unwrap();
        let ours = tch::no_grad(|| m.forward_t(&x, false));
        let diff = (&ours - &y).abs().max().double_value(&[]);
        let allowed = forward_tolerance("resnet18_cifar") * y.abs().max().double_value(&[]);
        assert!(
            diff <= allowed,
            "{input}: max |logit difference| {diff:e} (allowed {allowed:e})"
        );
    }

    std::fs::write(dir.join("noise.pth"), b"not a checkpoint at all").unwrap();
    let o = convert("noise.pth", "c.safetensors");
    assert_eq!(o.status.code(), Some(2), "{}", support::text(&o));
    assert!(
        support::text(&o).contains("not a PyTorch checkpoint"),
        "{}",
        support::text(&o)
    );
    // The digits' net is no CIFAR ResNet-18.
    let mnist = dir.join("mnist.pth");
    let o = Command::new(python())
        .args([
            "-c",
            "import sys, torch; torch.save({'conv1.weight': torch.zeros(32, 1, 3, 3), \
             'fc2.weight': torch.zeros(10, 128)}, sys.argv[1])",
            mnist.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = convert("mnist.pth", "d.safetensors");
    assert_eq!(o.status.code(), Some(2), "{}", support::text(&o));
    assert!(
        support::text(&o).contains("no fc.weight"),
        "{}",
        support::text(&o)
    );
    assert!(!dir.join("c.safetensors").exists() && !dir.join("d.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
