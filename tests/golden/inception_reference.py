#!/usr/bin/env python3
"""PyTorch reference of the FID Inception (tests/inception.rs runs it):
pytorch-fid's InceptionV3 with its defaults (output block 3 = the 2048-d
pool3 features, resize_input, normalize_input, use_fid_inception), on
RANDOM weights, nothing downloaded.

  inception_reference.py DIR   writes DIR/fid_inception.safetensors (the
                      state_dict under torchvision's Inception3 names, with
                      fc.weight [1008, 2048], fc.bias and
                      num_batches_tracked, as pytorch-fid's weights file)
                      and DIR/fid_inception.io.safetensors:
                        rgb   uint8 [3, 3, 32, 32]   images
                        gray  uint8 [2, 1, 28, 28]   images (repeated to 3
                                                     channels first)
                        y_rgb, y_gray  float32 [N, 2048]  the features
                        pad_rgb  the first RGB image's features with
                                 count_include_pad=True in the average
                                 pools (torchvision's)
                        avg_rgb  the same with Mixed_7c's pool branch
                                 averaging (torchvision's) instead of max
                      prints one JSON line saying which FID blocks ran.

The network is torchvision's inception_v3(weights=None, aux_logits=False,
init_weights=False, num_classes=1008) with Mixed_5b..7c replaced by
pytorch-fid's FIDInceptionA/C/E_1/E_2, as pytorch_fid.inception
.fid_inception_v3 builds it. When pytorch-fid is installed its classes are
used, and its own InceptionV3 module computes y_rgb and y_gray (its weight
download replaced by this random state_dict), checked against the forward
below; otherwise the four classes are the faithful copies below (of
pytorch-fid 0.3.0's inception.py; launch/setup does not install it).

Random weights: torchvision's default conv init (kaiming uniform), random
BatchNorm affine parameters, and running statistics calibrated on other
random images like the test's (one train-mode pass with momentum 1, so
every layer's activations are of order 1 through the depth) then perturbed
per channel (variance x U(0.7, 1.4), mean + 0.1 sd N(0, 1)), so no
BatchNorm is an identity or exactly normalises the test images.
"""

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

try:
    import pytorch_fid.inception as pfid

    FIDInceptionA, FIDInceptionC = pfid.FIDInceptionA, pfid.FIDInceptionC
    FIDInceptionE_1, FIDInceptionE_2 = pfid.FIDInceptionE_1, pfid.FIDInceptionE_2
    SOURCE = "pytorch_fid"
except ImportError:
    pfid = None
    SOURCE = "vendored copy of pytorch_fid 0.3.0"

    class FIDInceptionA(InceptionA):
        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            # TensorFlow's average pool: the padded zeros are not counted.
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)

    class FIDInceptionC(InceptionC):
        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            branch7x7dbl = self.branch7x7dbl_1(x)
            branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
            branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
            branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
            branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)

    def _e_branches(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return branch1x1, branch3x3, branch3x3dbl

    class FIDInceptionE_1(InceptionE):
        def forward(self, x):
            branch1x1, branch3x3, branch3x3dbl = _e_branches(self, x)
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)

    class FIDInceptionE_2(InceptionE):
        def forward(self, x):
            branch1x1, branch3x3, branch3x3dbl = _e_branches(self, x)
            # The FID Inception max-pools here.
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


def fid_inception(a=FIDInceptionA, c=FIDInceptionC, e1=FIDInceptionE_1, e2=FIDInceptionE_2):
    """pytorch_fid.inception.fid_inception_v3 without its weights."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = a(192, pool_features=32)
    net.Mixed_5c = a(256, pool_features=64)
    net.Mixed_5d = a(288, pool_features=64)
    net.Mixed_6b = c(768, channels_7x7=128)
    net.Mixed_6c = c(768, channels_7x7=160)
    net.Mixed_6d = c(768, channels_7x7=160)
    net.Mixed_6e = c(768, channels_7x7=192)
    net.Mixed_7b = e1(1280)
    net.Mixed_7c = e2(2048)
    return net


def blocks(net):
    """pytorch_fid.inception.InceptionV3's blocks 0..3."""
    return nn.Sequential(
        net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
        net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
        net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)),
    )


def prepare(images):
    """uint8 [N, C, H, W] as pytorch-fid's input: ToTensor's /255 (one
    channel repeated to three), then InceptionV3.forward's resize and 2x - 1."""
    x = images.float().div(255)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


def features(net, images):
    return blocks(net)(prepare(images)).squeeze(3).squeeze(2)


def randomise(net):
    """See the module docstring."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0
        net.train()
        # Other images like the test's.
        features(net, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
        net.eval()
        for bn in bns:
            sd = bn.running_var.sqrt()
            bn.running_var.mul_(torch.empty_like(sd).uniform_(0.7, 1.4))
            bn.running_mean.add_(0.1 * sd * torch.randn_like(sd))


def main(out):
    torch.manual_seed(20151205)
    net = fid_inception()
    randomise(net)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, f"{out}/fid_inception.safetensors")

    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        y_rgb, y_gray = features(net, rgb), features(net, gray)
        if pfid is not None:
            # pytorch-fid's own module, its download replaced by our weights.
            pfid.load_state_dict_from_url = lambda *a, **k: state
            model = pfid.InceptionV3([3]).eval()
            for images, ours in ((rgb, y_rgb), (gray, y_gray)):
                x = images.float().div(255)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                theirs = model(x)[0].squeeze(3).squeeze(2)
                assert torch.equal(theirs, ours), "the forward here is not pytorch-fid's"
        # The two places where torchvision's Inception3 differs, one at a time.
        pad = fid_inception(a=InceptionA, c=InceptionC, e1=InceptionE)
        pad.load_state_dict(state)
        pad.eval()
        avg = fid_inception(e2=FIDInceptionE_1)
        avg.load_state_dict(state)
        avg.eval()
        pad_rgb, avg_rgb = features(pad, rgb[:1]), features(avg, rgb[:1])

    save_file(
        {"rgb": rgb, "gray": gray, "y_rgb": y_rgb, "y_gray": y_gray, "pad_rgb": pad_rgb, "avg_rgb": avg_rgb},
        f"{out}/fid_inception.io.safetensors",
    )
    print(json.dumps({"fid_blocks": SOURCE, "scale": float(y_rgb.abs().max())}))


if __name__ == "__main__":
    # One thread: a second one only waits when the other core is busy (a
    # build beside the tests); tests/inception.rs varies its own count.
    torch.set_num_threads(1)
    main(sys.argv[1])
