//! Data: every format on real or generated fixtures, split manifests, the
//! loader's determinism, and the transforms against torchvision (golden).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use sfron::data::transform::{random_resized_crop_box, shorter_side_to};
use sfron::data::{
    BatchStream, CorruptPolicy, Cursor, DataError, Dataset, Format, Loader, LoaderOptions,
    Manifest, Part, Sampler, Scenario, Stream, Transform,
};
use sfron::rng::Rng;
use tch::Tensor;

mod support;
use support::temp_dir;

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn options(workers: usize) -> LoaderOptions {
    LoaderOptions {
        workers,
        prefetch: 3,
        on_corrupt: CorruptPolicy::Error,
        seed: 11,
        pin_memory: false,
    }
}

/// A small deterministic RGB image.
fn pattern(width: u32, height: u32, salt: u8) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 7 + y) as u8 ^ salt,
            (y * 5) as u8,
            (x + y * 3) as u8 ^ salt,
        ])
    })
}

// ------------------------------------------------------------------ MNIST

#[test]
fn shipped_mnist_opens_with_the_documented_counts_and_raw_pixels() {
    let train = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Train).unwrap();
    let test = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Test).unwrap();
    assert_eq!((train.len(), test.len()), (8000, 2000));
    let mut per_class = vec![0; 10];
    for &l in &train.labels {
        per_class[l as usize] += 1;
    }
    assert_eq!(
        per_class,
        vec![801, 902, 793, 826, 784, 690, 811, 856, 755, 782]
    );
    // Sample 17's pixels are the IDX bytes at 16 + 17·784, read independently.
    let raw = gunzip(&Path::new(MNIST).join("train-images-idx3-ubyte.gz"));
    let img = train.load(17).unwrap();
    assert_eq!((img.width, img.height, img.channels), (28, 28, 1));
    assert_eq!(img.data, raw[16 + 17 * 784..16 + 18 * 784]);
    let labels = gunzip(&Path::new(MNIST).join("train-labels-idx1-ubyte.gz"));
    assert_eq!(train.labels[17], labels[8 + 17] as i64);
    assert_ne!(train.fingerprint, test.fingerprint);
}

#[test]
fn plain_idx_files_open_like_gz_with_the_same_fingerprint() {
    let dir = temp_dir("idx-plain");
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::write(
            dir.join(name),
            gunzip(&Path::new(MNIST).join(format!("{name}.gz"))),
        )
        .unwrap();
    }
    let plain = Dataset::open(Format::Mnist, &dir, Part::Train).unwrap();
    let gz = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Train).unwrap();
    assert_eq!(plain.fingerprint, gz.fingerprint);
    assert_eq!(plain.load(4321).unwrap(), gz.load(4321).unwrap());
}

#[test]
fn truncated_or_missing_idx_is_an_error_naming_the_file() {
    let dir = temp_dir("idx-bad");
    let images = gunzip(&Path::new(MNIST).join("train-images-idx3-ubyte.gz"));
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        &images[..images.len() - 100],
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        gunzip(&Path::new(MNIST).join("train-labels-idx1-ubyte.gz")),
    )
    .unwrap();
    let err = Dataset::open(Format::Mnist, &dir, Part::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("header says 8000 images"),
        "{err}"
    );
    let err = Dataset::open(Format::Mnist, &dir, Part::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("not found"),
        "{err}"
    );
}

// ------------------------------------------------------------------ CIFAR

/// One CIFAR record: labels, then R, G, B planes; pixel (y, x) of plane c is
/// (c·50 + y·3 + x + seed) mod 256.
fn cifar_record(labels: &[u8], seed: usize) -> Vec<u8> {
    let mut rec = labels.to_vec();
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                rec.push(((c * 50 + y * 3 + x + seed) % 256) as u8);
            }
        }
    }
    rec
}

