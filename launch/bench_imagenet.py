#!/usr/bin/env python3
"""ImageNet's cardinality, measured: launch/bench-imagenet's driver.

For each scale (a fraction of ImageNet-1k's 1,281,167 training samples) and
format (WebDataset tar shards, ImageFolder) it writes an ImageNet-shaped
dataset of tiny JPEGs (`sfron bench imagenet-shape`), then times, each as
its own sfron process with its wall time and peak resident memory (from
wait4):

- `sfron split` of a random 10% and of one class (the manifest's size too);
- `sfron bench index`: indexing, reading and checking the manifest, the
  sampler's epoch of shares for 8 and 64 ranks;
- a capped SFR-on run: `sfron unlearn --method sfron` forgetting one class,
  one iteration with the Fisher over 4 remain batches (and the class's
  samples), no evaluation, so what is left is the per-run cost of the
  dataset's size (index, manifest, sampler, fingerprint).

Costs that grow faster than the sample count show as a ratio between two
scales well above the scales' ratio. Prints the table and writes it into
BENCHMARKS.md.

Usage: bench_imagenet.py SFRON ROOT BENCHMARKS.md SCALES FORMATS
       bench_imagenet.py --report ROOT/rows.jsonl BENCHMARKS.md FORMATS
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_md import replace_section  # noqa: E402

HEADING = "## ImageNet's cardinality (`launch/bench-imagenet`)"


def measured(cmd):
    """Runs `cmd` with its own peak RSS (a fresh process: wait4's rusage)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # communicate() reaps the child; read its pipes by hand and reap with wait4.
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024.0, out.decode()


def disk_bytes(root):
    out = subprocess.run(["du", "-sb", root], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def main():
    if sys.argv[1] == "--report":
        rows = [json.loads(line) for line in open(sys.argv[2])]
        report(rows, sys.argv[4].split(), sys.argv[3])
        return
    sfron, root, md, scales, formats = sys.argv[1:6]
    scales = [float(s) for s in scales.split()]
    formats = formats.split()
    os.environ["SFRON_COMM"] = "local"
    rows = []
    for fmt in formats:
        for scale in scales:
            data = os.path.join(root, f"{fmt}-{scale:g}")
            runs = os.path.join(root, f"runs-{fmt}-{scale:g}")
            sets = ["--set", f"data.format={fmt}", "--set", f"data.root={data}",
                    "--set", f"run.root={runs}", "--set", "data.transform=cifar10",
                    "--set", "model.arch=resnet18_cifar", "--set", "model.width=0.125",
                    "--set", "data.workers=2", "--set", "device.threads=2"]
            row = {"format": fmt, "scale": scale}
            s, rss, out = measured([sfron, "bench", "imagenet-shape", "--out", data,
                                    "--scale", str(scale), "--format", fmt])
            shape = json.loads(out.strip().splitlines()[-1])
            row.update(train=shape["train"], generate_s=shape["seconds"],
                       disk_gb=disk_bytes(data) / 1e9)
            for name, scenario in [("random", "random:0.1"), ("class", "class:207")]:
                manifest = os.path.join(runs, f"split-{name}.json")
                s, rss, _ = measured([sfron, *sets, "--set", f"run.name=split-{name}",
                                      "split", "--scenario", scenario, "--out", manifest])
                row[f"split_{name}_s"] = s
                row[f"split_{name}_rss"] = rss
                row[f"manifest_{name}_kb"] = os.path.getsize(manifest) / 1e3
            s, rss, out = measured([sfron, *sets, "bench", "index", "--split",
                                    os.path.join(runs, "split-random.json"), "--ranks", "8,64"])
            for r in map(json.loads, out.strip().splitlines()):
                if r["what"] == "index":
                    row["index_s"] = r["seconds"]
                elif r["what"] == "split":
                    row["manifest_load_s"] = r["load_seconds"]
                    row["manifest_check_s"] = r["check_and_remain_seconds"]
                elif r["what"] == "sampler":
                    row[f"sampler_{r['ranks']}_s"] = r["all_ranks_seconds"]
            row["index_rss"] = rss
            original = os.path.join(runs, "original", "model.safetensors")
            if not os.path.exists(original):
                measured([sfron, *sets, "--set", "run.name=original", "--set", "train.max_steps=1",
                          "--set", "train.eval_every=0", "train"])
            s, rss, _ = measured([sfron, *sets, "--set", f"run.name=sfron-{int(time.time())}",
                                  "--set", "sfron.iterations=1", "--set", "sfron.fisher_remain_batches=4",
                                  "--set", "unlearn.eval_after=false", "--set", "unlearn.eval_before=false",
                                  "unlearn", "--method", "sfron", "--from", original,
                                  "--split", os.path.join(runs, "split-class.json")])
            row["sfron_s"] = s
            row["sfron_rss"] = rss
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(os.path.join(root, "rows.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report(rows, formats, md)


def report(rows, formats, md):
    """The table and the growth lines, into BENCHMARKS.md."""
    table = ["| format | samples | disk GB | index s | split random: s, MiB | manifest kB (random, class) "
             "| manifest read + check s | sampler epoch, 64 ranks s | capped SFR-on s, MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['format']} | {r['train']:,} | {r['disk_gb']:.2f} | {r['index_s']:.2f} "
            f"| {r['split_random_s']:.1f}, {r['split_random_rss']:.0f} "
            f"| {r['manifest_random_kb']:.0f}, {r['manifest_class_kb']:.0f} "
            f"| {r['manifest_load_s'] + r['manifest_check_s']:.3f} | {r['sampler_64_s']:.3f} "
            f"| {r['sfron_s']:.1f}, {r['sfron_rss']:.0f} |")
    growth = []
    for fmt in formats:
        mine = sorted((r for r in rows if r["format"] == fmt), key=lambda r: r["train"])
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            n = b["train"] / a["train"]
            parts = ", ".join(
                f"{label} {b[key] / a[key]:.1f}x" for label, key in
                [("index", "index_s"), ("split", "split_random_s"), ("manifest", "manifest_random_kb"),
                 ("sampler", "sampler_64_s"), ("capped SFR-on", "sfron_s")] if a[key] > 0)
            growth.append(f"- {fmt}, {a['train']:,} → {b['train']:,} samples ({n:.0f}x): {parts}.")
            worst = max(b[key] / a[key] for key in ("index_s", "split_random_s", "sampler_64_s", "sfron_s")
                        if a[key] > 0)
            growth.append(f"  Fastest-growing time: {worst:.0f}x, "
                          + ("within twice linear (no quadratic cost)." if worst <= 2 * n
                             else "**more than twice linear: a cost grows faster than the samples**."))
    cpu = platform.processor() or platform.machine()
    section = "\n".join([
        HEADING,
        "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs, {cpu}), one run per row: "
        "an ImageNet-shaped dataset (`sfron bench imagenet-shape`: 1,000 classes of 732 to 1,300 tiny JPEGs, "
        "1,281,167 at scale 1) in each format, then each command as its own process with its wall time and "
        "peak resident memory (libtorch alone is about 350 MiB of it). The capped SFR-on run forgets class 207 "
        "in one iteration with the Fisher over 4 remain batches and the class's samples, no evaluation "
        "(resnet18_cifar at width 0.125): what is left is the per-run cost of the dataset's size.",
        "",
        *table,
        "",
        "Growth between the smallest and the largest scale (linear is the samples' ratio):",
        "",
        *growth,
        "",
    ])
    replace_section(md, HEADING, section)


if __name__ == "__main__":
    main()
