//! The SD VAE against diffusers: `AutoencoderKL` built by diffusers at two
//! small shapes (tests/golden/vae_reference.py), its state_dict loaded
//! strictly into [`Vae`], then the posterior's moments, a posterior draw
//! from the same noise, its mode and the decoded images compared; the
//! deprecated attention names load too; bad files are refused naming them.

use std::collections::BTreeMap;
use std::path::Path;

use sfron::model::vae::{EXPORT_HINT, SdVae, Vae, VaeSpec};
use sfron::model::weights;
use tch::{Device, Kind, Tensor};

mod support;
use support::{error_model, temp_dir};

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/vae_reference.py");

/// The shapes tested, with their image sizes: the SD layout (two blocks per
/// level, widths doubling then repeated) at widths 16/32/32 in 4 groups on
/// a 16 × 24 image (not square); and two levels of one block, 8 groups,
/// one input channel, 3 latent channels, on 12 × 12.
fn cases() -> Vec<(VaeSpec, [i64; 2])> {
    vec![
        (
            VaeSpec {
                block_out: vec![16, 32, 32],
                groups: 4,
                ..VaeSpec::sd()
            },
            [16, 24],
        ),
        (
            VaeSpec {
                in_channels: 1,
                out_channels: 1,
                block_out: vec![16, 32],
                layers_per_block: 1,
                latent_channels: 3,
                groups: 8,
                scaling_factor: 0.5,
            },
            [12, 12],
        ),
    ]
}

fn spec_json(s: &VaeSpec, image: [i64; 2]) -> String {
    serde_json::json!({
        "in_channels": s.in_channels, "out_channels": s.out_channels,
        "block_out": s.block_out, "layers_per_block": s.layers_per_block,
        "latent_channels": s.latent_channels, "groups": s.groups,
        "scaling_factor": s.scaling_factor, "image": image,
    })
    .to_string()
}

