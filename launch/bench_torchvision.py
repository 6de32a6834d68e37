#!/usr/bin/env python3
"""torchvision's ImageFolder + DataLoader (PIL) on the same images and
transforms as `sfron bench data`; prints JSON lines of the same shape.

Usage: bench_torchvision.py ROOT IMAGES BATCH WORKERS[,WORKERS...]
"""

import json
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main():
    root, images, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    recipes = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        "eval": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    }
    for name, recipe in recipes.items():
        for w in [int(x) for x in workers.split(",")]:
            ds = Subset(datasets.ImageFolder(root + "/train", transform=recipe), range(images))
            loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=w, prefetch_factor=2)
            start = time.perf_counter()
            seen = sum(x.shape[0] for x, _ in loader)
            seconds = time.perf_counter() - start
            print(json.dumps({"transform": name, "workers": w, "images": seen, "seconds": seconds,
                              "images_per_second": seen / seconds}), flush=True)


if __name__ == "__main__":
    main()