#[test]
fn cifar10_and_cifar100_binaries_decode_planes_to_pixels() {
    let dir = temp_dir("cifar");
    let ten = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&ten).unwrap();
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..3)
            .flat_map(|k| cifar_record(&[((b + k) % 10) as u8], b * 10 + k))
            .collect();
        std::fs::write(ten.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(ten.join("test_batch.bin"), cifar_record(&[9], 99)).unwrap();
    std::fs::write(
        ten.join("batches.meta.txt"),
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    )
    .unwrap();
    let train = Dataset::open(Format::Cifar10, &dir, Part::Train).unwrap();
    assert_eq!(train.len(), 15);
    assert_eq!(train.classes[9], "truck");
    assert_eq!(
        train.labels[4], 3,
        "batch 2, record 1: label (2 + 1) mod 10"
    );
    let img = train.load(4).unwrap();
    let seed = 2 * 10 + 1;
    assert_eq!((img.width, img.height, img.channels), (32, 32, 3));
    for (y, x, c) in [(0, 0, 0), (5, 7, 1), (31, 31, 2)] {
        assert_eq!(
            img.data[(y * 32 + x) * 3 + c] as usize,
            (c * 50 + y * 3 + x + seed) % 256
        );
    }
    assert_eq!(
        Dataset::open(Format::Cifar10, &dir, Part::Test)
            .unwrap()
            .labels,
        vec![9]
    );

    let hundred = dir.join("c100");
    std::fs::create_dir_all(&hundred).unwrap();
    let bytes: Vec<u8> = [(3u8, 77u8), (19, 4)]
        .iter()
        .enumerate()
        .flat_map(|(k, &(co, fi))| cifar_record(&[co, fi], k))
        .collect();
    std::fs::write(hundred.join("train.bin"), bytes).unwrap();
    let c100 = Dataset::open(Format::Cifar100, &hundred, Part::Train).unwrap();
    assert_eq!(c100.labels, vec![77, 4], "fine labels");
    assert_eq!(c100.num_classes(), 100);

    std::fs::write(hundred.join("test.bin"), vec![0u8; 3000]).unwrap();
    let err = Dataset::open(Format::Cifar100, &hundred, Part::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test.bin") && err.contains("3074-byte records"),
        "{err}"
    );
}

// ------------------------------------------------------------------ ImageFolder and tar

fn make_image_folder(root: &Path) {
    let train = root.join("train");
    let ant = vec!["x.PNG", "sub/y.jpeg", "sub/deeper/z.png", "sub-b/w.png"];
    for (class, files) in [
        ("zebra", vec!["b.png", "a.jpg"]),
        ("ant", ant),
        ("mole", vec!["m.png"]),
    ] {
        for (k, f) in files.iter().enumerate() {
            let path = train.join(class).join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let img = pattern(40 + k as u32 * 3, 30, class.len() as u8 + k as u8);
            if f.to_lowercase().ends_with("png") {
                img.save_with_format(&path, image::ImageFormat::Png)
                    .unwrap();
            } else {
                img.save_with_format(&path, image::ImageFormat::Jpeg)
                    .unwrap();
            }
        }
    }
    std::fs::write(train.join("ant/notes.txt"), "not an image").unwrap();
    std::fs::write(train.join("README"), "a file beside the class folders").unwrap();
}

#[test]
fn image_folder_orders_classes_and_files_as_torchvision() {
    let root = temp_dir("folder");
    make_image_folder(&root);
    let ds = Dataset::open(Format::ImageFolder, &root, Part::Train).unwrap();
    assert_eq!(ds.classes, vec!["ant", "mole", "zebra"]);
    // sorted(os.walk()): folder paths sorted as strings ("sub" < "sub-b" <
    // "sub/deeper", since '-' < '/'), files sorted within each folder.
    let ids = [
        "ant/x.PNG",
        "ant/sub/y.jpeg",
        "ant/sub-b/w.png",
        "ant/sub/deeper/z.png",
        "mole/m.png",
        "zebra/a.jpg",
        "zebra/b.png",
    ];
    assert_eq!(ds.ids, ids);
    assert_eq!(ds.labels, vec![0, 0, 0, 0, 1, 2, 2]);
    // PNG decodes exactly.
    let img = ds.load(6).unwrap();
    assert_eq!(img.data, pattern(40, 30, 5).into_raw());
    let err = Dataset::open(Format::ImageFolder, &root, Part::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("val") && err.contains("not found"), "{err}");
}

