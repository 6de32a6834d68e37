#!/usr/bin/env python3
"""Activation memory of a DiT training step, counted exactly: the bytes of
every tensor autograd saves for the backward pass of one forward pass
(torch.autograd.graph.saved_tensors_hooks, storages counted once), per
sample, in float32 and under bf16 autocast, for the reference network
(tests/golden/dit_reference.py, the facebookresearch/DiT models.py
re-declaration) on the CPU. Attention here is timm's explicit softmax(q k^T)
v, which saves the heads x T x T probabilities; a fused kernel (PyTorch's
SDPA on a GPU, sfron's libtorch call) saves O(T) per head instead, so the
figure is an upper bound there.

  python launch/dit_memory.py [MODEL]     (default DiT-XL/2)
Prints one JSON line per precision."""

import importlib.util
import json
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "dit_reference", os.path.join(here, "..", "tests", "golden", "dit_reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

SIZES = {"DiT-XL/2": (28, 1152, 16, 2), "DiT-L/2": (24, 1024, 16, 2), "DiT-B/2": (12, 768, 12, 2),
         "DiT-S/2": (12, 384, 6, 2)}


def saved_bytes(model, x, t, y, autocast):
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, y)
    del out
    return total[0]


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "DiT-XL/2"
    depth, hidden, heads, patch = SIZES[name]
    model = ref.build({"depth": depth, "hidden": hidden, "heads": heads, "patch": patch,
                       "input_size": 32, "in_channels": 4, "classes": 1000, "learn_sigma": True,
                       "class_dropout_prob": 0.1, "mlp_ratio": 4.0}).train()
    params = sum(p.numel() for p in model.parameters())
    for autocast in (False, True):
        per = []
        for n in (1, 2):
            x = torch.randn(n, 4, 32, 32)
            t = torch.randint(0, 1000, (n,)).float()
            y = torch.randint(0, 1000, (n,))
            per.append(saved_bytes(model, x, t, y, autocast))
        print(json.dumps({"model": name, "parameters": params, "precision": "bf16" if autocast else "fp32",
                          "saved_bytes_per_sample": per[1] - per[0], "saved_bytes_fixed": 2 * per[0] - per[1]}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
