//! Latent datasets: what `sfron encode` writes (a dataset's images through
//! a VAE's encoder, once) and `data.format = "latents"` reads, so that a
//! latent diffusion model (DiT) trains, unlearns and computes its Fisher
//! without running the VAE.
//!
//! A latent dataset is a folder with `train/` and `test/`, the source's
//! two parts, each holding:
//! - `shard-NNNNN.safetensors`, samples `[k·S, (k+1)·S)` of the source
//!   dataset: `moments` float32 `[n, 4 L h w]`, each row `[2, 2L, h, w]` (the posterior's mean and
//!   log-variance, [`crate::model::vae::SdVae::encode_moments`], of the
//!   image and of its horizontal mirror: the released training's
//!   `RandomHorizontalFlip` happens before the encoder, so both are kept),
//!   `labels` int64 `[n]`, and in its metadata the sample ids and the key
//!   of what it was made from ([`LatentIndex::key`]);
//! - `index.json` ([`LatentIndex`]), written last: the folder is complete
//!   when it exists.
//!
//! Reading a sample reads its `2 · 2L · h · w` floats at their offset in
//! its shard; [`super::transform::Recipe::Latent`] then draws the mirror
//! and the posterior sample, keyed like every augmentation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DataError;

/// The index file of a latent dataset.
pub const INDEX_FILE: &str = "index.json";

/// The tag of [`LatentIndex::format`].
pub const FORMAT_TAG: &str = "sfron-latents-1";

/// The folder of a part.
pub fn part_dir(part: super::Part) -> &'static str {
    match part {
        super::Part::Train => "train",
        super::Part::Test => "test",
    }
}

/// The file of shard `k`.
pub fn shard_file(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

/// What a latent dataset holds and was made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatentIndex {
    /// [`FORMAT_TAG`].
    pub format: String,
    /// The source dataset: its format, folder, part and fingerprint.
    pub source_format: String,
    pub source_root: String,
    pub source_part: String,
    pub source_fingerprint: String,
    pub classes: Vec<String>,
    pub samples: usize,
    /// Samples per shard (the last may hold fewer).
    pub shard_size: usize,
    /// Side of the square crop the images were encoded at.
    pub image_size: usize,
    /// Latent channels `L` and side `h = w`.
    pub latent_channels: usize,
    pub latent_side: usize,
    /// The denoiser's latents are `z · scaling_factor`.
    pub scaling_factor: f64,
    /// The VAE weights file and the digest of its bytes.
    pub vae_file: String,
    pub vae_digest: String,
    /// The VAE's shape (`VaeSpec`, serialised).
    pub vae_spec: serde_json::Value,
}

impl LatentIndex {
    /// What a shard must have been made from to belong to this dataset:
    /// the source, the crop, the VAE and the sharding.
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.source_fingerprint,
            self.image_size,
            self.vae_digest,
            self.shard_size,
            self.samples
        )
    }

    pub fn shards(&self) -> usize {
        self.samples.div_ceil(self.shard_size.max(1))
    }

    /// Samples in shard `k` (the last may hold fewer).
    pub fn shard_len(&self, k: usize) -> usize {
        self.shard_size.min(self.samples - k * self.shard_size)
    }

    /// Floats per sample: both mirrors' mean and log-variance.
    pub fn floats_per_sample(&self) -> usize {
        2 * 2 * self.latent_channels * self.latent_side * self.latent_side
    }

    /// The fingerprint of the latent dataset itself.
    pub fn fingerprint(&self) -> String {
        format!(
            "latents({}; crop {}; vae {})",
            self.source_fingerprint, self.image_size, self.vae_digest
        )
    }
}

/// Reads `root/index.json`; errors name the file.
pub fn read_index(root: &Path) -> Result<LatentIndex, DataError> {
    let path = root.join(INDEX_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        DataError::file(
            &path,
            format!("cannot be read ({e}): not a latent dataset; make one with `sfron encode`"),
        )
    })?;
    let index: LatentIndex = serde_json::from_str(&text)
        .map_err(|e| DataError::file(&path, format!("is not a latent index: {e}")))?;
    if index.format != FORMAT_TAG {
        return Err(DataError::file(
            &path,
            format!("format {:?}, expected {FORMAT_TAG:?}", index.format),
        ));
    }
    Ok(index)
}

/// A shard's `moments` and `labels`, located in its file.
#[derive(Debug)]
pub struct ShardLayout {
    /// Byte offset of the first sample's moments.
    pub moments_offset: u64,
    pub labels: Vec<i64>,
    pub ids: Vec<String>,
    /// The shard's metadata key ([`LatentIndex::key`]).
    pub key: String,
}

