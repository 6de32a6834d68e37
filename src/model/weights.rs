//! Weights in and out as safetensors, PyTorch's names, no renaming.
//!
//! Loading compares the file with the model: every missing name, unexpected
//! name and shape mismatch is listed in one error (`num_batches_tracked`,
//! which libtorch's BatchNorm does not keep, is ignored). Saving writes the
//! tensors with metadata through [`crate::fsx::write_atomic`]; the metadata
//! carries `sfron.sha256`, a digest of every tensor's name, dtype, shape and
//! bytes, which loading verifies: safetensors' own header catches truncation,
//! the digest catches flipped bytes. Files from PyTorch have no digest and are
//! accepted on their structure alone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor, nn};

pub const DIGEST_KEY: &str = "sfron.sha256";

/// Named tensors sorted by name, and the file's metadata.
pub type Loaded = (Vec<(String, Tensor)>, HashMap<String, String>);

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path} does not fit the model: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

fn file_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::File {
        path: path.into(),
        reason: reason.into(),
    }
}

/// A CPU copy of a tensor as safetensors bytes.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn to_host(name: &str, t: &Tensor) -> Result<HostTensor, String> {
    let dtype =
        dtype_of(t.kind()).ok_or_else(|| format!("{name}: kind {:?} cannot be saved", t.kind()))?;
    let host = t.detach().to_device(tch::Device::Cpu).contiguous();
    let len = host.numel() * host.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; len];
    host.copy_data_u8(&mut bytes, host.numel());
    Ok(HostTensor {
        dtype,
        shape: host.size().iter().map(|&s| s as usize).collect(),
        bytes,
    })
}

/// The digest of `(name, dtype, shape, bytes)` in name order.
fn digest<'a>(items: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>) -> String {
    let mut sorted: Vec<_> = items.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, dtype, shape, bytes) in sorted {
        h.update(format!("{name}\0{dtype:?}\0{shape:?}\0{}\0", bytes.len()).as_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises `tensors` with `metadata` (plus the digest) to safetensors bytes.
pub fn to_bytes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(n, t)| to_host(n, t).map(|h| (n.clone(), h)))
        .collect::<Result<_, _>>()?;
    let mut meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(
        DIGEST_KEY.into(),
        digest(
            host.iter()
                .map(|(n, h)| (n.as_str(), h.dtype, &h.shape[..], &h.bytes[..])),
        ),
    );
    safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), Some(meta))
        .map_err(|e| e.to_string())
}

/// Writes `tensors` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), WeightsError> {
    let bytes = to_bytes(tensors, metadata).map_err(|e| file_err(path, e))?;
    crate::fsx::write_atomic(path, &bytes).map_err(|e| file_err(path, e.to_string()))
}

/// The shape of the tensor named `name` among `tensors`.
pub fn shape_of(tensors: &[(String, Tensor)], name: &str) -> Option<Vec<i64>> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.size())
}

/// Reads every tensor and the metadata of a safetensors file, verifying the
/// digest when there is one.
pub fn load(path: &Path) -> Result<Loaded, WeightsError> {
    parse(&read(path)?, path)
}

/// The bytes of the weights file at `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, WeightsError> {
    std::fs::read(path).map_err(|e| file_err(path, e.to_string()))
}

/// [`from_bytes`] of a file's bytes, errors naming `path`.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Loaded, WeightsError> {
    from_bytes(bytes).map_err(|e| file_err(path, e))
}

/// The identity of a weights file's content: the digest of every tensor's
/// name, dtype, shape and bytes. Unlike a hash of the file, it does not
/// change when the same weights are saved again (safetensors writes the
/// metadata in no fixed order) or carry other metadata.
pub fn content_digest(bytes: &[u8]) -> Result<String, String> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a complete safetensors file ({e})"))?;
    Ok(digest(st.tensors().iter().map(|(n, v)| {
        (n.as_str(), v.dtype(), v.shape(), v.data())
    })))
}

/// `sha256:` and the [`content_digest`] of a weights file's bytes, errors naming `path`.
pub fn identify(bytes: &[u8], path: &Path) -> Result<String, WeightsError> {
    content_digest(bytes)
        .map(|d| format!("sha256:{d}"))
        .map_err(|e| file_err(path, e))
}

pub fn from_bytes(bytes: &[u8]) -> Result<Loaded, String> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a complete safetensors file ({e})"))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let views = st.tensors();
    if let Some(expected) = metadata.get(DIGEST_KEY) {
        let actual = digest(
            views
                .iter()
                .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
        );
        if &actual != expected {
            return Err(format!(
                "checksum mismatch (stored {expected}, computed {actual}): the file is corrupted"
            ));
        }
    }
    let mut tensors = Vec::with_capacity(views.len());
    for (name, view) in views {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| format!("{name}: dtype {:?} is not supported", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        tensors.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, metadata))
}

/// Copies the file's tensors into the variables of `vs`, by name. Lists every
/// missing, unexpected and mis-shaped name in one error; copies nothing then.
pub fn load_into(vs: &nn::VarStore, path: &Path) -> Result<HashMap<String, String>, WeightsError> {
    let (tensors, metadata) = load(path)?;
    copy_into(vs, &tensors, path)?;
    Ok(metadata)
}

/// Copies `tensors` (read from `path`) into the variables of `vs`; see [`load_into`].
pub fn copy_into(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    path: &Path,
) -> Result<(), WeightsError> {
    copy_into_except(vs, tensors, path, &|_| false)
}

/// [`copy_into`] leaving out the variables and the file's tensors whose
/// names `skip` picks (the variables keep their values).
pub fn copy_into_except(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    path: &Path,
    skip: &dyn Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let mut vars = vs.variables();
    vars.retain(|n, _| !skip(n));
    let mut problems = Vec::new();
    let file: HashMap<&str, &Tensor> = tensors
        .iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked") && !skip(n))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let mut missing: Vec<&str> = vars
        .keys()
        .map(String::as_str)
        .filter(|n| !file.contains_key(n))
        .collect();
    let mut unexpected: Vec<&str> = file
        .keys()
        .copied()
        .filter(|n| !vars.contains_key(*n))
        .collect();
    missing.sort();
    unexpected.sort();
    if !missing.is_empty() {
        problems.push(format!("missing {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected {}", unexpected.join(", ")));
    }
    let mut shapes: Vec<String> = vars
        .iter()
        .filter_map(|(n, v)| {
            file.get(n.as_str())
                .filter(|t| t.size() != v.size())
                .map(|t| format!("{n}: file {:?}, model {:?}", t.size(), v.size()))
        })
        .collect();
    shapes.sort();
    if !shapes.is_empty() {
        problems.push(format!("wrong shapes {}", shapes.join("; ")));
    }
    if !problems.is_empty() {
        return Err(WeightsError::Mismatch {
            path: path.into(),
            reason: problems.join("; "),
        });
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let src = file[name.as_str()];
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(())
}
