//! ViT against torchvision's `VisionTransformer` (tests/golden/
//! vit_reference.py) on the same random weights: torchvision's names load
//! unchanged, the eval-mode logits and the gradients of one training step's
//! summed cross-entropy agree, and the parameter counts are torchvision's.

use sfron::model::vit::{self, Vit, VitSpec};
use sfron::model::zoo::Classifier;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

mod support;
use support::{error_model, temp_dir};

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/vit_reference.py");

/// Small shapes of torchvision's ViT: 3 channels as torchvision builds it,
/// and 1 channel (conv_proj replaced) as sfron's digits are.
fn cases() -> Vec<(VitSpec, i64, i64)> {
    vec![
        (
            VitSpec {
                patch: 8,
                image_size: 32,
                depth: 2,
                heads: 4,
                hidden: 64,
                mlp_dim: 128,
            },
            3,
            10,
        ),
        (
            VitSpec {
                patch: 7,
                image_size: 28,
                depth: 3,
                heads: 2,
                hidden: 32,
                mlp_dim: 96,
            },
            1,
            7,
        ),
    ]
}

/// Weighted layers in sequence: the patch embedding, four per block (the
/// input and output projections, the MLP's two) and the head.
fn layers(s: &VitSpec) -> f64 {
    (1 + 4 * s.depth + 1) as f64
}

/// The longest dot product: the widest fan-in (the MLP's, the patch's, the
/// width) or the attention's sums over the sequence.
fn fan_in(s: &VitSpec, channels: i64) -> f64 {
    [
        s.mlp_dim,
        s.hidden,
        channels * s.patch * s.patch,
        s.seq_length(),
    ]
    .into_iter()
    .max()
    .unwrap() as f64
}

/// Logits computed twice (here and by torchvision, whose
/// `nn.MultiheadAttention` may take another kernel path), relative to the
/// largest: error_model::forward over the layers above. Gradients norm-wise
/// per tensor: the backward pass crosses the layers again and a weight's
/// gradient sums over every token of the batch, with κ = 40 for a bias's
/// cancellation (as tests/dit.rs). Misplaced weights, a missing class token,
/// the tanh GELU for the exact one or another LayerNorm epsilon are off by
/// far more.
fn tolerances(s: &VitSpec, channels: i64, batch: i64) -> (f64, f64) {
    let forward = error_model::forward(layers(s), fan_in(s, channels));
    let n = fan_in(s, channels).max((batch * s.seq_length()) as f64);
    let gradient = 2.0 * layers(s) * error_model::sum_difference(n, 40.0);
    (forward, gradient)
}

#[test]
fn vit_gives_torchvisions_logits_and_gradients_on_its_weights() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    let batch = 4;
    for (k, (spec, channels, classes)) in cases().into_iter().enumerate() {
        let dir = temp_dir(&format!("vit-golden-{k}"));
        let json = serde_json::json!({
            "patch": spec.patch, "image_size": spec.image_size, "depth": spec.depth,
            "heads": spec.heads, "hidden": spec.hidden, "mlp_dim": spec.mlp_dim,
            "channels": channels, "classes": classes, "batch": batch,
        })
        .to_string();
        let text = support::run_python(REFERENCE, &[dir.as_os_str(), json.as_ref()]);
        let line = text.lines().find(|l| l.starts_with('{')).unwrap();
        let counts: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            vit::parameter_count(&spec, channels, classes),
            counts["parameters"].as_i64().unwrap(),
            "case {k}: parameter count"
        );

        let vs = nn::VarStore::new(Device::Cpu);
        let net = Vit::new(&vs.root(), &spec, channels, classes);
        let train = |x: &Tensor| net.forward_t(x, true);
        support::check_against_golden(
            &format!("case {k}"),
            &vs,
            (&net, &train),
            (
                &dir.join("vit.safetensors"),
                &dir.join("vit.io.safetensors"),
            ),
            tolerances(&spec, channels, batch),
        );
        let x = Tensor::zeros(
            [2, channels, spec.image_size, spec.image_size],
            (Kind::Float, Device::Cpu),
        );
        let features = tch::no_grad(|| net.features_t(&x, false));
        assert_eq!(features.size(), [2, spec.hidden]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// torchvision's sizes: vit_b_16 has 86,567,656 parameters for 1000
/// classes (torchvision's documented count), and an image side that is not
/// a multiple of the patch is refused naming both.
#[test]
fn the_public_sizes_and_a_side_the_patch_does_not_divide() {
    let b16 = VitSpec::named("vit_b_16").unwrap();
    assert_eq!(vit::parameter_count(&b16, 3, 1000), 86_567_656);
    let l16 = VitSpec::named("vit_l_16").unwrap();
    assert_eq!(vit::parameter_count(&l16, 3, 1000), 304_326_632);
    let bad = VitSpec {
        image_size: 30,
        ..b16
    };
    let e = bad.check().unwrap_err();
    assert!(e.contains("30") && e.contains("16"), "{e}");
    assert!(VitSpec::named("vit_x_1").is_err());
}
