//! Datasets in their standard on-disk formats, opened into one indexable type.
//!
//! | format | layout under `root` | train / test |
//! |--------|---------------------|--------------|
//! | `mnist` | `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` | `train` / `t10k` |
//! | `cifar10` | `data_batch_{1..5}.bin`, `test_batch.bin` (or under `cifar-10-batches-bin/`) | batches / test batch |
//! | `cifar100` | `train.bin`, `test.bin` (or under `cifar-100-binary/`); fine labels | `train` / `test` |
//! | `imagefolder` | `{train,val}/<class>/**/*.{jpg,jpeg,png}`, classes sorted by name as torchvision; or TinyImageNet's released `val/images/*` with `val/val_annotations.txt` | `train` / `val` |
//! | `tar` | `{train,val}/*.tar` WebDataset shards: `<key>.{jpg,jpeg,png}` + `<key>.cls` | `train` / `val` |
//!
//! MNIST and CIFAR are decoded into memory at open time (they are small);
//! ImageFolder and tar samples are decoded on demand by the loader's workers.
//! Tar shards are indexed once by a sequential scan of their headers; samples
//! are then read by offset from a few large files, never from millions of
//! small ones.
//!
//! The fingerprint identifies the data a split manifest was made for:
//! SHA-256 of the format, the sample count, the class names, and then for
//! MNIST/CIFAR the files' content, for ImageFolder/tar the sorted relative
//! paths, sizes and labels of every sample (content hashing 1.28 M JPEGs would
//! take longer than training).

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::DataError;

/// Which on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Mnist,
    Cifar10,
    Cifar100,
    ImageFolder,
    Tar,
    /// A folder `sfron encode` wrote ([`super::latents`]).
    Latents,
}

impl Format {
    pub const NAMES: &'static [&'static str] = &[
        "mnist",
        "cifar10",
        "cifar100",
        "imagefolder",
        "tar",
        "latents",
    ];

    pub fn name(self) -> &'static str {
        Format::NAMES[self as usize]
    }

    /// The format of a name of [`Format::NAMES`].
    pub fn by_name(name: &str) -> Option<Self> {
        [
            Format::Mnist,
            Format::Cifar10,
            Format::Cifar100,
            Format::ImageFolder,
            Format::Tar,
            Format::Latents,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

/// The training or the test part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

/// A decoded image: `height × width × channels` bytes, row-major, channels last.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    pub data: Vec<u8>,
}

enum Store {
    /// Fixed-size images, `channels × height × width` each, channels last.
    Memory {
        pixels: Vec<u8>,
        width: usize,
        height: usize,
        channels: usize,
    },
    Files(Vec<PathBuf>),
    Tar {
        shards: Vec<PathBuf>,
        members: Vec<TarMember>,
    },
    /// VAE moments in `sfron encode`'s shards; `channels` = 4 L floats of
    /// `side × side` per sample.
    Latents {
        shards: Vec<PathBuf>,
        members: Vec<super::latents::Member>,
        channels: usize,
        side: usize,
    },
}

struct TarMember {
    shard: usize,
    offset: u64,
    len: u64,
}

/// A dataset part, opened and validated.
pub struct Dataset {
    pub format: Format,
    pub part: Part,
    pub root: PathBuf,
    pub classes: Vec<String>,
    /// Label of each sample, in `0..classes.len()`.
    pub labels: Vec<i64>,
    /// A stable name per sample: its index for MNIST/CIFAR, its relative path
    /// (ImageFolder) or key (tar) otherwise. `list:` split files may use either.
    pub ids: Vec<String>,
    pub fingerprint: String,
    store: Store,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("format", &self.format)
            .field("part", &self.part)
            .field("root", &self.root)
            .field("samples", &self.len())
            .field("classes", &self.classes.len())
            .finish()
    }
}

