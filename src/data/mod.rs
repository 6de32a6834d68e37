//! Data: formats, split manifests, the sharded sampler, transforms and the
//! parallel input pipeline.
//!
//! - [`dataset`]: MNIST IDX, CIFAR-10/100 binary, ImageFolder, WebDataset tar
//!   shards → one [`Dataset`] with labels, sample ids and a fingerprint.
//! - [`manifest`]: `sfron split` output; which samples are forgotten.
//! - [`sampler`]: each rank's indices per step, a pure function of
//!   (seed, stream, epoch, rank, world size), with a resumable [`Cursor`].
//! - [`transform`]: torchvision-equivalent per-sample transforms.
//! - [`loader`]: worker threads, bounded prefetch, in-order tensor batches.
//!
//! This module never calls MPI: ranks only differ by the `rank`/`world`
//! arguments of the sampler.

pub mod dataset;
pub mod latents;
pub mod loader;
pub mod manifest;
pub mod rand_augment;
pub mod sampler;
pub mod transform;

use std::path::{Path, PathBuf};

pub use dataset::{Dataset, Format, Image, Part};
pub use loader::{Batch, BatchStream, CorruptPolicy, Loader, LoaderOptions};
pub use manifest::{Manifest, Scenario};
pub use sampler::{Cursor, Sampler, Stream};
pub use transform::Transform;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "corrupt or unreadable image {sample}: {reason} (data.on_corrupt = \"skip\" skips such samples)"
    )]
    Corrupt { sample: String, reason: String },
    #[error("split scenario {spec:?}: {reason}")]
    Scenario { spec: String, reason: String },
    #[error("split manifest {manifest}: {reason}")]
    Mismatch { manifest: PathBuf, reason: String },
}

impl DataError {
    pub fn file(path: &Path, reason: impl Into<String>) -> Self {
        DataError::File {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The transform a format gets by default (`data.transform = "auto"`); a
/// latent dataset's comes from its index ([`latents::LatentIndex`]), read
/// when the configuration is planned.
pub fn default_transform(format: Format, train: bool) -> Transform {
    match format {
        Format::Latents => unreachable!("a latent dataset's transform comes from its index"),
        Format::Mnist => Transform::mnist(),
        Format::Cifar10 => Transform::cifar(train, false),
        Format::Cifar100 => Transform::cifar(train, true),
        Format::ImageFolder | Format::Tar => Transform::imagenet(train),
    }
}