#[test]
fn corrupt_image_is_an_error_naming_the_file_or_skipped_and_counted() {
    let root = temp_dir("corrupt");
    make_image_folder(&root);
    let bad = root.join("train/mole/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a jpeg").unwrap();
    let ds = Arc::new(Dataset::open(Format::ImageFolder, &root, Part::Train).unwrap());
    let bad_index = ds
        .ids
        .iter()
        .position(|id| id == "mole/broken.jpg")
        .unwrap();
    let all: Vec<usize> = (0..ds.len()).collect();
    let transform = Transform::imagenet(false);

    let mut loader = Loader::new(ds.clone(), transform.clone(), options(1));
    loader.submit(0, all.clone());
    let err = loader.take().unwrap_err();
    assert!(matches!(err, DataError::Corrupt { .. }));
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{err}"
    );

    let mut skip = options(2);
    skip.on_corrupt = CorruptPolicy::Skip;
    let mut loader = Loader::new(ds.clone(), transform, skip);
    loader.submit(0, all.clone());
    let batch = loader.take().unwrap();
    assert_eq!(batch.skipped, 1);
    assert_eq!(loader.skipped(), 1);
    assert!(!batch.indices.contains(&bad_index));
    assert_eq!(batch.images.size(), vec![7, 3, 224, 224]);
    assert_eq!(batch.labels.size(), vec![7]);
}

fn tar_add(builder: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, name, bytes).unwrap();
}

fn png_bytes(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn tar_shards_index_members_and_read_them_by_offset() {
    let root = temp_dir("tar");
    std::fs::create_dir_all(root.join("train")).unwrap();
    for shard in 0..2 {
        let file = std::fs::File::create(root.join(format!("train/shard-{shard:04}.tar"))).unwrap();
        let mut b = tar::Builder::new(file);
        for k in 0..3 {
            let key = format!("s{shard}/img{k:03}");
            let label = (shard * 3 + k) % 4;
            // Label before image for one sample: order within a key must not matter.
            if k == 1 {
                tar_add(
                    &mut b,
                    &format!("{key}.cls"),
                    format!("{label}\n").as_bytes(),
                );
            }
            tar_add(
                &mut b,
                &format!("{key}.png"),
                &png_bytes(&pattern(20 + k as u32, 10, shard as u8)),
            );
            if k != 1 {
                tar_add(&mut b, &format!("{key}.cls"), label.to_string().as_bytes());
            }
            tar_add(&mut b, &format!("{key}.json"), b"{}");
        }
        b.finish().unwrap();
    }
    let ds = Dataset::open(Format::Tar, &root, Part::Train).unwrap();
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.ids[4], "s1/img001");
    assert_eq!(ds.labels, vec![0, 1, 2, 3, 0, 1]);
    assert_eq!(ds.num_classes(), 4);
    assert_eq!(ds.load(4).unwrap().data, pattern(21, 10, 1).into_raw());

    let file = std::fs::File::create(root.join("train/shard-0002.tar")).unwrap();
    let mut b = tar::Builder::new(file);
    tar_add(&mut b, "lonely.png", &png_bytes(&pattern(4, 4, 0)));
    b.finish().unwrap();
    let err = Dataset::open(Format::Tar, &root, Part::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard-0002.tar") && err.contains("lonely") && err.contains(".cls"),
        "{err}"
    );
}

// ------------------------------------------------------------------ manifests