impl Dataset {
    pub fn open(format: Format, root: &Path, part: Part) -> Result<Self, DataError> {
        if !root.is_dir() {
            return Err(DataError::file(root, "is not a folder (data.root)"));
        }
        let mut ds = match format {
            Format::Mnist => open_mnist(root, part)?,
            Format::Cifar10 => open_cifar(root, part, false)?,
            Format::Cifar100 => open_cifar(root, part, true)?,
            Format::ImageFolder => open_image_folder(root, part)?,
            Format::Tar => open_tar(root, part)?,
            Format::Latents => open_latents(root, part)?,
        };
        if ds.labels.is_empty() {
            return Err(DataError::file(
                root,
                format!("holds no {} samples for the {part:?} part", format.name()),
            ));
        }
        ds.root = root.to_path_buf();
        Ok(ds)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Keeps only the first `n` samples (`data.train_limit`); the
    /// fingerprint says so.
    pub fn limit(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        self.labels.truncate(n);
        self.ids.truncate(n);
        match &mut self.store {
            Store::Memory {
                pixels,
                width,
                height,
                channels,
            } => pixels.truncate(n * *width * *height * *channels),
            Store::Files(files) => files.truncate(n),
            Store::Tar { members, .. } => members.truncate(n),
            Store::Latents { members, .. } => members.truncate(n),
        }
        self.fingerprint = format!("{}+first{n}", self.fingerprint);
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Where sample `i` lives, for error messages.
    pub fn describe(&self, i: usize) -> String {
        match &self.store {
            Store::Memory { .. } => {
                format!("sample {i} of {} ({:?})", self.root.display(), self.part)
            }
            Store::Files(paths) => paths[i].display().to_string(),
            Store::Tar { shards, members } => {
                format!(
                    "{} (key {}) in {}",
                    i,
                    self.ids[i],
                    shards[members[i].shard].display()
                )
            }
            Store::Latents {
                shards, members, ..
            } => format!(
                "{} ({}) in {}",
                i,
                self.ids[i],
                shards[members[i].shard].display()
            ),
        }
    }

    /// Decodes sample `i`.
    pub fn load(&self, i: usize) -> Result<Image, DataError> {
        match &self.store {
            Store::Memory {
                pixels,
                width,
                height,
                channels,
            } => {
                let n = width * height * channels;
                Ok(Image {
                    width: *width,
                    height: *height,
                    channels: *channels,
                    data: pixels[i * n..(i + 1) * n].to_vec(),
                })
            }
            Store::Files(paths) => self.decode_bytes(i, std::fs::read(&paths[i])),
            Store::Tar { shards, members } => {
                let m = &members[i];
                let mut bytes = vec![0u8; m.len as usize];
                let read = File::open(&shards[m.shard])
                    .and_then(|f| f.read_exact_at(&mut bytes, m.offset));
                self.decode_bytes(i, read.map(|()| bytes))
            }
            Store::Latents {
                shards,
                members,
                channels,
                side,
            } => {
                let floats = channels * side * side;
                let data =
                    super::latents::read_member(shards, &members[i], floats).map_err(|e| {
                        DataError::Corrupt {
                            sample: self.describe(i),
                            reason: e.to_string(),
                        }
                    })?;
                Ok(Image {
                    width: *side,
                    height: *side,
                    channels: *channels,
                    data,
                })
            }
        }
    }
}

/// A latent dataset ([`super::latents`]): `root/train` or `root/test`.
fn open_latents(root: &Path, part: Part) -> Result<Dataset, DataError> {
    let super::latents::Opened {
        index,
        shards,
        members,
        labels,
        ids,
    } = super::latents::open(&root.join(super::latents::part_dir(part)))?;
    Ok(Dataset {
        format: Format::Latents,
        part,
        root: root.to_path_buf(),
        classes: index.classes.clone(),
        labels,
        ids,
        fingerprint: index.fingerprint(),
        store: Store::Latents {
            shards,
            members,
            channels: 4 * index.latent_channels,
            side: index.latent_side,
        },
    })
}

impl Dataset {
    /// Decodes the encoded bytes of sample `i`; read and decode failures name the sample.
    fn decode_bytes(&self, i: usize, bytes: std::io::Result<Vec<u8>>) -> Result<Image, DataError> {
        let corrupt = |reason: String| DataError::Corrupt {
            sample: self.describe(i),
            reason,
        };
        decode(&bytes.map_err(|e| corrupt(e.to_string()))?).map_err(corrupt)
    }
}

/// Decodes JPEG or PNG bytes to 8-bit RGB (grey replicated, alpha and
/// 16-bit dropped, as PIL's `convert("RGB")`). JPEGs go straight to zune-jpeg
/// (the decoder the image crate wraps, minus a conversion layer: about 15%
/// faster); other formats through the image crate.
pub fn decode(bytes: &[u8]) -> Result<Image, String> {
    if bytes.starts_with(&[0xff, 0xd8]) {
        return decode_jpeg(bytes);
    }
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let rgb = img.into_rgb8();
    Ok(Image {
        width,
        height,
        channels: 3,
        data: rgb.into_raw(),
    })
}

fn decode_jpeg(bytes: &[u8]) -> Result<Image, String> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let data = decoder.decode().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions().ok_or("JPEG without dimensions")?;
    if data.len() != width * height * 3 {
        return Err(format!(
            "JPEG decoded to {} bytes for {width}x{height} RGB",
            data.len()
        ));
    }
    Ok(Image {
        width,
        height,
        channels: 3,
        data,
    })
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let file = File::open(path).map_err(|e| DataError::file(path, e.to_string()))?;
    let mut bytes = Vec::new();
    let result = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(BufReader::new(file)).read_to_end(&mut bytes)
    } else {
        BufReader::new(file).read_to_end(&mut bytes)
    };
    result.map_err(|e| DataError::file(path, format!("cannot be read: {e}")))?;
    Ok(bytes)
}

