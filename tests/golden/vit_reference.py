#!/usr/bin/env python3
"""torchvision's VisionTransformer on random weights, for tests/vit.rs.

  vit_reference.py DIR SPEC_JSON

SPEC_JSON: {"patch", "image_size", "depth", "heads", "hidden", "mlp_dim",
"channels", "classes", "batch"}. Builds
torchvision.models.VisionTransformer(image_size, patch_size, num_layers,
num_heads, hidden_dim, mlp_dim, num_classes) with torch.manual_seed(0),
moves every weight off its initialisation (the zero head, the zero class
token: N(0, 0.02) added), replaces conv_proj for `channels` input channels
when not 3, and writes
  DIR/vit.safetensors      the state_dict;
  DIR/vit.io.safetensors   x (the batch), y (labels), logits (eval mode),
                           and grad.<name> of the summed cross-entropy of
                           one train-mode forward pass for every parameter;
and prints {"parameters": n} (sum of p.numel()).
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer


def main():
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(image_size=spec["image_size"], patch_size=spec["patch"],
                              num_layers=spec["depth"], num_heads=spec["heads"],
                              hidden_dim=spec["hidden"], mlp_dim=spec["mlp_dim"],
                              num_classes=spec["classes"])
    if spec["channels"] != 3:
        model.conv_proj = nn.Conv2d(spec["channels"], spec["hidden"], kernel_size=spec["patch"],
                                    stride=spec["patch"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    n = spec["batch"]
    x = torch.randn(n, spec["channels"], spec["image_size"], spec["image_size"])
    y = torch.randint(0, spec["classes"], (n,))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    io = {"x": x, "y": y, "logits": logits}
    for name, p in model.named_parameters():
        io[f"grad.{name}"] = p.grad.contiguous()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "vit.safetensors"))
    save_file(io, os.path.join(out, "vit.io.safetensors"))
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