#[test]
fn manifest_same_scenario_same_forget_set_and_refuses_other_data() {
    let train = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Train).unwrap();
    let a = Manifest::create(&train, Scenario::parse("random:0.1", 5).unwrap()).unwrap();
    let b = Manifest::create(&train, Scenario::parse("random:0.1", 5).unwrap()).unwrap();
    let c = Manifest::create(&train, Scenario::parse("random:0.1", 6).unwrap()).unwrap();
    assert_eq!(a.forget, b.forget);
    assert_ne!(a.forget, c.forget);
    assert_eq!(a.forget.len(), 800);
    assert_eq!(a.remain().len(), 7200);
    assert_eq!(a.counts.forget.iter().sum::<usize>(), 800);

    let dir = temp_dir("manifest");
    let path = dir.join("split.json");
    a.save(&path).unwrap();
    let loaded = Manifest::load(&path).unwrap();
    assert_eq!(loaded, a);
    loaded.check(&train, &path).unwrap();

    let test = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Test).unwrap();
    let err = loaded.check(&test, &path).unwrap_err().to_string();
    assert!(
        err.contains("split.json") && err.contains("8000 samples") && err.contains("2000 samples"),
        "{err}"
    );

    std::fs::write(&path, "{\"version\": 1}").unwrap();
    let err = Manifest::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("split.json") && err.contains("not a split manifest"),
        "{err}"
    );
}

#[test]
fn class_and_list_scenarios() {
    let train = Dataset::open(Format::Mnist, Path::new(MNIST), Part::Train).unwrap();
    let m = Manifest::create(&train, Scenario::parse("class:3,5", 0).unwrap()).unwrap();
    assert_eq!(m.forget.len(), 826 + 690);
    assert!(
        m.forget
            .iter()
            .all(|&i| train.labels[i] == 3 || train.labels[i] == 5)
    );
    assert_eq!(m.counts.remain[3], 0);
    assert_eq!(m.counts.forget[4], 0);

    let dir = temp_dir("list");
    let list = dir.join("forget.txt");
    std::fs::write(
        &list,
        "# deletion request 17\n12\n7\n\n12   # again\n3999\n",
    )
    .unwrap();
    let m = Manifest::create(
        &train,
        Scenario::parse(&format!("list:{}", list.display()), 0).unwrap(),
    )
    .unwrap();
    assert_eq!(m.forget, vec![7, 12, 3999]);
    assert!(matches!(
        m.scenario,
        Scenario::List {
            listed: 4,
            duplicates: 1,
            ..
        }
    ));

    std::fs::write(&list, "1\n2\n8000\n").unwrap();
    let err = Manifest::create(
        &train,
        Scenario::parse(&format!("list:{}", list.display()), 0).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("forget.txt") && err.contains("line 3") && err.contains("8000"),
        "{err}"
    );

    for bad in ["random:1.5", "random:x", "class:", "class:12", "shuffle:3"] {
        let r = Scenario::parse(bad, 0).and_then(|s| Manifest::create(&train, s));
        assert!(r.is_err(), "{bad} accepted");
    }
}

#[test]
fn list_scenario_takes_image_folder_paths() {
    let root = temp_dir("list-folder");
    make_image_folder(&root);
    let ds = Dataset::open(Format::ImageFolder, &root, Part::Train).unwrap();
    let list = root.join("forget.txt");
    std::fs::write(&list, "zebra/a.jpg\nant/sub/y.jpeg\n").unwrap();
    let m = Manifest::create(
        &ds,
        Scenario::parse(&format!("list:{}", list.display()), 0).unwrap(),
    )
    .unwrap();
    assert_eq!(m.forget, vec![1, 5]);
}

// ------------------------------------------------------------------ loader

fn collect_stream(
    ds: &Arc<Dataset>,
    workers: usize,
    start: Cursor,
    steps: usize,
    rank: usize,
    world: usize,
) -> Vec<Tensor> {
    let members: Vec<usize> = (0..ds.len()).filter(|i| i % 5 != 0).collect();
    let sampler = Sampler::new(members, 3, Stream::Remain, 64, true, false);
    let loader = Loader::new(ds.clone(), Transform::cifar(true, false), options(workers));
    let mut stream = BatchStream::new(sampler, loader, start, rank, world);
    (0..steps)
        .map(|_| stream.next_batch().unwrap().images)
        .collect()
}

