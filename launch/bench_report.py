#!/usr/bin/env python3
"""Turns launch/bench's JSON lines into the ratios, prints them and writes
them into BENCHMARKS.md (the section "Step, scaling and reductions").

Usage: bench_report.py RESULTS.jsonl BENCHMARKS.md ARCH BATCH ITERATIONS ROUNDS
"""

import datetime
import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_md import replace_section  # noqa: E402

HEADING = "## Step, scaling and reductions (`launch/bench`)"


def verdict(ok):
    return "met" if ok else "**not met**"


def main():
    results, md, arch, batch, iterations, rounds = sys.argv[1:7]
    rows = [json.loads(line) for line in open(results) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)

    def best(label, key="sfron_iteration_ms"):
        runs = by.get(label, [])
        return min(runs, key=lambda r: r[key]) if runs else None

    s11, p11, s21, s12, d21, l21 = (best(k) for k in (
        "sfron_1x1", "pytorch_1x1", "sfron_2x1", "sfron_1x2", "ddp_2x1", "sfron_2x1_local_bn"))
    bare = min(by["sfron_1x1"], key=lambda r: r["ratio_to_bare"])
    ms = lambda r: r["sfron_iteration_ms"]
    vs_bare = bare["ratio_to_bare"]
    vs_torch = ms(s11) / ms(p11)
    eff = ms(s11) / ms(s21)
    eff_ddp = ms(p11) / ms(d21)
    ranks_vs_threads = ms(s12) / ms(s21)
    lines = [
        "| measurement | value | goal | |",
        "|---|---|---|---|",
        f"| SFR-on iteration / bare libtorch fwd+bwd+SGD (1×1) | {vs_bare:.3f} ({bare['sfron_iteration_ms']:.0f} / {bare['bare_iteration_ms']:.0f} ms) | ≤ 1.02 | {verdict(vs_bare <= 1.02)} |",
        f"| sfron / PyTorch, same loop (1×1) | {vs_torch:.3f} ({ms(s11):.0f} / {ms(p11):.0f} ms) | ≤ 1.0 | {verdict(vs_torch <= 1.0)} |",
        f"| scaling 2×1 vs 1×1, sfron (batch/rank fixed) | {eff:.3f} ({ms(s11):.0f} → {ms(s21):.0f} ms; comm {s21['sfron_comm_ms']:.0f} ms) | ≥ 0.92 and ≥ DDP | {verdict(eff >= 0.92 and eff >= eff_ddp)} |",
        f"| scaling 2×1 vs 1×1, PyTorch DDP gloo | {eff_ddp:.3f} ({ms(p11):.0f} → {ms(d21):.0f} ms) | (reference) | |",
        f"| 1 rank × 2 threads / 2 ranks × 1 thread, same global batch | {ranks_vs_threads:.3f} ({ms(s12):.0f} / {ms(s21):.0f} ms) | (> 1: ranks win) | |",
    ]
    if l21 and s21.get("batchnorm_sums_per_iteration"):
        bn = ms(s21) / ms(l21)
        lines.append(
            f"| global / local BatchNorm, 2×1 ({s21['batchnorm_sums_per_iteration']:.0f} sums of "
            f"{s21['batchnorm_bytes_per_iteration'] / 1e3:.0f} kB in all added per iteration) | "
            f"{bn:.3f} ({ms(s21):.0f} / {ms(l21):.0f} ms) | ≤ 1.10 | {verdict(bn <= 1.10)} |")
    model = next(r for r in rows if r.get("bench") == "ring_model")
    red = [r for r in rows if r.get("bench") == "reduce"]
    table = [
        "| buffer | in place, one call | old scratch copy | in place, 1 MiB segments | ring model | best / model |",
        "|---|---|---|---|---|---|",
    ]
    sizes = sorted({r["bytes"] for r in red if r["what"] == "buffer"})
    worst_big = 0.0
    for b in sizes:
        get = {r["how"]: r for r in red if r["what"] == "buffer" and r["bytes"] == b}
        best_ms = min(get[h]["ms"] for h in ("one_call", "segmented"))
        ratio = best_ms / get["one_call"]["model_ms"]
        if b >= 1 << 20:
            worst_big = max(worst_big, ratio)
        size = f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
        table.append(f"| {size} | {get['one_call']['ms']:.3f} ms | {get['scratch']['ms']:.3f} ms | "
                     f"{get['segmented']['ms']:.3f} ms | {get['one_call']['model_ms']:.3f} ms | {ratio:.2f} |")
    grads = [
        "| gradients (filled from per-parameter tensors, then summed) | one call | one call per tensor | buckets | ring model (sum only) |",
        "|---|---|---|---|---|",
    ]
    for what in sorted({r["what"] for r in red if r["what"] != "buffer"}):
        get = {r["how"]: r for r in red if r["what"] == what}
        mb = get["one_call"]["bytes"] / 1e6
        grads.append(f"| {what} ({mb:.1f} MB) | {get['one_call']['ms']:.1f} ms | {get['per_tensor']['ms']:.1f} ms | "
                     f"{get['buckets']['ms']:.1f} ms | {get['one_call']['model_ms']:.1f} ms |")
    lines.append(f"| reduction / ring model, worst of 1-128 MiB (best of one call and segments) | {worst_big:.2f} | ≤ 1.1 | {verdict(worst_big <= 1.1)} |")
    r50, p50 = best("sfron_resnet50"), best("pytorch_resnet50")
    if r50 and p50:
        lines.append(
            f"| ResNet-50 SFR-on iteration on CPU ({r50['threads']} threads, batch {r50['batch_per_rank']} × 2, 224 px) | "
            f"{ms(r50) / 1e3:.2f} s, {r50['images_per_second']:.2f} img/s (PyTorch {ms(p50) / 1e3:.2f} s, "
            f"{p50['images_per_second']:.2f} img/s; bare libtorch {r50['bare_iteration_ms'] / 1e3:.2f} s) | "
            f"≥ PyTorch | {verdict(ms(r50) <= ms(p50))} |")
    sw, ps = best("sfron_swin_t"), best("pytorch_swin_t")
    if sw and ps:
        lines.append(
            f"| Swin-T SFR-on iteration on CPU ({sw['threads']} threads, batch {sw['batch_per_rank']} × 2, 224 px, "
            f"200 classes) | {ms(sw) / 1e3:.2f} s (PyTorch/torchvision {ms(ps) / 1e3:.2f} s): "
            f"{ms(sw) / ms(ps):.3f}× | ≤ 1.0× | {verdict(ms(sw) <= ms(ps))} |")
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()
    section = "\n".join([
        HEADING,
        "",
        f"Measured {datetime.date.today()} on {platform.node()}: {os.cpu_count()} CPUs ({cpu}), "
        f"{mpi[0] if mpi else 'MPI unknown'}, PyTorch {p11.get('torch', '?')}. One run of `launch/bench`: "
        f"{arch}, {batch} images per rank in each of the forget and remain batches ({s11['image']} px), "
        f"{iterations} timed iterations after warm-up, the fastest iteration, best of {rounds} alternating rounds "
        "(medians moved by ±10% between runs on this shared machine). "
        "1×1 = 1 rank × 1 thread.",
        "",
        *lines,
        "",
        f"Ring model: 4-byte sum {model['latency_s'] * 1e6:.1f} µs, memcpy {model['copy_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"add {model['add_bytes_per_s'] / 1e9:.2f} GB/s (all ranks at once); "
        "T(n) = L + 2(p−1)/p · n/B_copy + (p−1)/p · n/B_add.",
        "",
        *table,
        "",
        *grads,
        "",
    ])
    replace_section(md, HEADING, section)


if __name__ == "__main__":
    main()
