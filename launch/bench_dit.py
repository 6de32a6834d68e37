#!/usr/bin/env python3
"""PyTorch's side of launch/bench-dit: one DiT training step as sfron's
`train` runs it under ADM's process, timed on the CPU: the reference network
(tests/golden/dit_reference.py, facebookresearch/DiT's models.py with timm's
layers; attention through F.scaled_dot_product_attention, timm's default
fused path, as sfron's), q_sample, DiT's training loss (MSE + the variational
bound, tests/golden/adm_reference.py), backward, AdamW without weight decay,
no clipping (DiT's train.py).

Usage: bench_dit.py SPEC_JSON --batch N --threads T --iterations K --warmup W
Prints {"what": "train", "ms": fastest, "median_ms": ...}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests", "golden"))
import adm_reference as adm  # noqa: E402
import dit_reference as ref  # noqa: E402


def fused_attention(self, x):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(B, N, C))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ref.Attention.forward = fused_attention
    spec = json.loads(a.spec)
    torch.manual_seed(0)
    model = ref.build(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    diffusion = adm.GaussianDiffusion(betas=adm.get_named_beta_schedule_linear(1000), var=adm.Var.LEARNED_RANGE)
    n, r, c = a.batch, spec["input_size"], spec["in_channels"]
    x0 = torch.rand(n, c, r, r) * 2 - 1
    y = torch.randint(0, spec["classes"], (n,))

    def train_step():
        t = torch.randint(0, 1000, (n,))
        noise = torch.randn_like(x0)
        xt = diffusion.q_sample(x0, t, noise)
        out = model(xt, t.float(), y)
        loss = diffusion.training_losses(out, x0, t, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        train_step()
    times = []
    for _ in range(a.iterations):
        t0 = time.perf_counter()
        train_step()
        times.append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"what": "train", "ms": min(times), "median_ms": statistics.median(times), "batch": n,
                      "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
