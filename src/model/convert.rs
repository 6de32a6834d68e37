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
    if let Arch::Unet(_) = arch {
        return released_unet(path, arch, ema);
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
    build(path, arch, &tensors, ("conv1.weight", "fc.weight"), &what)
}

/// The model of `arch` holding `tensors`, its input channels read from
/// dimension 1 of the tensor named `input` and its classes from dimension 0
/// of `output` (their absence is an error ending in `what`).
fn build(
    path: &Path,
    arch: Arch,
    tensors: &[(String, Tensor)],
    (input, output): (&str, &str),
    what: &str,
) -> Result<Model, WeightsError> {
    let find = |name: &str| {
        super::weights::shape_of(tensors, name).ok_or_else(|| WeightsError::Mismatch {
            path: path.into(),
            reason: format!("no {name} {what}"),
        })
    };
    let (first, last) = (find(input)?, find(output)?);
    let model = Model::new(arch, first[1], last[0], tch::Device::Cpu);
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
        ("conv_in.weight", "classes_emb.weight"),
        &what,
    )
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