#[test]
fn augmented_batches_do_not_depend_on_worker_count_and_resume_exactly() {
    let dir = temp_dir("loader");
    let bytes: Vec<u8> = (0..300)
        .flat_map(|k| cifar_record(&[(k % 10) as u8], k * 7))
        .collect();
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), &bytes).unwrap();
    }
    let ds = Arc::new(Dataset::open(Format::Cifar10, &dir, Part::Train).unwrap());
    let zero = collect_stream(&ds, 0, Cursor::default(), 30, 0, 1);
    let two = collect_stream(&ds, 2, Cursor::default(), 30, 0, 1);
    for (a, b) in zero.iter().zip(&two) {
        assert!(a.equal(b), "workers changed the pixels");
    }
    // Augmentation really happens: a sample differs between epochs.
    assert!(!zero[0].equal(&zero[19]));
    // Stop after 7 steps, restore the cursor: the rest is identical.
    let resumed = collect_stream(&ds, 1, Cursor { epoch: 0, batch: 7 }, 23, 0, 1);
    for (a, b) in zero[7..].iter().zip(&resumed) {
        assert!(a.equal(b), "resume diverged");
    }
    // Two ranks' shares of a step concatenate to the one-rank batch.
    let r0 = collect_stream(&ds, 1, Cursor::default(), 3, 0, 2);
    let r1 = collect_stream(&ds, 1, Cursor::default(), 3, 1, 2);
    for k in 0..3 {
        assert!(Tensor::cat(&[&r0[k], &r1[k]], 0).equal(&zero[k]));
    }
}

// ------------------------------------------------------------------ transforms

fn load_png(name: &str) -> sfron::data::Image {
    sfron::data::dataset::decode(&std::fs::read(Path::new(GOLDEN).join(name)).unwrap()).unwrap()
}

/// Compares in pixel units (|Δ| · std · 255): at most one intensity level
/// apart. Error model: torchvision resamples 8-bit images with PIL, whose
/// fixed-point filter coefficients and final rounding to a level put each
/// pixel within half a level of the exact filter; ours is within float32
/// rounding of it (1e-3 levels covers that): together at most one level.
fn assert_close_to_torchvision(ours: &[f32], npy: &str, shape: [usize; 3]) {
    let reference = Tensor::read_npy(Path::new(GOLDEN).join(npy)).unwrap();
    assert_eq!(
        reference.size(),
        shape.iter().map(|&s| s as i64).collect::<Vec<_>>()
    );
    let reference = Vec::<f32>::try_from(reference.flatten(0, -1)).unwrap();
    let std = [0.229f32, 0.224, 0.225];
    let plane = shape[1] * shape[2];
    let mut worst = 0f32;
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        worst = worst.max((a - b).abs() * std[i / plane] * 255.0);
    }
    assert!(
        worst <= 1.0 + 1e-3,
        "{npy}: worst difference {worst:.3} intensity levels"
    );
}

#[test]
fn imagenet_eval_transform_matches_torchvision() {
    let img = load_png("transform_input.png");
    let t = Transform::imagenet(false);
    let mut out = vec![0f32; t.numel()];
    let mut resizer = fast_image_resize::Resizer::new();
    t.apply(&img, &mut Rng::keyed(&[0]), &mut resizer, &mut out)
        .unwrap();
    assert_close_to_torchvision(&out, "transform_imagenet_eval.npy", [3, 224, 224]);
}

#[test]
fn odd_resize_and_crop_and_grey_input_match_torchvision() {
    let small = Transform {
        recipe: sfron::data::transform::Recipe::ResizeCenterCrop {
            resize: 57,
            crop: 50,
        },
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        shape: [3, 50, 50],
    };
    let mut resizer = fast_image_resize::Resizer::new();
    for (png, npy) in [
        ("transform_input.png", "transform_resize_small.npy"),
        ("transform_input_gray.png", "transform_gray_small.npy"),
    ] {
        let mut out = vec![0f32; small.numel()];
        small
            .apply(
                &load_png(png),
                &mut Rng::keyed(&[0]),
                &mut resizer,
                &mut out,
            )
            .unwrap();
        assert_close_to_torchvision(&out, npy, [3, 50, 50]);
    }
}