/// `root/name.gz` if present, else `root/name`.
fn find_maybe_gz(root: &Path, name: &str) -> Result<PathBuf, DataError> {
    let gz = root.join(format!("{name}.gz"));
    let plain = root.join(name);
    if gz.is_file() {
        Ok(gz)
    } else if plain.is_file() {
        Ok(plain)
    } else {
        Err(DataError::file(&plain, "not found (nor with .gz)"))
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn open_mnist(root: &Path, part: Part) -> Result<Dataset, DataError> {
    let prefix = if part == Part::Train { "train" } else { "t10k" };
    let images_path = find_maybe_gz(root, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_maybe_gz(root, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_maybe_gz(&images_path)?;
    let labels = read_maybe_gz(&labels_path)?;
    if images.len() < 16 || be_u32(&images, 0) != 0x803 {
        return Err(DataError::file(
            &images_path,
            "is not an IDX image file (magic 0x00000803)",
        ));
    }
    if labels.len() < 8 || be_u32(&labels, 0) != 0x801 {
        return Err(DataError::file(
            &labels_path,
            "is not an IDX label file (magic 0x00000801)",
        ));
    }
    let (n, h, w) = (
        be_u32(&images, 4) as usize,
        be_u32(&images, 8) as usize,
        be_u32(&images, 12) as usize,
    );
    if images.len() != 16 + n * h * w {
        return Err(DataError::file(
            &images_path,
            format!(
                "header says {n} images of {h}x{w} ({} bytes) but holds {} bytes",
                16 + n * h * w,
                images.len()
            ),
        ));
    }
    let n_labels = be_u32(&labels, 4) as usize;
    if n_labels != n || labels.len() != 8 + n {
        return Err(DataError::file(
            &labels_path,
            format!("holds {n_labels} labels for {n} images"),
        ));
    }
    let label_bytes = &labels[8..];
    if let Some(i) = label_bytes.iter().position(|&l| l > 9) {
        return Err(DataError::file(
            &labels_path,
            format!("label {} of sample {i} is not a digit", label_bytes[i]),
        ));
    }
    let mut hasher = Sha256::new();
    hasher.update(&images);
    hasher.update(&labels);
    let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    Ok(Dataset {
        format: Format::Mnist,
        part,
        root: root.into(),
        labels: label_bytes.iter().map(|&l| l as i64).collect(),
        ids: (0..n).map(|i| i.to_string()).collect(),
        fingerprint: finish_fingerprint(Format::Mnist, n, &classes, hasher),
        classes,
        store: Store::Memory {
            pixels: images[16..].to_vec(),
            width: w,
            height: h,
            channels: 1,
        },
    })
}

fn open_cifar(root: &Path, part: Part, hundred: bool) -> Result<Dataset, DataError> {
    let (sub, names, files, label_bytes, n_classes, format): (_, _, Vec<String>, usize, usize, _) =
        if hundred {
            let files = vec![
                if part == Part::Train {
                    "train.bin"
                } else {
                    "test.bin"
                }
                .to_string(),
            ];
            (
                "cifar-100-binary",
                "fine_label_names.txt",
                files,
                2,
                100,
                Format::Cifar100,
            )
        } else {
            let files = if part == Part::Train {
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
            } else {
                vec!["test_batch.bin".to_string()]
            };
            (
                "cifar-10-batches-bin",
                "batches.meta.txt",
                files,
                1,
                10,
                Format::Cifar10,
            )
        };
    let dir = if root.join(sub).is_dir() {
        root.join(sub)
    } else {
        root.to_path_buf()
    };
    let record = label_bytes + 3072;
    let mut hasher = Sha256::new();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in &files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| DataError::file(&path, e.to_string()))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::file(
                &path,
                format!(
                    "{} bytes is not a whole number of {record}-byte records",
                    bytes.len()
                ),
            ));
        }
        hasher.update(&bytes);
        for (k, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[label_bytes - 1] as usize;
            if label >= n_classes {
                return Err(DataError::file(
                    &path,
                    format!("record {k} has label {label}, expected < {n_classes}"),
                ));
            }
            labels.push(label as i64);
            // CHW planes (R, G, B of 1024 each) → HWC.
            let planes = &rec[label_bytes..];
            for p in 0..1024 {
                pixels.extend_from_slice(&[planes[p], planes[1024 + p], planes[2048 + p]]);
            }
        }
    }
    let classes = match std::fs::read_to_string(dir.join(names)) {
        Ok(text) => {
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() == n_classes {
                names
            } else {
                (0..n_classes).map(|c| c.to_string()).collect()
            }
        }
        Err(_) => (0..n_classes).map(|c| c.to_string()).collect(),
    };
    let n = labels.len();
    Ok(Dataset {
        format,
        part,
        root: root.into(),
        ids: (0..n).map(|i| i.to_string()).collect(),
        fingerprint: finish_fingerprint(format, n, &classes, hasher),
        classes,
        labels,
        store: Store::Memory {
            pixels,
            width: 32,
            height: 32,
            channels: 3,
        },
    })
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png")
}

