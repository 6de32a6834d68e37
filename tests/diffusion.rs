//! The denoising task against PyTorch: the class-conditional UNet of the
//! release (tests/golden/ddpm_reference.py) on the same random weights,
//! inputs, timesteps, classes and dropped conditions, both ways (PyTorch's
//! weights in sfron, sfron's in PyTorch, loaded strictly: every name the
//! release's), and the guided prediction.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sfron::diffusion::guided_eps;
use sfron::model::unet::{Cond, Dropout, UnetSpec};
use sfron::model::{Arch, Model, weights};
use tch::{Device, Kind, Tensor};

mod support;
use support::{python, temp_dir};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/ddpm_reference.py"
);

/// The shapes tested: a CIFAR-like three-level UNet with attention at
/// 8×8 and convolutional resampling, and an MNIST-like two-level one at
/// 28×28 with one block per level, attention at the top level and pooling
/// resamplers.
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
            },
            3,
            10,
        ),
        (
            UnetSpec {
                ch: 32,
                ch_mult: vec![1, 2],
                num_res_blocks: 1,
                attn_resolutions: vec![28],
                dropout: 0.0,
                resolution: 28,
                resamp_with_conv: false,
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
        "resamp_with_conv": spec.resamp_with_conv, "channels": channels, "classes": classes,
    })
    .to_string()
}

fn run_reference(mode: &str, dir: &Path, spec: &str) -> String {
    let out = Command::new(python())
        .args([REFERENCE, mode])
        .arg(dir)
        .arg(spec)
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "ddpm_reference.py {mode} failed:\n{text}"
    );
    text
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
        let guided = tch::no_grad(|| guided_eps(&model, &io["x"], &io["t"], &io["c"], 2.0));
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