#[test]
fn resize_arithmetic_follows_torchvision() {
    assert_eq!(shorter_side_to(333, 250, 256), (340, 256));
    assert_eq!(shorter_side_to(250, 333, 256), (256, 340));
    assert_eq!(shorter_side_to(500, 500, 256), (256, 256));
    let mut rng = Rng::keyed(&[1]);
    for _ in 0..2000 {
        let (w, h) = (50 + rng.below(600) as usize, 50 + rng.below(600) as usize);
        let (top, left, ch, cw) = random_resized_crop_box(w, h, &mut rng);
        assert!(top + ch <= h && left + cw <= w && ch > 0 && cw > 0);
    }
    // A very wide image falls back to a centred crop clamped to ratio 4/3.
    let (top, left, ch, cw) = random_resized_crop_box(4000, 10, &mut Rng::keyed(&[2]));
    assert!(ch <= 10 && cw <= 4000 && top + ch <= 10 && left + cw <= 4000);
}

#[test]
fn cifar_train_transform_pads_with_zero_and_flips() {
    let img = sfron::data::Image {
        width: 32,
        height: 32,
        channels: 3,
        data: vec![255; 32 * 32 * 3],
    };
    let t = Transform::cifar(true, false);
    let mut seen_pad = false;
    for seed in 0..50 {
        let mut out = vec![0f32; t.numel()];
        t.apply(
            &img,
            &mut Rng::keyed(&[seed]),
            &mut fast_image_resize::Resizer::new(),
            &mut out,
        )
        .unwrap();
        // (v − mean)/std in float32: a few ulps of values below 3, ~1e-6.
        let zero = -0.4914f32 / 0.2470;
        let one = (1.0 - 0.4914f32) / 0.2470;
        assert!(
            out[..1024]
                .iter()
                .all(|&v| (v - zero).abs() < 1e-5 || (v - one).abs() < 1e-5)
        );
        seen_pad |= out[..1024].iter().any(|&v| (v - zero).abs() < 1e-5);
    }
    assert!(seen_pad, "50 random crops never showed padding");
}

/// A `side × side` RGB test image: a smooth pattern of `amplitude` around
/// mid-grey with periods `(px, py)`, plus uniform noise of ±`noise` from
/// the stream `key`, clipped to 0..=255 (resampling then both overshoots
/// and clips).
fn noisy_rgb(
    side: u32,
    (amplitude, (px, py)): (f64, (f64, f64)),
    noise: f64,
    key: u64,
) -> image::RgbImage {
    let mut rng = Rng::keyed(&[key]);
    image::RgbImage::from_fn(side, side, |x, y| {
        let base =
            |c: u32| 127.0 + amplitude * ((x as f64 / px + c as f64).sin() * (y as f64 / py).cos());
        image::Rgb(
            [0, 1, 2].map(|c| (base(c) + rng.uniform_in(-noise, noise)).clamp(0.0, 255.0) as u8),
        )
    })
}

