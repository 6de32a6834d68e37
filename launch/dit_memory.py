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

With activation checkpointing of the blocks (sfron's device.recompute) the
step keeps each block's input and, while one block is recomputed in the
backward pass, that block's saved tensors: counted the same way, as the
tensors saved outside the blocks (which run without a graph), plus the
blocks' inputs, plus one block's saved tensors.

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


def counted(f):
    """The value of f() and the bytes autograd saved while it ran."""
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f()
    return out, total[0]


def saved_bytes(model, x, t, y, autocast):
    """Saved bytes of one forward pass keeping every activation."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return counted(lambda: model(x, t, y))[1]


def recompute_saved_bytes(model, x, t, y, autocast):
    """Saved bytes of a forward pass whose blocks run without a graph (sfron's
    device.recompute), plus the blocks' inputs kept for the recomputation,
    plus the largest single block's saved tensors (the recomputation holds
    one at a time)."""
    leaf = lambda v: v.detach().requires_grad_()
    inputs = []

    def outside():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, model.training)
        with torch.no_grad():
            for block in model.blocks:
                inputs.append(h)
                h = block(h, c)
        return model.final_layer(leaf(h), leaf(c)), c

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (_, c), kept = counted(outside)
        kept += sum(h.untyped_storage().nbytes() for h in inputs)
        block = max(counted(lambda: b(leaf(h), leaf(c)))[1] for b, h in zip(model.blocks, inputs))
    return kept + block


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "DiT-XL/2"
    depth, hidden, heads, patch = SIZES[name]
    model = ref.build({"depth": depth, "hidden": hidden, "heads": heads, "patch": patch,
                       "input_size": 32, "in_channels": 4, "classes": 1000, "learn_sigma": True,
                       "class_dropout_prob": 0.1, "mlp_ratio": 4.0}).train()
    params = sum(p.numel() for p in model.parameters())
    for autocast in (False, True):
        per, rec = [], []
        for n in (1, 2):
            x = torch.randn(n, 4, 32, 32)
            t = torch.randint(0, 1000, (n,)).float()
            y = torch.randint(0, 1000, (n,))
            per.append(saved_bytes(model, x, t, y, autocast))
            rec.append(recompute_saved_bytes(model, x, t, y, autocast))
        print(json.dumps({"model": name, "parameters": params, "precision": "bf16" if autocast else "fp32",
                          "saved_bytes_per_sample": per[1] - per[0], "saved_bytes_fixed": 2 * per[0] - per[1],
                          "recompute_saved_bytes_per_sample": rec[1] - rec[0],
                          "recompute_saved_bytes_fixed": 2 * rec[0] - rec[1]}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
