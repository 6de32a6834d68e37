#!/usr/bin/env python3
"""torchvision's SwinTransformer on random weights, for tests/swin.rs.

  swin_reference.py DIR SPEC_JSON

SPEC_JSON: {"patch", "embed_dim", "depths", "heads", "window",
"stochastic_depth_prob", "image_size", "channels", "classes", "batch"}.
Builds torchvision.models.SwinTransformer(patch_size, embed_dim, depths,
num_heads, window_size, stochastic_depth_prob, num_classes) with
torch.manual_seed(0), moves every weight off its initialisation (N(0, 0.02)
added), replaces features.0.0 for `channels` input channels when not 3, and
writes
  DIR/swin.safetensors      the state_dict (relative_position_index included);
  DIR/swin.io.safetensors   x (the batch), y (labels), logits (eval mode),
                            and grad.<name> of the summed cross-entropy of
                            one train-mode forward pass for every parameter;
and prints {"parameters": n} (sum of p.numel()).

The train-mode pass drops residual branches with the scales sfron drew,
read from DIR/swin.scales.safetensors ("scales" [2 * blocks, batch]: row
2b is block b's attention branch, row 2b + 1 its MLP branch), in place of
torchvision's own Bernoulli draws: each block's StochasticDepth module
(torchvision calls it twice per block, attention first) is replaced by one
that multiplies row i of its input by the next row of scales.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock


class GivenDrops(nn.Module):
    """StochasticDepth("row") with given per-row scales, one row per call."""

    def __init__(self, scales, first):
        super().__init__()
        self.scales, self.next = scales, first

    def forward(self, x):
        s = self.scales[self.next].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        self.next += 1
        return x * s


def main():
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[spec["patch"]] * 2, embed_dim=spec["embed_dim"],
                            depths=spec["depths"], num_heads=spec["heads"],
                            window_size=[spec["window"]] * 2,
                            stochastic_depth_prob=spec["stochastic_depth_prob"],
                            num_classes=spec["classes"])
    if spec["channels"] != 3:
        model.features[0][0] = nn.Conv2d(spec["channels"], spec["embed_dim"],
                                         kernel_size=spec["patch"], stride=spec["patch"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    n, side = spec["batch"], spec["image_size"]
    x = torch.randn(n, spec["channels"], side, side)
    y = torch.randint(0, spec["classes"], (n,))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    scales = load_file(os.path.join(out, "swin.scales.safetensors"))["scales"]
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert scales.shape == (2 * len(blocks), n), scales.shape
    for b, block in enumerate(blocks):
        block.stochastic_depth = GivenDrops(scales, 2 * b)
    model.train()
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    assert all(block.stochastic_depth.next == 2 * b + 2 for b, block in enumerate(blocks))
    io = {"x": x, "y": y, "logits": logits}
    for name, p in model.named_parameters():
        io[f"grad.{name}"] = p.grad.contiguous()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "swin.safetensors"))
    save_file(io, os.path.join(out, "swin.io.safetensors"))
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