/// TinyImageNet as released (tiny-imagenet-200.zip): `train/<wnid>/images/
/// <wnid>_<k>.JPEG` beside `<wnid>_boxes.txt`, and a flat `val/images/`
/// whose labels are in `val/val_annotations.txt` (file, wnid, box). The
/// validation classes are the training folders' (sorted wnids); without
/// the annotations file, opening it and `sfron train` are refused naming
/// the file (exit 2, no run folder).
#[test]
fn tinyimagenet_as_released_reads_the_validation_annotations() {
    let root = temp_dir("tiny");
    let wnids = ["n02124075", "n01443537", "n09246464"];
    for (c, wnid) in wnids.iter().enumerate() {
        let dir = root.join("train").join(wnid).join("images");
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..2 {
            pattern(64, 64, (c * 2 + k) as u8)
                .save_with_format(
                    dir.join(format!("{wnid}_{k}.JPEG")),
                    image::ImageFormat::Png,
                )
                .unwrap();
        }
        std::fs::write(
            root.join("train")
                .join(wnid)
                .join(format!("{wnid}_boxes.txt")),
            "",
        )
        .unwrap();
    }
    let val = root.join("val/images");
    std::fs::create_dir_all(&val).unwrap();
    let mut annotations = String::new();
    for (k, wnid) in ["n09246464", "n01443537", "n09246464", "n02124075"]
        .iter()
        .enumerate()
    {
        pattern(64, 64, 40 + k as u8)
            .save_with_format(val.join(format!("val_{k}.JPEG")), image::ImageFormat::Png)
            .unwrap();
        annotations.push_str(&format!("val_{k}.JPEG\t{wnid}\t0\t0\t63\t63\n"));
    }
    std::fs::write(root.join("val/val_annotations.txt"), &annotations).unwrap();

    let train = Dataset::open(Format::ImageFolder, &root, Part::Train).unwrap();
    assert_eq!(train.classes, vec!["n01443537", "n02124075", "n09246464"]);
    assert_eq!(train.labels, vec![0, 0, 1, 1, 2, 2]);
    let test = Dataset::open(Format::ImageFolder, &root, Part::Test).unwrap();
    assert_eq!(test.classes, train.classes);
    assert_eq!(
        test.ids,
        [
            "images/val_0.JPEG",
            "images/val_1.JPEG",
            "images/val_2.JPEG",
            "images/val_3.JPEG"
        ]
    );
    assert_eq!(test.labels, vec![2, 0, 2, 1]);
    assert_eq!(test.load(3).unwrap().data, pattern(64, 64, 43).into_raw());

    // An unknown class in the annotations names the line.
    std::fs::write(
        root.join("val/val_annotations.txt"),
        "val_0.JPEG\tn00000000\t0\t0\t1\t1\n",
    )
    .unwrap();
    let err = Dataset::open(Format::ImageFolder, &root, Part::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1") && err.contains("n00000000"), "{err}");

    std::fs::remove_file(root.join("val/val_annotations.txt")).unwrap();
    let err = Dataset::open(Format::ImageFolder, &root, Part::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("val_annotations.txt") && err.contains("not found"),
        "{err}"
    );
    let sets = vec![
        format!("run.root={}", root.join("runs").display()),
        "run.name=tiny".to_string(),
        "data.format=imagefolder".into(),
        format!("data.root={}", root.display()),
        "data.workers=0".into(),
        "data.transform=imagenet".into(),
        "model.arch=resnet18".into(),
        "train.max_steps=1".into(),
    ];
    support::assert_refused(&root, "tiny", &sets, &["train"], "val_annotations.txt");
    std::fs::remove_dir_all(&root).unwrap();
}

/// The release's TinyImageNet transform (tests/golden/
/// tinyimagenet_transform_reference.py: `Resize(224, BICUBIC)` of the
/// uint8 tensor, /255, ImageNet normalisation) on a noisy 64 × 64 image:
/// within one intensity level. Error model: libtorch interpolates in
/// float32, sfron in float64, with the same weights; the values agree to
/// ~1e-4 levels and only a value within that of a half level can round to
/// the neighbouring level (Pillow's 8-bit passes would be ~20 levels off,
/// so the test tells the two apart). A non-square image is refused.
#[test]
fn tinyimagenet_transform_matches_the_release() {
    let dir = temp_dir("tiny-transform");
    let png = dir.join("in.png");
    noisy_rgb(64, (100.0, (5.0, 3.0)), 40.0, 7)
        .save(&png)
        .unwrap();
    let out = dir.join("out.safetensors");
    support::run_python(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/tinyimagenet_transform_reference.py"
        ),
        &[png.as_os_str(), out.as_os_str()],
    );
    let t = Transform::tinyimagenet(false);
    assert_eq!(t.shape, [3, 224, 224]);
    let decoded = sfron::data::dataset::decode(&std::fs::read(&png).unwrap()).unwrap();
    let mut ours = vec![0f32; t.numel()];
    let mut resizer = fast_image_resize::Resizer::new();
    t.apply(&decoded, &mut Rng::keyed(&[0]), &mut resizer, &mut ours)
        .unwrap();
    let reference = sfron::model::weights::load(&out).unwrap().0.remove(0).1;
    let npy = dir.join("ref.npy");
    reference.write_npy(&npy).unwrap();
    let std = [0.229f32, 0.224, 0.225];
    let reference = Vec::<f32>::try_from(reference.flatten(0, -1)).unwrap();
    let mut worst = 0f32;
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        worst = worst.max((a - b).abs() * std[i / (224 * 224)] * 255.0);
    }
    println!("tinyimagenet transform: worst difference {worst:.4} intensity levels");
    assert!(
        worst <= 1.0 + 1e-3,
        "worst difference {worst:.3} intensity levels"
    );
    let wide = sfron::data::Image {
        width: 64,
        height: 32,
        channels: 3,
        data: vec![0; 64 * 32 * 3],
    };
    let err = t
        .apply(&wide, &mut Rng::keyed(&[0]), &mut resizer, &mut ours)
        .unwrap_err();
    assert!(err.contains("64x32"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// RandAugment's 14 operations (sfron::data::rand_augment) against
/// torchvision's on a uint8 tensor (tests/golden/rand_augment_reference.py)
/// at the release's strength (bin 2 of 31) and a strong one (bin 15), both
/// signs: the strengths agree with torchvision's `_augmentation_space`.
/// Error model: the photometric operations run the same float32
/// operations on the same values (Contrast's mean is an exact float32 sum
/// of integers), so they must agree exactly; Sharpness sums its 3 × 3
/// window in another order than the convolution, so a smoothed value
/// within rounding of a half level may round the other way (one level, on
/// at most 0.1% of the values); the geometric ones compute the sampling
/// coordinates in float32 in another order, so a coordinate within
/// rounding of a half pixel may pick the neighbour (at most 0.5% of the
/// pixels). A transposed matrix, a wrong centre or sign, or a truncation
/// for a rounding is off on most pixels.
#[test]
fn rand_augment_operations_match_torchvision() {
    use sfron::data::rand_augment::{OPS, apply_op};
    let dir = temp_dir("rand-augment");
    let png = dir.join("in.png");
    noisy_rgb(224, (60.0, (17.0, 23.0)), 20.0, 11)
        .save(&png)
        .unwrap();
    let out = dir.join("out.safetensors");
    let text = support::run_python(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/rand_augment_reference.py"
        ),
        &[png.as_os_str(), out.as_os_str()],
    );
    let line = text.lines().find(|l| l.starts_with('{')).unwrap();
    let strengths: serde_json::Value = serde_json::from_str(line).unwrap();
    let reference: std::collections::BTreeMap<String, Tensor> = sfron::model::weights::load(&out)
        .unwrap()
        .0
        .into_iter()
        .collect();
    let decoded = sfron::data::dataset::decode(&std::fs::read(&png).unwrap()).unwrap();
    let mut checked = 0;
    for op in OPS {
        for bin in [2, 15] {
            let m = op.magnitude(31, bin, (224, 224));
            let theirs = strengths[format!("{}:{bin}", op.name())].as_f64().unwrap();
            assert!(
                (m - theirs).abs() <= 1e-9 * theirs.abs().max(1.0),
                "{op:?} bin {bin}: {m} vs {theirs}"
            );
            for sign in if op.signed() { vec![1, -1] } else { vec![1] } {
                let key = format!("{}:{bin}:{sign}", op.name());
                let want = Vec::<u8>::try_from(reference[&key].flatten(0, -1)).unwrap();
                let ours = apply_op(&decoded, op, sign as f64 * m).data;
                let differ = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
                let worst = ours
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                let share = differ as f64 / want.len() as f64;
                println!("{key}: {share:.2e} of the values differ, by at most {worst}");
                use sfron::data::rand_augment::Op;
                match op {
                    Op::ShearX | Op::ShearY | Op::TranslateX | Op::TranslateY | Op::Rotate => {
                        assert!(share <= 5e-3, "{key}: {share:.2e} of the values differ")
                    }
                    Op::Sharpness => {
                        assert!(worst <= 1 && share <= 1e-3, "{key}: {share:.2e}, {worst}")
                    }
                    _ => assert_eq!(
                        differ, 0,
                        "{key}: {differ} values differ, by at most {worst}"
                    ),
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * (14 + 9));
    std::fs::remove_dir_all(&dir).unwrap();
}
