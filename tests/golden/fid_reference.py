#!/usr/bin/env python3
"""The Frechet distance of two feature sets as pytorch-fid computes it
(tests/diffusion.rs runs it): mean and np.cov(rowvar=False) of each set,
then ||mu1 - mu2||^2 + Tr(s1) + Tr(s2) - 2 Tr(sqrtm(s1 s2)) with
scipy.linalg.sqrtm (an offset of 1e-6 on the diagonals when the product is
singular, the real part of a complex result), as in
pytorch_fid.fid_score.calculate_frechet_distance.

  fid_reference.py FILE   FILE: safetensors with float64 "a" [N, D] and
                          "b" [M, D]; prints {"fid": value}.
"""

import json
import sys

import numpy as np
from scipy import linalg
from safetensors.numpy import load_file


def frechet(mu1, s1, mu2, s2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


if __name__ == "__main__":
    f = load_file(sys.argv[1])
    a, b = f["a"], f["b"]
    fid = frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    print(json.dumps({"fid": float(fid)}))