/// Reads shard `path`'s header and labels (not its moments) and checks it
/// holds `n` samples of `floats` floats each.
pub fn read_shard(path: &Path, n: usize, floats: usize) -> Result<ShardLayout, DataError> {
    let bad = |why: String| DataError::file(path, why);
    let file = File::open(path).map_err(|e| bad(format!("cannot be opened: {e}")))?;
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| bad(format!("is not a safetensors file: {e}")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 1 << 30 {
        return Err(bad("is not a safetensors file (header length)".into()));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("is not a safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let entry = |name: &str, dtype: &str, shape: &[usize]| -> Result<(u64, u64), DataError> {
        let t = &header[name];
        let found: Option<Vec<usize>> = t["shape"].as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|v| v as usize))
                .collect()
        });
        if t["dtype"] != dtype || found.as_deref() != Some(shape) {
            return Err(bad(format!(
                "{name} is {} {:?}, expected {dtype} {shape:?}",
                t["dtype"], found
            )));
        }
        let offsets = &t["data_offsets"];
        let (a, b) = (offsets[0].as_u64(), offsets[1].as_u64());
        match (a, b) {
            (Some(a), Some(b)) => Ok((data_start + a, data_start + b)),
            _ => Err(bad(format!("{name} has no data offsets"))),
        }
    };
    // Stored flat: [n, floats], each row [2, 2L, h, w] row-major.
    let (moments_offset, moments_end) = entry("moments", "F32", &[n, floats])?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if moments_end > size {
        return Err(bad(format!(
            "is truncated ({size} bytes, moments end at {moments_end})"
        )));
    }
    let (lo, hi) = entry("labels", "I64", &[n])?;
    let mut bytes = vec![0u8; (hi - lo) as usize];
    file.read_exact_at(&mut bytes, lo)
        .map_err(|e| bad(format!("truncated labels: {e}")))?;
    let labels = bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let meta = &header["__metadata__"];
    let ids: Vec<String> = meta["ids"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("has no sample ids in its metadata".into()))?;
    if ids.len() != n {
        return Err(bad(format!(
            "names {} sample ids for {n} samples",
            ids.len()
        )));
    }
    Ok(ShardLayout {
        moments_offset,
        labels,
        ids,
        key: meta["key"].as_str().unwrap_or_default().to_string(),
    })
}

/// Where sample `i` of a latent dataset lives.
#[derive(Clone, Debug)]
pub struct Member {
    pub shard: usize,
    pub offset: u64,
}

/// A latent part, opened: its index, shard files, where each sample
/// lives, and the samples' labels and ids.
pub struct Opened {
    pub index: LatentIndex,
    pub shards: Vec<PathBuf>,
    pub members: Vec<Member>,
    pub labels: Vec<i64>,
    pub ids: Vec<String>,
}

/// The shards and members of the latent dataset at `root`, with its
/// labels and ids, checked against its index.
pub fn open(root: &Path) -> Result<Opened, DataError> {
    let index = read_index(root)?;
    let floats = index.floats_per_sample();
    let key = index.key();
    let mut shards = Vec::with_capacity(index.shards());
    let mut members = Vec::with_capacity(index.samples);
    let mut labels = Vec::with_capacity(index.samples);
    let mut ids = Vec::with_capacity(index.samples);
    for k in 0..index.shards() {
        let path = root.join(shard_file(k));
        let n = index.shard_len(k);
        let layout = read_shard(&path, n, floats)?;
        if layout.key != key {
            return Err(DataError::file(
                &path,
                format!(
                    "was made from other data, crop, VAE or sharding than {} says: run `sfron \
                     encode` again",
                    root.join(INDEX_FILE).display()
                ),
            ));
        }
        for j in 0..n {
            members.push(Member {
                shard: k,
                offset: layout.moments_offset + (j * floats * 4) as u64,
            });
        }
        if let Some(&c) = layout
            .labels
            .iter()
            .find(|&&c| c < 0 || c as usize >= index.classes.len())
        {
            return Err(DataError::file(
                &path,
                format!(
                    "holds label {c}, outside the {} classes",
                    index.classes.len()
                ),
            ));
        }
        labels.extend(layout.labels);
        ids.extend(layout.ids);
        shards.push(path);
    }
    Ok(Opened {
        index,
        shards,
        members,
        labels,
        ids,
    })
}

/// The moments of one sample as float32 little-endian bytes.
pub fn read_member(shards: &[PathBuf], m: &Member, floats: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; floats * 4];
    File::open(&shards[m.shard])?.read_exact_at(&mut bytes, m.offset)?;
    Ok(bytes)
}
