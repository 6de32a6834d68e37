#!/usr/bin/env python3
"""ADM's center_crop_arr (openai/guided-diffusion image_datasets.py, which
DiT's train.py and the SFR-on DiT release use) with PIL, the reference of
tests/latents.rs.

  center_crop_reference.py make DIR SIZE   writes DIR/img{k}.png (random RGB
                      images of several sizes: larger than 2 SIZE, between
                      SIZE and 2 SIZE, smaller than SIZE, not square) and
                      DIR/crops.safetensors: crop{k} uint8 [SIZE, SIZE, 3].
"""

import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file


def center_crop_arr(pil_image, image_size):
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def make(out_dir, size):
    rng = np.random.default_rng(0)
    shapes = [(5 * size // 2 + 3, 2 * size + 7), (3 * size // 2, size + 5), (size // 2 + 1, size // 3 + 2),
              (4 * size + 1, 4 * size + 1)]
    crops = {}
    for k, (w, h) in enumerate(shapes):
        # Smooth content plus noise: bicubic overshoot and clipping both occur.
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
        img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(f"{out_dir}/img{k}.png")
        crops[f"crop{k}"] = np.ascontiguousarray(center_crop_arr(Image.fromarray(img), size))
    save_file(crops, f"{out_dir}/crops.safetensors")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "make":
        sys.exit(__doc__)
    make(sys.argv[2], int(sys.argv[3]))
