#!/usr/bin/env python3
"""Golden fixture for sfron's deterministic transforms, made by torchvision.

Usage: python3 tests/golden/make_transform_fixture.py   (needs torch, torchvision, pillow)

Writes into tests/golden/:
- transform_input.png: a deterministic 333x250 RGB image (smooth gradients
  plus seeded noise, so that resizing has real work to do);
- transform_imagenet_eval.npy: torchvision's eval transform of it,
  Resize(256) + CenterCrop(224) + ToTensor + Normalize(ImageNet), float32 [3, 224, 224];
- transform_resize_small.npy: Resize(57) + CenterCrop(50) + ToTensor +
  Normalize(ImageNet), float32 [3, 50, 50] (odd sizes exercise the rounding);
- transform_input_gray.png and transform_gray_small.npy: a grayscale input
  converted to RGB as sfron does, then the small transform.
tests/data.rs compares sfron's output with these within 1/255 per pixel
(before division by std).
"""

import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_image(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = 127 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
    g = 255.0 * x / width
    b = 255.0 * (1 - y / height)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def save(name, tensor):
    np.save(os.path.join(HERE, name), tensor.numpy().astype(np.float32))


def main():
    torch.set_num_threads(1)
    rgb = Image.fromarray(make_image(333, 250, 7), "RGB")
    rgb.save(os.path.join(HERE, "transform_input.png"))
    eval_t = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    small_t = transforms.Compose([
        transforms.Resize(57), transforms.CenterCrop(50), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    # Reload from disk so the fixture is made from exactly the committed PNG.
    loaded = Image.open(os.path.join(HERE, "transform_input.png")).convert("RGB")
    save("transform_imagenet_eval.npy", eval_t(loaded))
    save("transform_resize_small.npy", small_t(loaded))

    gray = Image.fromarray(make_image(180, 260, 8)[:, :, 0], "L")
    gray.save(os.path.join(HERE, "transform_input_gray.png"))
    loaded = Image.open(os.path.join(HERE, "transform_input_gray.png")).convert("RGB")
    save("transform_gray_small.npy", small_t(loaded))
    print("wrote fixtures to", HERE)


if __name__ == "__main__":
    main()
