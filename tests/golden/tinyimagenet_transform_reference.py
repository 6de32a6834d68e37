#!/usr/bin/env python3
"""The SFR-on release's TinyImageNet test transform, the reference of
tests/data.rs (Classification/dataset/tinyimagenet.py: the pickled images
are uint8 tensors [3, 64, 64]; transforms.Resize(224, BICUBIC) on the
tensor, then div(255) and Normalize with ImageNet's mean and std).

  tinyimagenet_transform_reference.py IN.png OUT.safetensors
writes "x" float32 [3, 224, 224].
"""

import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode

img = torch.from_numpy(np.array(Image.open(sys.argv[1]).convert("RGB"))).permute(2, 0, 1).contiguous()
x = transforms.Resize(224, interpolation=InterpolationMode.BICUBIC)(img)
x = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x.float() / 255)
save_file({"x": x.contiguous()}, sys.argv[2])
