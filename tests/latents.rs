//! Latent data for latent diffusion: ADM's centre crop against PIL, `sfron
//! encode` (layout, both mirrors' moments, resume, refusal of a
//! mismatched folder), and a DiT trained on the latents whose samples
//! decode through the VAE.

use std::collections::BTreeMap;
use std::path::Path;

use sfron::data::dataset::decode;
use sfron::data::transform::adm_center_crop;
use sfron::model::vae::{SdVae, VaeSpec};
use sfron::model::weights;
use tch::{Device, Kind, Tensor};

mod support;
use support::temp_dir;

const CROP_REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/center_crop_reference.py"
);

/// Pillow's resampling in integer arithmetic (the same coefficients, the
/// same fixed-point rounding, the same pass order): the crop is PIL's to
/// the bit. (fast_image_resize's Catmull-Rom, tried first, differed by up
/// to 8 levels on 27% of the values.) A wrong filter, offset or rounding of
/// the sides moves edges by tens of levels.
#[test]
fn the_adm_centre_crop_matches_pil() {
    let dir = temp_dir("adm-crop");
    for size in [32usize, 64] {
        support::run_python(
            CROP_REFERENCE,
            &["make".as_ref(), dir.as_os_str(), size.to_string().as_ref()],
        );
        let expected: BTreeMap<String, Tensor> = weights::load(&dir.join("crops.safetensors"))
            .unwrap()
            .0
            .into_iter()
            .collect();
        for k in 0..4 {
            let bytes = std::fs::read(dir.join(format!("img{k}.png"))).unwrap();
            let img = decode(&bytes).unwrap();
            let crop = adm_center_crop(&img, size).unwrap();
            assert_eq!((crop.width, crop.height, crop.channels), (size, size, 3));
            let ours = Tensor::from_slice(&crop.data).to_kind(Kind::Int);
            let theirs = expected[&format!("crop{k}")]
                .reshape([-1])
                .to_kind(Kind::Int);
            let diff = (ours - theirs).abs();
            let worst = diff.max().int64_value(&[]);
            let share = diff
                .gt(0)
                .to_kind(Kind::Double)
                .mean(Kind::Double)
                .double_value(&[]);
            println!(
                "size {size}, image {k} ({}x{}): {share:.2e} of the values differ, by at most {worst}",
                img.width, img.height
            );
            assert!(
                worst == 0,
                "size {size}, image {k}: differs by {worst} levels"
            );
        }
    }
}

fn vae_sets(spec: &VaeSpec) -> Vec<String> {
    vec![
        format!("vae.block_out={:?}", spec.block_out),
        format!("vae.layers_per_block={}", spec.layers_per_block),
        format!("vae.latent_channels={}", spec.latent_channels),
        format!("vae.groups={}", spec.groups),
        format!("vae.scaling_factor={}", spec.scaling_factor),
    ]
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    weights::load(path).unwrap().0.into_iter().collect()
}

