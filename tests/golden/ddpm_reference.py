#!/usr/bin/env python3
"""PyTorch reference of the class-conditional DDPM UNet (tests/diffusion.rs
runs it), written from the SFR-on release's DDPM/models/diffusion.py
(Conditional_Model) with the same module names, so its state_dict keys are
the release's.

  ddpm_reference.py make DIR SPEC    a randomly initialised UNet of the shape
                        in the JSON SPEC (ch, ch_mult, num_res_blocks,
                        attn_resolutions, resolution, resamp_with_conv,
                        groups, channels, classes), GroupNorm affine parameters
                        randomised too; saves DIR/unet.safetensors and
                        DIR/unet.io.safetensors with inputs x, t (float
                        timesteps), c, keep (1 = class kept, 0 = null class)
                        and outputs y (eval mode) and g (guided: (1 + w) cond
                        - w uncond, w = 2, the release's
                        _forward_with_cond_scale).
  ddpm_reference.py ckpt DIR SPEC    a checkpoint as the release's DDPM
                        runner saves it: torch.save([model.state_dict(),
                        optimizer.state_dict(), step, ema_state]) of a
                        DataParallel model (keys prefixed "module."), as
                        DIR/ckpt.pth, with the expected tensors (no prefix)
                        in DIR/raw.safetensors and DIR/ema.safetensors.
  ddpm_reference.py check DIR SPEC   loads DIR/unet.sfron.safetensors strictly,
                        runs DIR/unet.sfron_io.safetensors' inputs, prints
                        one JSON line with the largest |difference| from
                        sfron's y ("diff") and the largest |y| ("scale").
"""

import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

GUIDANCE = 2.0


def swish(x):
    return x * torch.sigmoid(x)


GROUPS = [32]  # the spec's "groups" (the release: 32)


def norm(c):
    return nn.GroupNorm(GROUPS[0], c, eps=1e-6, affine=True)


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1, 0, 0)) if dim % 2 == 1 else emb


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.temb_cemb_proj = nn.Linear(emb, cout)
        self.norm2 = norm(cout)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)
        self.cin, self.cout = cin, cout

    def forward(self, x, temb, cemb):
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_cemb_proj(swish(torch.cat([temb, cemb], dim=-1)))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.cin != self.cout:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Resample(nn.Module):
    def __init__(self, c, with_conv, down):
        super().__init__()
        self.with_conv, self.down = with_conv, down
        if with_conv:
            self.conv = nn.Conv2d(c, c, 3, 2 if down else 1, 0 if down else 1)

    def forward(self, x):
        if self.down:
            if self.with_conv:
                return self.conv(F.pad(x, (0, 1, 0, 1)))
            return F.avg_pool2d(x, 2, 2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Unet(nn.Module):
    def __init__(self, s):
        super().__init__()
        ch, mult, nb = s["ch"], s["ch_mult"], s["num_res_blocks"]
        self.ch, emb = ch, 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, emb), nn.Linear(emb, emb)])
        self.classes_emb = nn.Embedding(s["classes"], ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = nn.Module()
        self.cemb.dense = nn.ModuleList([nn.Linear(ch, emb), nn.Linear(emb, emb)])
        self.conv_in = nn.Conv2d(s["channels"], ch, 3, 1, 1)
        res, in_mult = s["resolution"], (1,) + tuple(mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(len(mult)):
            d = nn.Module()
            d.block, d.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nb):
                d.block.append(ResnetBlock(block_in, ch * mult[level], 2 * emb))
                block_in = ch * mult[level]
                if res in s["attn_resolutions"]:
                    d.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                d.downsample = Resample(block_in, s["resamp_with_conv"], down=True)
                res //= 2
            self.down.append(d)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, 2 * emb)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, 2 * emb)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            u = nn.Module()
            u.block, u.attn = nn.ModuleList(), nn.ModuleList()
            for i in range(nb + 1):
                skip = ch * (in_mult[level] if i == nb else mult[level])
                u.block.append(ResnetBlock(block_in + skip, ch * mult[level], 2 * emb))
                block_in = ch * mult[level]
                if res in s["attn_resolutions"]:
                    u.attn.append(AttnBlock(block_in))
            if level != 0:
                u.upsample = Resample(block_in, s["resamp_with_conv"], down=False)
                res *= 2
            self.up.insert(0, u)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, s["channels"], 3, 1, 1)
        self.levels, self.nb = len(mult), nb

    def forward(self, x, t, c, keep):
        temb = self.temb.dense[1](swish(self.temb.dense[0](timestep_embedding(t, self.ch))))
        cemb = self.classes_emb(c)
        cemb = torch.where(keep[:, None], cemb, self.null_classes_emb[None, :].expand_as(cemb))
        cemb = self.cemb.dense[1](swish(self.cemb.dense[0](cemb)))
        hs = [self.conv_in(x)]
        for level in range(self.levels):
            d = self.down[level]
            for i in range(self.nb):
                h = d.block[i](hs[-1], temb, cemb)
                if len(d.attn) > 0:
                    h = d.attn[i](h)
                hs.append(h)
            if level != self.levels - 1:
                hs.append(d.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb, cemb)), temb, cemb)
        for level in reversed(range(self.levels)):
            u = self.up[level]
            for i in range(self.nb + 1):
                h = u.block[i](torch.cat([h, hs.pop()], dim=1), temb, cemb)
                if len(u.attn) > 0:
                    h = u.attn[i](h)
            if level != 0:
                h = u.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

    def guided(self, x, t, c, w):
        cond = self(x, t, c, torch.ones_like(c, dtype=torch.bool))
        uncond = self(x, t, c, torch.zeros_like(c, dtype=torch.bool))
        return (1 + w) * cond - w * uncond


def make(out, spec):
    torch.manual_seed(11)
    model = Unet(spec).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    n, r = 4, spec["resolution"]
    x = torch.randn(n, spec["channels"], r, r)
    t = torch.tensor([0, 999, 500, 17], dtype=torch.float32)
    c = torch.randint(0, spec["classes"], (n,))
    keep = torch.tensor([True, False, True, True])
    with torch.no_grad():
        y = model(x, t, c, keep)
        g = model.guided(x, t, c, GUIDANCE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/unet.safetensors")
    save_file({"x": x, "t": t, "c": c, "keep": keep.to(torch.uint8), "y": y, "g": g},
              f"{out}/unet.io.safetensors")


def ckpt(out, spec):
    torch.manual_seed(12)
    model = torch.nn.DataParallel(Unet(spec))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ema = {k: v.detach().clone() + 0.01 for k, v in model.named_parameters()}
    torch.save([model.state_dict(), opt.state_dict(), 7, ema], f"{out}/ckpt.pth")
    strip = lambda d: {k.removeprefix("module."): v.contiguous() for k, v in d.items()}
    save_file(strip(model.state_dict()), f"{out}/raw.safetensors")
    save_file(strip(ema), f"{out}/ema.safetensors")


def check(out, spec):
    model = Unet(spec).eval()
    model.load_state_dict(load_file(f"{out}/unet.sfron.safetensors"), strict=True)
    io = load_file(f"{out}/unet.sfron_io.safetensors")
    with torch.no_grad():
        y = model(io["x"], io["t"], io["c"], io["keep"].bool())
    print(json.dumps({"diff": (y - io["y"]).abs().max().item(), "scale": io["y"].abs().max().item()}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    spec = json.loads(sys.argv[3])
    GROUPS[0] = spec.get("groups", 32)
    {"make": make, "check": check, "ckpt": ckpt}[sys.argv[1]](sys.argv[2], spec)
