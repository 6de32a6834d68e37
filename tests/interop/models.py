#!/usr/bin/env python3
"""PyTorch side of the model interop test (tests/interop.rs runs it).

  models.py make DIR    for each architecture, a randomly initialised PyTorch
                        model with random BatchNorm statistics, saved as
                        DIR/<arch>.safetensors (its state_dict, including
                        num_batches_tracked), and DIR/<arch>.io.safetensors
                        with an input batch "x" and the eval-mode logits "y".
  models.py check DIR   loads DIR/<arch>.sfron.safetensors (written by sfron)
                        into the PyTorch model (no key may be missing but
                        num_batches_tracked, none unexpected), runs the input
                        of DIR/<arch>.sfron_io.safetensors and compares with
                        sfron's logits there; prints one JSON line per
                        architecture with the largest |logit difference|
                        ("diff") and the largest |logit| ("scale"), for
                        tests/interop.rs to judge; exits 1 on a missing or
                        unexpected key.

Architectures: resnet18_cifar (the SFR-on authors' CIFAR ResNet-18:
torchvision's resnet18 with a 3x3 stride-1 conv1 and no max-pool), resnet18,
resnet50 (torchvision), and mnist_cnn / mnist_cnn_bn (sfron's MNIST nets).
"""

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

CLASSES = 10


class MnistCnn(nn.Module):
    def __init__(self, batch_norm):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.bn1 = nn.BatchNorm2d(32) if batch_norm else None
        self.bn2 = nn.BatchNorm2d(64) if batch_norm else None
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, CLASSES)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(self.bn1(x) if self.bn1 is not None else x)
        x = self.conv2(x)
        x = F.relu(self.bn2(x) if self.bn2 is not None else x)
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


def build(arch):
    if arch == "resnet18_cifar":
        m = torchvision.models.resnet18(num_classes=CLASSES)
        m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
        return m, (4, 3, 32, 32)
    if arch == "resnet18":
        return torchvision.models.resnet18(num_classes=CLASSES), (2, 3, 224, 224)
    if arch == "resnet50":
        return torchvision.models.resnet50(num_classes=CLASSES), (2, 3, 224, 224)
    if arch in ("mnist_cnn", "mnist_cnn_bn"):
        return MnistCnn(arch == "mnist_cnn_bn"), (4, 1, 28, 28)
    raise SystemExit(f"unknown architecture {arch}")


ARCHS = ["resnet18_cifar", "resnet18", "resnet50", "mnist_cnn", "mnist_cnn_bn"]


def randomize_batchnorm(model, tracked):
    """Random affine parameters and running statistics in every BatchNorm2d
    (a fresh model's are 1, 0, 0, 1: they would hide a swapped tensor)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.num_batches_tracked.fill_(tracked)


def make(out):
    for k, arch in enumerate(ARCHS):
        torch.manual_seed(100 + k)
        model, shape = build(arch)
        randomize_batchnorm(model, tracked=7)
        model.eval()
        x = torch.randn(shape)
        with torch.no_grad():
            y = model(x)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{arch}.safetensors")
        save_file({"x": x, "y": y}, f"{out}/{arch}.io.safetensors")


def check(out):
    failed = False
    for arch in ARCHS:
        model, _ = build(arch)
        state = load_file(f"{out}/{arch}.sfron.safetensors")
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            print(f"{arch}: missing {missing}, unexpected {result.unexpected_keys}")
            failed = True
            continue
        model.eval()
        io = load_file(f"{out}/{arch}.sfron_io.safetensors")
        with torch.no_grad():
            y = model(io["x"])
        diff = (y - io["y"]).abs().max().item()
        print(json.dumps({"arch": arch, "diff": diff, "scale": io["y"].abs().max().item()}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    torch.set_num_threads(2)
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