/// `sfron encode` on the shipped digits with a small random VAE: both
/// parts, shards of 20, each sample's moments those of the VAE on ADM's
/// crop and on its mirror; a rerun writes nothing, a deleted shard is
/// rewritten identically, a different crop into the same folder is
/// refused; then a DiT trains on the latents, its samples decode to
/// digits' size, and the generation evaluation judges them against the
/// source digits.
#[test]
fn encode_writes_resumable_latents_a_dit_trains_on_and_samples_decode() {
    let dir = temp_dir("encode");
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
    let vae_file = dir.join("vae.safetensors");
    let spec = support::write_small_vae(&vae_file, 11);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = SdVae::new(&vs.root(), &spec);
    weights::copy_into(&vs, &weights::load(&vae_file).unwrap().0, &vae_file).unwrap();
    let out = dir.join("latents");
    let base = |name: &str| {
        let mut sets = vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            format!("data.root={mnist}"),
            "data.train_limit=50".into(),
            "data.test_limit=12".into(),
            "data.workers=0".into(),
            format!("device.threads={}", support::threads()),
            "log.level=warn".into(),
            "encode.image_size=28".into(),
            "encode.shard_size=20".into(),
            "encode.batch=7".into(),
        ];
        sets.extend(vae_sets(&spec));
        sets
    };
    let encode = |name: &str, extra: &[&str]| {
        let mut sets = base(name);
        sets.extend(extra.iter().map(|s| s.to_string()));
        let args = [
            "encode",
            "--vae",
            vae_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        support::sfron(&sets, &args)
    };
    let o = encode("encode", &[]);
    assert!(o.status.success(), "{}", support::text(&o));
    let train = out.join("train");
    let shards: Vec<String> = (0..3)
        .map(|k| format!("shard-{k:05}.safetensors"))
        .collect();
    for s in &shards {
        assert!(train.join(s).is_file(), "{s}");
    }
    assert!(out.join("test/shard-00000.safetensors").is_file());
    assert!(!out.join("test/shard-00001.safetensors").exists());
    // Sample 23 (shard 1, row 3): the VAE's moments of its crop and mirror.
    let shard = tensors(&train.join(&shards[1]));
    assert_eq!(shard["moments"].size(), [20, 2 * 8 * 14 * 14]);
    assert_eq!(shard["labels"].size(), [20]);
    let ds = sfron::data::Dataset::open(
        sfron::data::Format::Mnist,
        Path::new(mnist),
        sfron::data::Part::Train,
    )
    .unwrap();
    let crop = adm_center_crop(&ds.load(23).unwrap(), 28).unwrap();
    let x = (Tensor::from_slice(&crop.data)
        .view([1, 1, 28, 28])
        .to_kind(Kind::Float)
        / 255.0
        - 0.5)
        / 0.5;
    let (plain, mirror) =
        tch::no_grad(|| (net.encode_moments(&x), net.encode_moments(&x.flip([3]))));
    let stored = shard["moments"].get(3).view([2, 8, 14, 14]);
    let rel = |a: &Tensor, b: &Tensor| {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    };
    // The same network on the same input, batch 7 against batch 1: the
    // convolutions' blocking may differ, float32 rounding only.
    assert!(rel(&stored.get(0), &plain.get(0)) <= 1e-5);
    assert!(rel(&stored.get(1), &mirror.get(0)) <= 1e-5);
    assert!(
        rel(&plain, &mirror) > 1e-2,
        "a digit and its mirror encode differently"
    );
    assert_eq!(shard["labels"].int64_value(&[3]), ds.labels[23]);

    // A rerun writes nothing; a deleted shard comes back the same.
    let before = std::fs::read(train.join(&shards[1])).unwrap();
    std::fs::remove_file(train.join(&shards[1])).unwrap();
    std::fs::remove_file(train.join("index.json")).unwrap();
    let o = encode("encode-again", &[]);
    assert!(o.status.success(), "{}", support::text(&o));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs/encode-again/encode.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["shards_written_by_rank_0"], 1, "{summary}");
    // The same tensors (safetensors' metadata order is not fixed).
    let kept = dir.join("shard-1-before.safetensors");
    std::fs::write(&kept, &before).unwrap();
    assert!(support::same_bits(&kept, &train.join(&shards[1])));
    // Another crop into the same folder is refused, nothing changed.
    support::assert_refused(
        &dir,
        "encode-other",
        &{
            let mut s = base("encode-other");
            s.push("encode.image_size=16".into());
            s
        },
        &[
            "encode",
            "--vae",
            vae_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "index.json",
    );

    // A DiT on the latents; its samples decode to 28 × 28 digits.
    let dit = |name: &str| {
        vec![
            format!("run.root={}", dir.join("runs").display()),
            format!("run.name={name}"),
            "data.format=latents".into(),
            format!("data.root={}", out.display()),
            "data.workers=0".into(),
            format!("device.threads={}", support::threads()),
            "log.level=warn".into(),
            "model.arch=dit".into(),
            "model.dit.name=DiT-S/2".into(),
            "model.dit.depth=2".into(),
            "model.dit.hidden=32".into(),
            "model.dit.heads=2".into(),
            "train.batch=10".into(),
            "train.max_steps=3".into(),
            "sample.per_class=1".into(),
            "sample.classes=[1, 7]".into(),
            "sample.steps=4".into(),
        ]
    };
    let o = support::sfron(&dit("dit"), &["train"]);
    assert!(o.status.success(), "{}", support::text(&o));
    let from = dir.join("runs/dit").display().to_string();
    let o = support::sfron(&dit("dit-sample"), &["sample", "--from", &from]);
    assert!(o.status.success(), "{}", support::text(&o));
    let images = &tensors(&dir.join("runs/dit-sample/samples.safetensors"))["images"];
    assert_eq!(images.size(), [2, 1, 28, 28]);
    assert!(dir.join("runs/dit-sample/grid.png").is_file());
    // SA cannot replay latents yet: refused, not run on decoded pixels.
    let split = dir.join("split.json").display().to_string();
    let o = support::sfron(
        &dit("split"),
        &["split", "--scenario", "class:1", "--out", &split],
    );
    assert!(o.status.success(), "{}", support::text(&o));
    // The generation evaluation: samples decoded, judged by a digit
    // classifier, FID against the source digits ADM-cropped as encoded.
    let judge = support::train_digit_judge(&dir, 200, 10);
    let mut sets = dit("dit-eval");
    sets.push(format!("eval.classifier={}", judge.display()));
    let o = support::sfron(&sets, &["eval", "--model", &from, "--split", &split]);
    assert!(o.status.success(), "{}", support::text(&o));
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs/dit-eval/eval.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(e["forget_class"], 1, "{e}");
    assert_eq!(
        e["real_remain"],
        50 - ds.labels[..50].iter().filter(|&&c| c == 1).count(),
        "{e}"
    );
    assert!(
        e["fid_classifier"].as_f64().is_some_and(f64::is_finite),
        "{e}"
    );
    let weights_file = dir.join("runs/dit/model.safetensors").display().to_string();
    support::assert_refused(
        &dir,
        "dit-sa",
        &dit("dit-sa"),
        &[
            "unlearn",
            "--method",
            "sa",
            "--from",
            &weights_file,
            "--split",
            &split,
        ],
        "latent",
    );
    // Sampling decodes with the VAE the latents were encoded with: another
    // VAE of the same shape at that path is refused by its digest, before
    // any image is decoded.
    support::write_small_vae(&vae_file, 12);
    support::assert_refused(
        &dir,
        "dit-other-vae",
        &dit("dit-other-vae"),
        &["sample", "--from", &from],
        "not the VAE",
    );
}

