//! The FID Inception against pytorch-fid (tests/golden/inception_reference.py):
//! the same random weights, under torchvision's names, loaded from the
//! safetensors file PyTorch wrote; the pool3 features of uint8 RGB images
//! and of one-channel images given as floats in [0, 1]; and the errors of
//! a missing file and of a file lacking a tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sfron::model::inception::FidInception;
use sfron::model::weights;
use tch::{Device, Kind, Tensor};

mod support;
use support::temp_dir;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/inception_reference.py"
);

/// The folder of the reference's files, made once per test binary.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("inception-golden");
        let text = support::run_python(REFERENCE, &[dir.as_os_str()]);
        print!("{text}");
        dir
    })
}

fn weights_file() -> PathBuf {
    reference().join("fid_inception.safetensors")
}

/// Features computed twice, norm-wise and relative: error_model::forward
/// with every convolution of the file counted as if in sequence (94, an
/// upper bound on the depth: the longest path has 47) and the largest
/// fan-in (448 × 3 × 3 = 4032, `Mixed_7*.branch3x3dbl_2`): 2.9e-3. The
/// resize, the pools and eval-mode BatchNorm are short sums or affine. The
/// reference's weights keep the activations of order 1 (BatchNorm statistics
/// calibrated), so a layer's gain is of order 1 as the model assumes. What
/// it must catch: torchvision's pools instead of the FID ones (checked
/// below to move the features by more than ten times the tolerance),
/// a wrong kernel, padding, branch order or weight.
fn tolerance() -> f64 {
    let (tensors, _) = weights::load(&weights_file()).unwrap();
    let (mut layers, mut fan_in) = (0.0, 0.0f64);
    for (name, t) in &tensors {
        if name.ends_with(".conv.weight") {
            layers += 1.0;
            fan_in = fan_in.max((t.numel() as i64 / t.size()[0]) as f64);
        }
    }
    assert_eq!(layers, 94.0, "the FID Inception has 94 convolutions");
    support::error_model::forward(layers, fan_in)
}

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

#[test]
fn the_fid_inception_gives_pytorch_fids_features_on_the_same_weights() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    let dir = reference();
    let io: BTreeMap<String, Tensor> = weights::load(&dir.join("fid_inception.io.safetensors"))
        .unwrap()
        .0
        .into_iter()
        .collect();
    let allowed = tolerance();
    let start = std::time::Instant::now();
    let net = FidInception::load(&weights_file(), Device::Cpu).unwrap();

    // uint8 RGB, in batches of 2 (3 images: a full batch and a short one).
    let net = net.with_batch(2);
    let rgb = net.features(&io["rgb"]);
    assert_eq!(rgb.size(), [3, 2048]);
    assert_eq!(rgb.kind(), Kind::Float);
    let rgb_diff = relative(&rgb, &io["y_rgb"]);
    // One channel, as floats in [0, 1] (repeated to three inside).
    let gray = net.features(&(io["gray"].to_kind(Kind::Float) / 255.0));
    assert_eq!(gray.size(), [2, 2048]);
    let gray_diff = relative(&gray, &io["y_gray"]);
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "FID Inception ({threads} threads): relative differences rgb {rgb_diff:e}, \
         gray {gray_diff:e} (allowed {allowed:e}); 5 images in {seconds:.1} s"
    );
    assert!(
        rgb_diff <= allowed,
        "uint8 RGB images: ‖ours − pytorch-fid‖/‖pytorch-fid‖ = {rgb_diff:e} (allowed {allowed:e})"
    );
    assert!(
        gray_diff <= allowed,
        "one-channel images: ‖ours − pytorch-fid‖/‖pytorch-fid‖ = {gray_diff:e} (allowed {allowed:e})"
    );

    // The FID network's two departures from torchvision's Inception3 each
    // move the features far beyond the tolerance: the test tells them apart.
    let first = rgb.narrow(0, 0, 1);
    for (name, what) in [
        ("pad_rgb", "count_include_pad=True"),
        ("avg_rgb", "an average pool in Mixed_7c"),
    ] {
        let moved = relative(&io[name], &first);
        assert!(
            moved > 10.0 * allowed,
            "{what} moves the features by only {moved:e}"
        );
    }
}

#[test]
fn a_missing_weights_file_is_named_with_the_export_line() {
    let path = temp_dir("inception-missing").join("pt_inception.safetensors");
    let err = FidInception::load(&path, Device::Cpu).unwrap_err();
    let text = format!("{err:#}");
    for needle in [
        path.to_str().unwrap(),
        "no such file",
        "pt_inception-2015-12-05-6726825d.pth",
        "safetensors.torch",
        "s.save_file(",
    ] {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
}

#[test]
fn a_weights_file_without_a_tensor_or_with_another_classifier_is_refused_naming_it() {
    let (tensors, _) = weights::load(&weights_file()).unwrap();
    let dir = temp_dir("inception-bad");
    let lacking = dir.join("lacking.safetensors");
    let kept: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "Mixed_7c.branch_pool.conv.weight")
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    weights::save(&lacking, &kept, &BTreeMap::new()).unwrap();
    let text = format!(
        "{:#}",
        FidInception::load(&lacking, Device::Cpu).unwrap_err()
    );
    assert!(
        text.contains("missing Mixed_7c.branch_pool.conv.weight") && text.contains("lacking"),
        "{text}"
    );

    // torchvision's ImageNet weights: a 1000-class fc (and AuxLogits).
    let imagenet = dir.join("imagenet.safetensors");
    let swapped: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| match n.as_str() {
            "fc.weight" => (
                n.clone(),
                Tensor::zeros([1000, 2048], (Kind::Float, Device::Cpu)),
            ),
            "fc.bias" => (n.clone(), Tensor::zeros([1000], (Kind::Float, Device::Cpu))),
            _ => (n.clone(), t.shallow_clone()),
        })
        .collect();
    weights::save(&imagenet, &swapped, &BTreeMap::new()).unwrap();
    let text = format!(
        "{:#}",
        FidInception::load(&imagenet, Device::Cpu).unwrap_err()
    );
    assert!(
        text.contains("fc.weight is [1000, 2048]") && text.contains("imagenet"),
        "{text}"
    );
}
