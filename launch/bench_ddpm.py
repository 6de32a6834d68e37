#!/usr/bin/env python3
"""PyTorch's side of launch/bench-ddpm: the class-conditional DDPM UNet of a
preset (tests/golden/ddpm_reference.py, the release's network) timed on the
CPU, one JSON line per measurement:

  train   one training step as sfron's `train` runs it: noised batch, the
          denoising loss summed over pixels and averaged over the batch,
          backward, clip_grad_norm_(1), AdamW (no weight decay);
  sample  one guided sampling step: the conditional and null halves in one
          forward pass of 2N rows, no gradient.

Usage: bench_ddpm.py SPEC_JSON --batch N --threads T --iterations K --warmup W
Each line: {"what": ..., "ms": fastest iteration, "median_ms": ...}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
import ddpm_reference as ref  # noqa: E402


def timed(fn, iterations, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return min(times), statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    spec = json.loads(a.spec)
    ref.GROUPS[0] = spec.get("groups", 32)
    torch.manual_seed(0)
    model = ref.Unet(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    n, r, c = a.batch, spec["resolution"], spec["channels"]
    x0 = torch.rand(n, c, r, r) * 2 - 1
    labels = torch.randint(0, spec["classes"], (n,))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def train_step():
        model.train()
        t = torch.randint(0, 1000, (n,))
        e = torch.randn_like(x0)
        a_t = abar[t].view(-1, 1, 1, 1)
        xt = x0 * a_t.sqrt() + e * (1 - a_t).sqrt()
        keep = torch.rand(n) >= 0.1
        loss = (e - model(xt, t.float(), labels, keep)).square().sum(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    xx = torch.cat([x0, x0])
    tt = torch.full((2 * n,), 500.0)
    cc = torch.cat([labels, labels])
    kk = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])

    def sample_step():
        model.eval()
        with torch.no_grad():
            eps = model(xx, tt, cc, kk)
            _ = 3 * eps[:n] - 2 * eps[n:]

    for what, fn in [("train", train_step), ("sample", sample_step)]:
        best, median = timed(fn, a.iterations, a.warmup)
        print(json.dumps({"what": what, "ms": best, "median_ms": median, "batch": n,
                          "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
