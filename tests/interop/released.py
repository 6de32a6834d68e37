#!/usr/bin/env python3
"""PyTorch side of the released-checkpoint test (tests/interop.rs runs it).

  released.py DIR   writes, for a randomly initialised CIFAR ResNet-18 laid
                    out as the SFR-on authors' Classification/models/resnet.py
                    names it (shortcut.0/1 for a block's projection, linear
                    for the classifier), with random BatchNorm statistics:
                    DIR/released.pth      torch.save(model.state_dict()), as
                                          their main_pretrain.py saves it;
                    DIR/released.pth.tar  {"state_dict": the same with a
                                          "module." prefix, "epoch", "best_acc"}
                                          as other codebases of the lineage do;
                    DIR/released.io.safetensors  an input "x" [4, 3, 32, 32]
                                          and the eval-mode logits "y".

The network is written here from their description (3x3 stride-1 conv1, no
max-pool, BasicBlocks [2, 2, 2, 2], 4x4 average pool), not copied.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from models import randomize_batchnorm  # this folder (the script's own)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class ReleasedResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, width in enumerate([64, 128, 256, 512]):
            blocks = [Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)]
            cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(512, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def main(out):
    torch.manual_seed(3)
    torch.set_num_threads(2)
    model = ReleasedResNet18()
    randomize_batchnorm(model, tracked=11)
    model.eval()
    torch.save(model.state_dict(), f"{out}/released.pth")
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 200, "best_acc": 95.1}, f"{out}/released.pth.tar")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    save_file({"x": x, "y": y}, f"{out}/released.io.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
