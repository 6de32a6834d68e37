#!/usr/bin/env python3
"""The SFR-on iteration of `sfron bench step`, written as a lean PyTorch
script: the same model, batches per rank, optimizer, mask, clip and threads.
Prints one JSON line of the same shape (`sfron_iteration_ms` is PyTorch's
here).

One iteration: a forget step (per-sample cross-entropy l_i in train mode,
c_i = 1/(l_i^lambda + 1e-15) normalised over the global batch, loss
-alpha * sum(eps_i l_i), gradient times a fixed half-ones mask, L2 norm
clipped) and a remain step (mean cross-entropy), SGD with momentum and weight
decay. With --ranks N > 1 it runs N processes under DistributedDataParallel
with the gloo backend (DDP averages gradients, so the forget loss is scaled
by N to get the global sum sfron uses).

Usage: bench_step.py [--arch resnet18_cifar|resnet18|resnet50|swin_t] [--batch 32]
    [--image 32] [--classes 10] [--iterations 20] [--warmup 3] [--threads 1]
    [--ranks 1] [--device cpu|cuda] [--bf16] [--channels-last]
"""

import argparse
import faulthandler
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "interop"))
import models  # noqa: E402  (sfron's architectures in PyTorch, tests/interop/models.py)

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
ALPHA, CLIP, LAMBDA = 25.0, 7.0, 0.5


def build(arch, classes, channels):
    if arch == "swin_t":
        # torchvision's, as sfron builds it (stochastic depth 0.2 in train mode).
        return torchvision.models.swin_t(num_classes=classes)
    model, _ = models.build(arch)
    if hasattr(model, "fc") and model.fc.out_features != classes:
        model.fc = nn.Linear(model.fc.in_features, classes)
    if arch == "resnet18_cifar" and channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(rank, args, port, results):
    # A stuck rank prints where it is and ends the run rather than hanging it.
    faulthandler.dump_traceback_later(900, exit=True)
    torch.set_num_threads(args.threads)
    world = args.ranks
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(1000 * rank + 1)
    shape = (args.batch, args.channels, args.image, args.image)
    fx, rx = (torch.randn(shape).to(device, memory_format=memory) for _ in range(2))
    fy, ry = (torch.randint(args.classes, (args.batch,)).to(device) for _ in range(2))
    torch.manual_seed(0)
    model = build(args.arch, args.classes, args.channels).to(device, memory_format=memory)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None,
                                                  bucket_cap_mb=25)
    params = [p for p in model.parameters() if p.requires_grad]
    masks = [(torch.rand_like(p) >= 0.5).float() for p in params]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def iteration():
        opt.zero_grad()
        with autocast:
            logits = net(fx)
        losses = F.cross_entropy(logits.float(), fy, reduction="none")
        c = 1.0 / (losses.detach() ** LAMBDA + 1e-15)
        c_total = c.sum()
        if world > 1:
            dist.all_reduce(c_total)
        (-ALPHA * world * (c * losses).sum() / c_total).backward()
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad()
        with autocast:
            logits = net(rx)
        F.cross_entropy(logits.float(), ry).backward()
        opt.step()
        sync(device)

    for _ in range(args.warmup):
        iteration()
    times = []
    for _ in range(args.iterations):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
    # The fastest iteration (the least disturbed on a shared machine) and
    # the median, each the slowest rank's.
    stats = torch.tensor([min(times), statistics.median(times)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        seconds, median = stats.tolist()
        results.put({
            "bench": "step", "who": "pytorch" if world == 1 else "pytorch_ddp_" + ("gloo" if args.device == "cpu" else "nccl"),
            "arch": args.arch, "ranks": world, "threads": args.threads, "device": str(device.type),
            "precision": "bf16" if args.bf16 else "fp32", "channels_last": args.channels_last,
            "batch_per_rank": args.batch, "image": args.image, "torch": torch.__version__,
            "sfron_iteration_ms": 1e3 * seconds, "sfron_iteration_median_ms": 1e3 * median,
            "images_per_second": 2 * args.batch * world / seconds,
        })
    if world > 1:
        # gloo's teardown at interpreter exit hangs now and then (seen with
        # torch 2.11 on 2 CPUs); the result is already in the parent's pipe.
        sys.stdout.flush()
        os._exit(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    if args.ranks == 1:
        worker(0, args, 0, results)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(worker, args=(args, port, results), nprocs=args.ranks)
    print(json.dumps(results.get()), flush=True)


if __name__ == "__main__":
    main()
