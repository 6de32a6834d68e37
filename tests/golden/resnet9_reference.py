#!/usr/bin/env python3
"""The KLoM benchmark's ResNet-9 in PyTorch, for tests/resnet9.rs.

The network is unlearning_bench/models.py's ResNet9 (Georgiev et al.,
data-unlearning-bench; FFCV's CIFAR-10 example network), written out here
as that file has it, with the first conv reading `channels` input channels
instead of 3 and without the move to channels-last (a memory format: the
same values up to rounding).

  resnet9_reference.py golden DIR SPEC_JSON
      SPEC_JSON: {"channels", "classes", "batch", "side"}. Loads
      DIR/resnet9.safetensors (sfron's weights, no num_batches_tracked)
      with load_state_dict(strict=True) and writes
        DIR/resnet9.torch.safetensors  the state_dict as PyTorch holds it
                                       (num_batches_tracked included), before
                                       the train-mode pass;
        DIR/resnet9.io.safetensors     x (the batch, torch.manual_seed(0)),
                                       y (labels), logits (eval mode), and
                                       grad.<name> of the summed
                                       cross-entropy of one train-mode
                                       forward pass for every parameter.

  resnet9_reference.py export FILE SPEC_JSON
      SPEC_JSON: {"channels", "classes", "seed"}. A ResNet9 initialised by
      PyTorch under torch.manual_seed(seed), every parameter and running
      statistic moved off its initialisation, saved as a user would publish
      it: torch.save(model.state_dict()) to FILE.pt, read back with
      torch.load, written with safetensors.torch.save_file to FILE.

Both print {"parameters": n} (sum of p.numel()).
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class Mul(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class Residual(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return x + self.module(x)


def conv_bn(channels_in, channels_out, kernel_size=3, stride=1, padding=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=kernel_size, stride=stride,
                  padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


def resnet9(num_classes=10, channels=3):
    return nn.Sequential(
        conv_bn(channels, 64, kernel_size=3, stride=1, padding=1),
        conv_bn(64, 128, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
        conv_bn(128, 256, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(conv_bn(256, 256), conv_bn(256, 256))),
        conv_bn(256, 128, kernel_size=3, stride=1, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        Flatten(),
        nn.Linear(128, num_classes, bias=False),
        Mul(0.2),
    )


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def golden(out, spec):
    model = resnet9(spec["classes"], spec["channels"])
    model.load_state_dict(load_file(os.path.join(out, "resnet9.safetensors")), strict=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, "resnet9.torch.safetensors"))
    torch.manual_seed(0)
    n, side = spec["batch"], spec["side"]
    x = torch.randn(n, spec["channels"], side, side)
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
    save_file(io, os.path.join(out, "resnet9.io.safetensors"))
    print(json.dumps({"parameters": parameters(model)}))


def export(path, spec):
    torch.manual_seed(spec["seed"])
    model = resnet9(spec["classes"], spec["channels"])
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_(0.0, 0.1)
            elif name.endswith("num_batches_tracked"):
                t.fill_(1000)
            else:
                t.add_(0.02 * torch.randn_like(t))
    torch.save(model.state_dict(), path + ".pt")
    state = torch.load(path + ".pt", map_location="cpu")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    print(json.dumps({"parameters": parameters(model)}))


def main():
    torch.set_num_threads(1)
    mode, where, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    {"golden": golden, "export": export}[mode](where, spec)


if __name__ == "__main__":
    main()
