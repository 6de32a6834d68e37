#!/usr/bin/env python3
"""torchvision's RandAugment operations on a uint8 image tensor, the
reference of tests/data.rs (torchvision.transforms.autoaugment._apply_op
with NEAREST interpolation and no fill, as RandAugment calls it).

  rand_augment_reference.py IN.png OUT.safetensors

For each of RandAugment's 14 operations at magnitude bins 2 (the SFR-on
release's TinyImageNet setting) and 15 of 31, both signs where signed,
writes "<op>:<bin>:<sign>" uint8 [H, W, C] (the image after the
operation), and prints as JSON the strengths torchvision's
_augmentation_space gives each operation at those bins.
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

img = torch.from_numpy(np.array(Image.open(sys.argv[1]).convert("RGB"))).permute(2, 0, 1).contiguous()
_, h, w = img.shape
space = RandAugment()._augmentation_space(31, (h, w))
out, strengths = {}, {}
for op, (mags, signed) in space.items():
    for b in (2, 15):
        m = float(mags[b].item()) if mags.ndim > 0 else 0.0
        strengths[f"{op}:{b}"] = m
        for sign in ((1, -1) if signed else (1,)):
            res = _apply_op(img, op, sign * m, interpolation=InterpolationMode.NEAREST, fill=None)
            out[f"{op}:{b}:{sign}"] = res.permute(1, 2, 0).contiguous()
save_file(out, sys.argv[2])
print(json.dumps(strengths))
