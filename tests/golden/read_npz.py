#!/usr/bin/env python3
"""Reads a samples.npz as FID tools do (numpy.load; ADM's evaluator takes
arr_0) and compares it with the samples.safetensors beside it (tests/dit.rs).

  read_npz.py NPZ SAFETENSORS    prints {"shape", "dtype", "labels", "equal"}
"""

import json
import sys

import numpy as np
from safetensors.numpy import load_file

npz = np.load(sys.argv[1])
st = load_file(sys.argv[2])
images = st["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
print(json.dumps({
    "shape": list(npz["arr_0"].shape),
    "dtype": str(npz["arr_0"].dtype),
    "labels": npz["arr_1"].tolist(),
    "equal": bool(np.array_equal(npz["arr_0"], images) and np.array_equal(npz["arr_1"], st["labels"])),
}))
