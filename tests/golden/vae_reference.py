#!/usr/bin/env python3
"""PyTorch reference of the SD VAE (tests/vae.rs runs it): diffusers'
AutoencoderKL itself, at a small configuration.

  vae_reference.py make DIR SPEC   an AutoencoderKL of the shape in the
                      JSON SPEC (the keys of sfron's VaeSpec: in_channels,
                      out_channels, block_out, layers_per_block,
                      latent_channels, groups, scaling_factor, and "image":
                      [H, W]), built by diffusers, then every GroupNorm's
                      affine parameters randomised (diffusers leaves them at
                      1 and 0, where a misplaced norm would go unseen) and the
                      rest left at PyTorch's default random initialisation.
                      Saves DIR/vae.safetensors: the state_dict;
                      DIR/vae.io.safetensors: x (images in [-1, 1], N = 2),
                      moments (latent_dist.parameters), noise and latent
                      (latent_dist.sample with a seeded generator and the
                      same draws regenerated), mode (latent_dist.mode()),
                      decoded (decode(latent).sample).
Prints {"diffusers": version, "parameters": count}.
"""

import json
import sys

import diffusers
import torch
from diffusers.models import AutoencoderKL
from safetensors.torch import save_file


def build(spec):
    levels = len(spec["block_out"])
    return AutoencoderKL(
        in_channels=spec["in_channels"],
        out_channels=spec["out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(spec["block_out"]),
        layers_per_block=spec["layers_per_block"],
        latent_channels=spec["latent_channels"],
        norm_num_groups=spec["groups"],
        scaling_factor=spec["scaling_factor"],
    )


def make(out_dir, spec):
    torch.manual_seed(0)
    vae = build(spec).eval()
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    h, w = spec["image"]
    x = torch.rand(2, spec["in_channels"], h, w) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        latent = dist.sample(generator=torch.Generator().manual_seed(5))
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
        decoded = vae.decode(latent).sample
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, f"{out_dir}/vae.safetensors")
    save_file(
        {
            "x": x,
            "moments": dist.parameters.contiguous(),
            "noise": noise,
            "latent": latent.contiguous(),
            "mode": dist.mode().contiguous(),
            "decoded": decoded.contiguous(),
        },
        f"{out_dir}/vae.io.safetensors",
    )
    count = sum(p.numel() for p in vae.parameters())
    print(json.dumps({"diffusers": diffusers.__version__, "parameters": count}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "make":
        sys.exit(__doc__)
    make(sys.argv[2], json.loads(sys.argv[3]))
