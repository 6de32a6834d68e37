#!/usr/bin/env python3
"""torch.optim's SGD and AdamW on fixed parameters and gradients, for
tests/optim.rs: reads IN.safetensors (p.<i> the initial parameters, g.<s>.<i>
the gradient of step s), runs each optimizer named in CASES_JSON (a list of
{"name", "kind": "sgd"|"adamw", "lr", and the optimizer's keyword
arguments}) for every step with param.grad set to the file's gradient, and
writes OUT.safetensors with <name>.<i> the final parameters.

  optim_reference.py IN OUT CASES_JSON"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    src, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    t = load_file(src)
    n = sum(1 for k in t if k.startswith("p."))
    steps = sum(1 for k in t if k.startswith("g.") and k.endswith(".0"))
    result = {}
    for case in cases:
        params = [t[f"p.{i}"].clone().requires_grad_() for i in range(n)]
        kwargs = {k: v for k, v in case.items() if k not in ("name", "kind")}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[case["kind"]](params, **kwargs)
        for s in range(steps):
            for i, p in enumerate(params):
                p.grad = t[f"g.{s}.{i}"].clone()
            opt.step()
        for i, p in enumerate(params):
            result[f"{case['name']}.{i}"] = p.detach().contiguous()
    save_file(result, out)


if __name__ == "__main__":
    main()
