//! `sfron convert`: the SFR-on authors' released checkpoints to sfron's
//! safetensors.
//!
//! The released classification code saves `torch.save(model.state_dict())`
//! of its own CIFAR ResNets (`Classification/models/resnet.py`), whose
//! names differ from torchvision's (and sfron's) in two places: a block's
//! projection is `shortcut.0` / `shortcut.1` where torchvision has
//! `downsample.0` / `downsample.1`, and the classifier is `linear` where
//! torchvision has `fc`. Other codebases of the lineage save a dict with the
//! state_dict under `state_dict` (`.pth.tar`), often with a `module.` prefix
//! from `DataParallel`. The file is read by [`super::torch_pickle`]: no
//! Python, and only tensors are taken.

use std::path::Path;

use tch::Tensor;

use super::{Arch, Model, WeightsError, torch_pickle};

/// The tensors of a checkpoint written by Python's `torch.save` (a
/// state_dict, or a dict with one under `state_dict` or `model`).
pub fn read_torch(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let file_err = |reason: String| WeightsError::File {
        path: path.into(),
        reason,
    };
    if !path.is_file() {
        return Err(file_err("no such file".into()));
    }
    let tensors = torch_pickle::read(path).map_err(|why| {
        file_err(format!(
            "not a PyTorch checkpoint ({why}); expected the file of \
             torch.save(model.state_dict()), or of a dict holding it under \"state_dict\""
        ))
    })?;
    if tensors.is_empty() {
        return Err(file_err(
            "a PyTorch file without tensors: expected a state_dict".into(),
        ));
    }
    Ok(tensors)
}

/// sfron's (torchvision's) name of a tensor of the released ResNets: without
/// a `module.` prefix, `shortcut` → `downsample`, `linear` → `fc`.
pub fn released_name(name: &str) -> String {
    let name = name.strip_prefix("module.").unwrap_or(name);
    let name = name.replace(".shortcut.", ".downsample.");
    match name.strip_prefix("linear.") {
        Some(rest) => format!("fc.{rest}"),
        None => name,
    }
}

/// Reads a released checkpoint of `arch` and returns the model it holds
/// (input channels and classes read from its first conv and classifier).
/// Every sfron tensor must be in it and nothing else (but
/// `num_batches_tracked`), with the right shapes. A DDPM checkpoint
/// (`ckpt.pth`: `[model, optimizer, step, ema]` of a `DataParallel` UNet)
/// gives its model's weights, or with `ema` its EMA's.
pub fn released(path: &Path, arch: Arch, ema: bool) -> Result<Model, WeightsError> {
    match arch {
        Arch::Unet(_) => return released_unet(path, arch, ema),
        Arch::Dit(_) => return released_dit(path, arch, ema),
        _ => {}
    }
    if ema {
        return Err(WeightsError::Mismatch {
            path: path.into(),
            reason: format!(
                "--ema takes a diffusion checkpoint; {} has no EMA",
                arch.name()
            ),
        });
    }
    let tensors: Vec<(String, Tensor)> = read_torch(path)?
        .into_iter()
        .map(|(n, t)| (released_name(&n), t))
        .collect();
    let what = format!("(after renaming): not a released {}", arch.name());
    build(
        path,
        arch,
        &tensors,
        ("conv1.weight", "fc.weight", 0),
        &what,
    )
}

/// The model of `arch` holding `tensors`, its input channels read from
/// dimension 1 of the tensor named `input` and its classes from dimension 0
/// of `output`, less `extra` rows that are not classes (their absence is an
/// error ending in `what`).
fn build(
    path: &Path,
    arch: Arch,
    tensors: &[(String, Tensor)],
    (input, output, extra): (&str, &str, i64),
    what: &str,
) -> Result<Model, WeightsError> {
    let find = |name: &str| {
        super::weights::shape_of(tensors, name).ok_or_else(|| WeightsError::Mismatch {
            path: path.into(),
            reason: format!("no {name} {what}"),
        })
    };
    let (first, last) = (find(input)?, find(output)?);
    let model = Model::new(arch, first[1], last[0] - extra, tch::Device::Cpu);
    super::weights::copy_into(&model.vs, tensors, path)?;
    Ok(model)
}