/// The latent transform: each draw picks a mirror (about half of the keys
/// pick each) and returns `(mean + exp(logvar / 2) ε) · scaling` of it;
/// over 4,000 keyed draws of a sample whose two mirrors have constant
/// moments, the per-mirror mean and standard deviation match to 4 standard
/// errors (the draws are fixed by their keys: the test is deterministic).
#[test]
fn the_latent_transform_draws_a_mirror_and_a_posterior_sample() {
    use sfron::data::{Image, Transform};
    use sfron::rng::Rng;
    let (c, side, scaling) = (2usize, 3usize, 0.5);
    let plane = side * side;
    // Mirror 0: mean 1, logvar ln 4 (std 2); mirror 1: mean −3, logvar 0.
    let mut floats = Vec::new();
    for (mean, logvar) in [(1.0f32, 4f32.ln()), (-3.0, 0.0)] {
        floats.extend(std::iter::repeat_n(mean, c * plane));
        floats.extend(std::iter::repeat_n(logvar, c * plane));
    }
    let img = Image {
        width: side,
        height: side,
        channels: 4 * c,
        data: floats.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let t = Transform::latent(c, side, scaling);
    let mut resizer = fast_image_resize::Resizer::new();
    let mut out = vec![0f32; c * plane];
    let mut groups: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for key in 0..4000u64 {
        let mut rng = Rng::keyed(&[7, key]);
        t.apply(&img, &mut rng, &mut resizer, &mut out).unwrap();
        // The mirror is the stream's first draw (then the noise).
        let m = usize::from(Rng::keyed(&[7, key]).chance(0.5));
        groups[m].extend(out.iter().map(|&v| f64::from(v)));
    }
    let share = groups[0].len() as f64 / (groups[0].len() + groups[1].len()) as f64;
    assert!(
        (share - 0.5).abs() < 0.03,
        "mirror 0 drawn {share:.3} of the time"
    );
    for (m, (mean, std)) in [(1.0, 2.0), (-3.0, 1.0)].into_iter().enumerate() {
        let v = &groups[m];
        let mu = v.iter().sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        let se = scaling * std / (v.len() as f64).sqrt();
        assert!(
            (mu - scaling * mean).abs() < 4.0 * se,
            "mirror {m}: mean {mu}"
        );
        assert!(
            (sd - scaling * std).abs() < 4.0 * se * 2f64.sqrt() * 2.0,
            "mirror {m}: std {sd}"
        );
    }
    // A sample of another shape is refused, naming what it holds.
    let bad = Image {
        channels: 2 * c,
        ..img
    };
    let err = t
        .apply(&bad, &mut Rng::keyed(&[1]), &mut resizer, &mut out)
        .unwrap_err();
    assert!(err.contains("planes"), "{err}");
}