fn file(path: &Path) -> BTreeMap<String, Tensor> {
    weights::load(path).unwrap().0.into_iter().collect()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// One pass (encoder or decoder) computed twice, relative to its largest
/// output: error_model::forward over its weighted layers in sequence (each
/// ResNet block's two convolutions and shortcut, the resamplers, the mid
/// block's two blocks and attention's four Linears, conv_in, conv_out and
/// the 1×1 quant convolution) with the longest dot product (a 3×3
/// convolution's `9 C` at the widest level, or the attention's sum over the
/// `h w` positions of the coarsest level). GroupNorm and SiLU have order-1
/// gain (PyTorch's default initialisation keeps activations of order 1).
/// A misplaced weight, a wrong padding side or a missing shortcut is off
/// by order 1.
fn pass_tolerance(s: &VaeSpec, image: [i64; 2], decoder: bool) -> f64 {
    let levels = s.block_out.len() as i64;
    let per_level = if decoder {
        s.layers_per_block + 1
    } else {
        s.layers_per_block
    };
    let layers = (2 + 1) * per_level * levels + (levels - 1) + (2 * 3 + 4) + 3;
    let widest = *s.block_out.iter().max().unwrap();
    let f = s.downsampling();
    let positions = (image[0] / f) * (image[1] / f);
    let fan_in = (9 * widest).max(positions) as f64;
    error_model::forward(layers as f64, fan_in)
}

#[test]
fn the_vae_gives_diffusers_moments_latents_and_decoded_images() {
    let threads: i32 = support::threads().parse().unwrap();
    tch::set_num_threads(threads);
    for (k, (spec, image)) in cases().into_iter().enumerate() {
        let dir = temp_dir(&format!("vae-golden-{k}"));
        let json = spec_json(&spec, image);
        let text = support::run_python(
            REFERENCE,
            &["make".as_ref(), dir.as_os_str(), json.as_ref()],
        );
        let line = text.lines().find(|l| l.starts_with('{')).unwrap();
        let meta: serde_json::Value = serde_json::from_str(line).unwrap();

        let vae = Vae::load(&dir.join("vae.safetensors"), &spec, Device::Cpu).unwrap();
        let io = file(&dir.join("vae.io.safetensors"));
        let (enc_tol, dec_tol) = (
            pass_tolerance(&spec, image, false),
            pass_tolerance(&spec, image, true),
        );
        tch::no_grad(|| {
            let moments = vae.net.encode_moments(&io["x"]);
            assert_eq!(moments.size(), io["moments"].size());
            let rel = |ours: &Tensor, theirs: &Tensor| {
                max_abs(&(ours - theirs)) / max_abs(theirs).max(1e-30)
            };
            let d_moments = rel(&moments, &io["moments"]);
            assert!(
                d_moments <= enc_tol,
                "case {k}: moments differ by {d_moments:e} (allowed {enc_tol:e})"
            );
            // The draw and the mode: elementwise on the moments, so the
            // moments' error (exp of a log-variance near 0 has gain ~1).
            let latent = SdVae::latent(&io["moments"], &io["noise"]);
            let d_latent = rel(&latent, &io["latent"]);
            assert!(d_latent <= 1e-6, "case {k}: latent differs by {d_latent:e}");
            let mode = SdVae::latent(&moments, &io["noise"].zeros_like());
            let d_mode = rel(&mode, &io["mode"]);
            assert!(d_mode <= enc_tol, "case {k}: mode differs by {d_mode:e}");
            // Decoding the reference's latent: the decoder's error alone.
            let decoded = vae.net.decode(&io["latent"]);
            assert_eq!(decoded.size(), io["decoded"].size());
            let d_decoded = rel(&decoded, &io["decoded"]);
            assert!(
                d_decoded <= dec_tol,
                "case {k}: decoded images differ by {d_decoded:e} (allowed {dec_tol:e})"
            );
            // Scaled latents decode to the same images.
            let scaled = vae
                .net
                .decode_scaled(&(&io["latent"] * spec.scaling_factor));
            assert!(rel(&scaled, &decoded) <= 1e-5);
            println!(
                "case {k} ({threads} threads, diffusers {}): moments {d_moments:e} (allowed \
                 {enc_tol:e}), latent {d_latent:e}, mode {d_mode:e}, decoded {d_decoded:e} \
                 (allowed {dec_tol:e})",
                meta["diffusers"]
            );
        });
        let ours: i64 = tch::no_grad(|| {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let _net = SdVae::new(&vs.root(), &spec);
            vs.variables().values().map(|t| t.numel() as i64).sum()
        });
        assert_eq!(ours, meta["parameters"].as_i64().unwrap());
    }
}

/// Older diffusers-format VAE files (the first uploads of the SD VAEs among
/// them) name the attention `query`, `key`, `value`, `proj_attn`; diffusers
/// renames them on load and so does [`Vae::load`].
#[test]
fn the_deprecated_attention_names_load_and_bad_files_are_refused_naming_them() {
    let (spec, _) = cases().remove(1);
    let dir = temp_dir("vae-names");
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _net = SdVae::new(&vs.root(), &spec);
    let renamed: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| {
            let n = n
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (n, t)
        })
        .collect();
    assert!(renamed.iter().any(|(n, _)| n.contains(".proj_attn.")));
    let old = dir.join("old.safetensors");
    weights::save(&old, &renamed, &BTreeMap::new()).unwrap();
    let vae = Vae::load(&old, &spec, Device::Cpu).unwrap();
    let x = Tensor::rand([1, 1, 8, 8], (Kind::Float, Device::Cpu));
    let (ours, theirs) = tch::no_grad(|| (vae.net.encode_moments(&x), _net.encode_moments(&x)));
    assert_eq!(max_abs(&(ours - theirs)), 0.0);

    // A missing file gives the export line; another shape names the tensor.
    let err = Vae::load(&dir.join("none.safetensors"), &spec, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none.safetensors") && err.contains(EXPORT_HINT),
        "{err}"
    );
    let wider = VaeSpec {
        block_out: vec![16, 48],
        ..spec.clone()
    };
    let err = format!("{:#}", Vae::load(&old, &wider, Device::Cpu).unwrap_err());
    assert!(err.contains("old.safetensors"), "{err}");
    assert!(
        err.contains("encoder.down_blocks.1.resnets.0.conv1.weight"),
        "{err}"
    );
}