/// [`released`] of the DDPM release's UNet: names as they are, without
/// `DataParallel`'s `module.`; image channels from `conv_in`, classes from
/// `classes_emb`.
fn released_unet(path: &Path, arch: Arch, ema: bool) -> Result<Model, WeightsError> {
    let pick = if ema {
        torch_pickle::Pick::ListLast
    } else {
        torch_pickle::Pick::Model
    };
    let file_err = |reason: String| WeightsError::File {
        path: path.into(),
        reason,
    };
    if !path.is_file() {
        return Err(file_err("no such file".into()));
    }
    let tensors: Vec<(String, Tensor)> = torch_pickle::read_pick(path, pick)
        .map_err(|why| {
            file_err(format!(
                "not a DDPM checkpoint ({why}); expected the release's ckpt.pth \
                 ([model, optimizer, step, ema] state_dicts)"
            ))
        })?
        .into_iter()
        .map(|(n, t)| (n.strip_prefix("module.").unwrap_or(&n).to_string(), t))
        .collect();
    let what = format!(": not a DDPM checkpoint of {}", arch.name());
    build(
        path,
        arch,
        &tensors,
        ("conv_in.weight", "classes_emb.weight", 0),
        &what,
    )
}

/// [`released`] of a DiT checkpoint: the public `DiT-XL-2-256x256.pt` (a
/// plain state_dict, of EMA weights) or a `train.py` checkpoint (`{"model",
/// "ema", "opt", "args"}`: its model, or with `ema` its EMA), names as they
/// are without `DistributedDataParallel`'s `module.`; latent channels from
/// `x_embedder.proj`, classes from `y_embedder.embedding_table` (less the
/// null class).
fn released_dit(path: &Path, arch: Arch, ema: bool) -> Result<Model, WeightsError> {
    let pick = if ema {
        torch_pickle::Pick::DictEma
    } else {
        torch_pickle::Pick::Model
    };
    if !path.is_file() {
        return Err(WeightsError::File {
            path: path.into(),
            reason: "no such file".into(),
        });
    }
    let tensors: Vec<(String, Tensor)> = torch_pickle::read_pick(path, pick)
        .map_err(|why| WeightsError::File {
            path: path.into(),
            reason: format!(
                "not a DiT checkpoint ({why}); expected DiT-XL-2-256x256.pt's state_dict or a \
                 train.py checkpoint"
            ),
        })?
        .into_iter()
        .map(|(n, t)| (n.strip_prefix("module.").unwrap_or(&n).to_string(), t))
        .collect();
    let Arch::Dit(configured) = arch else {
        unreachable!("released_dit takes a DiT")
    };
    let spec = dit_spec_of(path, &tensors, &configured)?;
    let arch = Arch::Dit(spec);
    let keys = arch.denoiser_shape_keys().expect("a DiT is a denoiser");
    let what = format!(": not a DiT checkpoint of {}", arch.name());
    build(path, arch, &tensors, keys, &what)
}

/// The shape of the DiT whose state_dict `tensors` is: depth, width,
/// patch, latent side and channels, MLP ratio and `learn_sigma` read from
/// the tensors (the public checkpoints come at 256 and 512 pixels, so the
/// side is the file's, not the configuration's); the heads (not in the
/// file) and the null class from `configured`.
fn dit_spec_of(
    path: &Path,
    tensors: &[(String, Tensor)],
    configured: &super::dit::DitSpec,
) -> Result<super::dit::DitSpec, WeightsError> {
    let shape = |name: &str| {
        super::weights::shape_of(tensors, name).ok_or_else(|| WeightsError::Mismatch {
            path: path.into(),
            reason: format!("no {name}: not a DiT checkpoint"),
        })
    };
    let (pos, proj) = (shape("pos_embed")?, shape("x_embedder.proj.weight")?);
    let (fc1, linear) = (
        shape("blocks.0.mlp.fc1.weight")?,
        shape("final_layer.linear.weight")?,
    );
    let (tokens, hidden, channels, patch) = (pos[1], pos[2], proj[1], proj[2]);
    let grid = (tokens as f64).sqrt().round() as i64;
    let depth = tensors
        .iter()
        .filter_map(|(n, _)| {
            n.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |d| d + 1);
    let spec = super::dit::DitSpec {
        depth,
        hidden,
        patch,
        input_size: grid * patch,
        in_channels: channels,
        learn_sigma: linear[0] == 2 * channels * patch * patch,
        mlp_ratio: fc1[0] as f64 / hidden as f64,
        ..configured.clone()
    };
    spec.check().map_err(|why| WeightsError::Mismatch {
        path: path.into(),
        reason: format!("{why} (model.dit.heads is not in the file)"),
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_names_become_torchvision_names() {
        for (theirs, ours) in [
            ("conv1.weight", "conv1.weight"),
            (
                "module.layer2.0.shortcut.0.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "layer3.0.shortcut.1.running_var",
                "layer3.0.downsample.1.running_var",
            ),
            ("linear.weight", "fc.weight"),
            ("module.linear.bias", "fc.bias"),
            ("layer1.1.bn2.bias", "layer1.1.bn2.bias"),
        ] {
            assert_eq!(released_name(theirs), ours);
        }
    }
}