fn part_dir(root: &Path, part: Part) -> Result<PathBuf, DataError> {
    let candidates: &[&str] = if part == Part::Train {
        &["train"]
    } else {
        &["val", "test"]
    };
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            DataError::file(
                &root.join(candidates[0]),
                "not found (expected train/ and val/ under data.root)",
            )
        })
}

fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, DataError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| DataError::file(dir, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| DataError::file(dir, e.to_string()))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// Image files under `dir`, recursively, in torchvision's order: folders
/// sorted by their full path (`sorted(os.walk(...))`), files sorted by name
/// within each folder.
fn walk_images(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<(), DataError> {
    let mut folders = vec![dir.to_path_buf()];
    let mut k = 0;
    while k < folders.len() {
        for e in sorted_entries(&folders[k].clone())? {
            if e.path().is_dir() {
                folders.push(e.path());
            }
        }
        k += 1;
    }
    folders.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    for folder in folders {
        for e in sorted_entries(&folder)? {
            let path = e.path();
            let meta =
                std::fs::metadata(&path).map_err(|err| DataError::file(&path, err.to_string()))?;
            if meta.is_file() && is_image_name(&e.file_name().to_string_lossy()) {
                out.push((path, meta.len()));
            }
        }
    }
    Ok(())
}

/// TinyImageNet's released validation labels: one line per image,
/// `<file>\t<wnid>\t<box>`, the images flat under `val/images/`.
const TINY_ANNOTATIONS: &str = "val_annotations.txt";

/// Whether `dir` (a validation folder) has TinyImageNet's released layout:
/// an `images/` folder of images rather than class folders, or the
/// annotations file.
fn is_tiny_val(dir: &Path) -> Result<bool, DataError> {
    if dir.join(TINY_ANNOTATIONS).is_file() {
        return Ok(true);
    }
    let images = dir.join("images");
    if !images.is_dir() {
        return Ok(false);
    }
    Ok(sorted_entries(&images)?
        .iter()
        .any(|e| is_image_name(&e.file_name().to_string_lossy()) && e.path().is_file()))
}

/// TinyImageNet's validation folder as released (`val/images/*.JPEG`,
/// labels in `val/val_annotations.txt`); the classes are the training
/// folder's (sorted wnids, as ImageFolder orders them).
fn open_tiny_val(root: &Path, dir: &Path) -> Result<Dataset, DataError> {
    let annotations = dir.join(TINY_ANNOTATIONS);
    if !annotations.is_file() {
        return Err(DataError::file(
            &annotations,
            "not found: val/images holds TinyImageNet's validation images without class \
             folders, and their labels are in this file (tiny-imagenet-200.zip has it)",
        ));
    }
    let train = part_dir(root, Part::Train)?;
    let classes: Vec<String> = sorted_entries(&train)?
        .iter()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let text = std::fs::read_to_string(&annotations)
        .map_err(|e| DataError::file(&annotations, e.to_string()))?;
    let mut rows = Vec::new();
    for (k, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut fields = line.split('\t');
        let (Some(file), Some(wnid)) = (fields.next(), fields.next()) else {
            return Err(DataError::file(
                &annotations,
                format!("line {}: expected <file>\\t<wnid>, got {line:?}", k + 1),
            ));
        };
        let label = classes
            .binary_search_by(|c| c.as_str().cmp(wnid))
            .map_err(|_| {
                DataError::file(
                    &annotations,
                    format!(
                        "line {}: class {wnid:?} has no folder under {}",
                        k + 1,
                        train.display()
                    ),
                )
            })?;
        rows.push((file.to_string(), label as i64));
    }
    rows.sort();
    let mut files = Vec::with_capacity(rows.len());
    for (file, label) in rows {
        let path = dir.join("images").join(&file);
        let size = std::fs::metadata(&path)
            .map_err(|e| DataError::file(&path, format!("{e} (listed in {TINY_ANNOTATIONS})")))?
            .len();
        files.push((format!("images/{file}"), path, size, label));
    }
    Ok(files_dataset(root, Part::Test, classes, files))
}

/// An ImageFolder-format dataset of `files` (id, path, size, label), its
/// fingerprint over the ids, sizes and labels in order.
fn files_dataset(
    root: &Path,
    part: Part,
    classes: Vec<String>,
    files: Vec<(String, PathBuf, u64, i64)>,
) -> Dataset {
    let mut hasher = Sha256::new();
    let (mut ids, mut paths, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (id, path, size, label) in files {
        hasher.update(format!("{id}\0{size}\0{label}\n").as_bytes());
        ids.push(id);
        paths.push(path);
        labels.push(label);
    }
    Dataset {
        format: Format::ImageFolder,
        part,
        root: root.into(),
        fingerprint: finish_fingerprint(Format::ImageFolder, labels.len(), &classes, hasher),
        classes,
        labels,
        ids,
        store: Store::Files(paths),
    }
}

fn open_image_folder(root: &Path, part: Part) -> Result<Dataset, DataError> {
    let dir = part_dir(root, part)?;
    if part == Part::Test && is_tiny_val(&dir)? {
        return open_tiny_val(root, &dir);
    }
    let mut classes = Vec::new();
    let mut rows = Vec::new();
    for entry in sorted_entries(&dir)? {
        if !entry.path().is_dir() {
            continue;
        }
        let label = classes.len() as i64;
        classes.push(entry.file_name().to_string_lossy().into_owned());
        let mut files = Vec::new();
        walk_images(&entry.path(), &mut files)?;
        for (path, size) in files {
            let id = path
                .strip_prefix(&dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            rows.push((id, path, size, label));
        }
    }
    if classes.is_empty() {
        return Err(DataError::file(&dir, "has no class folders"));
    }
    Ok(files_dataset(root, part, classes, rows))
}

fn open_tar(root: &Path, part: Part) -> Result<Dataset, DataError> {
    let dir = part_dir(root, part)?;
    let shards: Vec<PathBuf> = sorted_entries(&dir)?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    if shards.is_empty() {
        return Err(DataError::file(&dir, "holds no .tar shards"));
    }
    let mut members = Vec::new();
    let mut labels = Vec::new();
    let mut ids = Vec::new();
    let mut hasher = Sha256::new();
    for (shard_index, shard) in shards.iter().enumerate() {
        // key → (image member, label), in order of first appearance.
        let mut pending: Vec<(String, Option<TarMember>, Option<i64>)> = Vec::new();
        let mut slots: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let file = File::open(shard).map_err(|e| DataError::file(shard, e.to_string()))?;
        let mut archive = tar::Archive::new(file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| DataError::file(shard, e.to_string()))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| DataError::file(shard, format!("corrupt tar: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| DataError::file(shard, e.to_string()))?
                .to_string_lossy()
                .into_owned();
            let base_start = name.rfind('/').map_or(0, |i| i + 1);
            let Some(dot) = name[base_start..].find('.').map(|d| base_start + d) else {
                continue;
            };
            let (key, ext) = (
                name[..dot].to_string(),
                name[dot + 1..].to_ascii_lowercase(),
            );
            let slot = *slots.entry(key.clone()).or_insert_with(|| {
                pending.push((key, None, None));
                pending.len() - 1
            });
            if ext == "cls" {
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| DataError::file(shard, format!("{name}: {e}")))?;
                let label = text.trim().parse::<i64>().map_err(|_| {
                    DataError::file(
                        shard,
                        format!(
                            "{name}: label {:?} is not a non-negative integer",
                            text.trim()
                        ),
                    )
                })?;
                if label < 0 {
                    return Err(DataError::file(
                        shard,
                        format!("{name}: negative label {label}"),
                    ));
                }
                pending[slot].2 = Some(label);
            } else if matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
                let member = TarMember {
                    shard: shard_index,
                    offset: entry.raw_file_position(),
                    len: entry.size(),
                };
                pending[slot].1 = Some(member);
            }
        }
        for (key, member, label) in pending {
            match (member, label) {
                (Some(m), Some(l)) => {
                    hasher.update(format!("{shard_index}\0{key}\0{}\0{l}\n", m.len).as_bytes());
                    members.push(m);
                    labels.push(l);
                    ids.push(key);
                }
                (Some(_), None) => {
                    return Err(DataError::file(
                        shard,
                        format!("sample {key} has an image but no .cls label"),
                    ));
                }
                _ => {}
            }
        }
    }
    let n_classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let classes: Vec<String> = (0..n_classes).map(|c| c.to_string()).collect();
    let n = labels.len();
    Ok(Dataset {
        format: Format::Tar,
        part,
        root: root.into(),
        fingerprint: finish_fingerprint(Format::Tar, n, &classes, hasher),
        classes,
        labels,
        ids,
        store: Store::Tar { shards, members },
    })
}

fn finish_fingerprint(format: Format, n: usize, classes: &[String], mut hasher: Sha256) -> String {
    hasher.update(format!("{}\0{n}\0{}", format.name(), classes.join("\0")).as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
