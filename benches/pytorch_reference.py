#!/usr/bin/env python3
"""PyTorch reference for `cargo bench`: the same small CNN and AW-Net (router, weight-varied
convolutions, MixBN), the same workloads on the same bundled Fashion-MNIST images, on 2 threads.

  python3 benches/pytorch_reference.py          # a table
  python3 benches/pytorch_reference.py --json   # what cargo bench reads
"""
import gzip
import json
import os
import resource
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))
SUBSET = os.path.join(HERE, "..", "assets", "fashion-mnist-subset")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


class MixBN(nn.Module):
    def __init__(self, c, mix):
        super().__init__()
        self.mix = mix
        self.clean = nn.BatchNorm2d(c)
        self.adv = nn.BatchNorm2d(c) if mix else None

    def forward(self, z, batch_type, p_clean):
        if not self.mix:
            return self.clean(z)
        if self.training:
            return self.clean(z) if batch_type == 0 else self.adv(z)
        p = p_clean.view(-1, 1, 1, 1)
        return p * self.clean(z) + (1 - p) * self.adv(z)


class Net(nn.Module):
    """The small CNN of src/model/small_cnn.rs; with `awnet`, the router of src/model/router.rs."""

    def __init__(self, awnet, w=32, classes=10):
        super().__init__()
        self.awnet = awnet
        self.stem = nn.Conv2d(1, w, 3, 1, 1, bias=False)
        self.stem_bn = MixBN(w, awnet)
        plan = [(w, w, True), (w, 2 * w, False), (2 * w, 2 * w, True)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 1, 1, bias=False) for a, b, _ in plan)
        self.bns = nn.ModuleList(MixBN(b, awnet) for _, b, _ in plan)
        self.pools = [p for _, _, p in plan]
        self.fc = nn.Linear(2 * w, classes)
        if awnet:
            self.features = nn.ModuleList([nn.Conv2d(1, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1)])
            self.type_head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
            self.heads = nn.ModuleList(nn.Linear(64, b) for _, b, _ in plan)
            for h in self.heads:
                nn.init.zeros_(h.weight)
                nn.init.zeros_(h.bias)

    def forward(self, x, batch_type=0):
        type_logits, signals, p = None, None, None
        if self.awnet:
            h = x
            for c in self.features:
                h = F.relu(c(h))
            f = h.mean((2, 3))
            type_logits = self.type_head(f)
            signals = [2 * torch.sigmoid(hd(f)) for hd in self.heads]
            p = F.softmax(type_logits, 1)[:, 0]
        h = F.relu(self.stem_bn(self.stem(x), batch_type, p))
        for j, (c, bn, pool) in enumerate(zip(self.convs, self.bns, self.pools)):
            z = c(h)
            if signals is not None:
                z = z * signals[j][:, :, None, None]
            h = F.relu(bn(z, batch_type, p))
            if pool:
                h = F.max_pool2d(h, 2)
        return self.fc(h.mean((2, 3))), type_logits


sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from make_resnet18_fixture import ResNet18 as CifarResNet18  # noqa: E402 (the fixtures' model)


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 of src/model/resnet.rs (width 64), returning (logits, None) like Net."""

    def __init__(self):
        super().__init__()
        self.net = CifarResNet18(width=64)

    def forward(self, x, batch_type=0):
        return self.net(x), None


def pgd(model, x, y, eps, steps, alpha, start):
    was = model.training
    model.eval()
    adv = torch.clamp(start, 0, 1).detach()
    adv = torch.min(torch.max(adv, x - eps), x + eps)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv)[0], y, reduction="sum")
        g, = torch.autograd.grad(loss, adv)
        adv = torch.clamp(torch.min(torch.max(adv.detach() + alpha * g.sign(), x - eps), x + eps), 0, 1)
    model.train(was)
    return adv.detach()


def kl(t, s):
    return (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()


def timed(warmup, runs, f):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def alternate(runs, f):
    """The median over `runs` pairs of f(1)'s time over f(0)'s, called in turn (as the bench's
    `alternate`)."""
    f(0)
    f(1)
    ratios = []
    for _ in range(runs):
        t = []
        for k in (0, 1):
            s = time.perf_counter()
            f(k)
            t.append(time.perf_counter() - s)
        ratios.append(t[1] / t[0])
    return sorted(ratios)[len(ratios) // 2]


def main():
    (n, h, w), images = read_idx(os.path.join(SUBSET, "t10k-images-idx3-ubyte.gz"))
    _, labels = read_idx(os.path.join(SUBSET, "t10k-labels-idx1-ubyte.gz"))
    data = torch.tensor(list(images), dtype=torch.float32).view(n, 1, h, w) / 255.0
    lab = torch.tensor(list(labels), dtype=torch.long)
    x, y = data[:128], lab[:128]
    torch.manual_seed(0)
    out = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}
    for key, aw in [("infer_static", False), ("infer_awnet", True)]:
        m = Net(aw).eval()
        with torch.no_grad():
            out[key] = 128 / timed(2, 7, lambda: m(x))
    nets = [Net(False).eval(), Net(True).eval()]

    def infer(k):
        with torch.no_grad():
            nets[k](x)
    out["awnet_overhead_infer"] = alternate(15, infer)
    nets = [Net(False).train(), Net(True).train()]

    def train(k):
        nets[k].zero_grad(set_to_none=True)
        F.cross_entropy(nets[k](x)[0], y).backward()
    out["awnet_overhead_train"] = alternate(15, train)
    teachers = [Net(False).eval(), Net(False).eval()]
    for key, method, runs in [("train_standard", "standard", 7), ("train_pgd_at", "pgd-at", 3), ("train_awnet", "awnet", 3)]:
        m = Net(method == "awnet").train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad()
            if method == "standard":
                loss = F.cross_entropy(m(x)[0], y)
            elif method == "pgd-at":
                adv = pgd(m, x, y, 0.1, 10, 0.025, x + torch.empty_like(x).uniform_(-0.1, 0.1))
                loss = F.cross_entropy(m(adv, 1)[0], y)
            else:
                adv = pgd(m, x, y, 0.1, 10, 0.025, x + 0.001 * torch.randn_like(x))
                with torch.no_grad():
                    tn, ta = teachers[0](x)[0], teachers[1](adv)[0]
                sn, tyn = m(x, 0)
                sa, tya = m(adv, 1)
                types = 0.5 * (F.cross_entropy(tyn, torch.zeros_like(y)) + F.cross_entropy(tya, torch.ones_like(y)))
                loss = 0.5 * kl(tn, sn) + 0.5 * kl(ta, sa) + types
            loss.backward()
            opt.step()
        out[key] = 128 / timed(1, runs, step)
    for key, c_in, c_out, size, stride in [("conv", 32, 64, 14, 1), ("conv28", 32, 32, 28, 1),
                                           ("conv_router", 16, 32, 28, 2)]:
        cx = torch.randn(128, c_in, size, size)
        cw = 0.1 * torch.randn(c_out, c_in, 3, 3)
        o = (size - 1) // stride + 1
        flop = 2 * 128 * c_out * o * o * c_in * 9
        with torch.no_grad():
            out[key + "_fwd_gflops"] = flop / timed(2, 9, lambda: F.conv2d(cx, cw, stride=stride, padding=1)) / 1e9
        cx.requires_grad_(True)
        cw.requires_grad_(True)

        def conv_both():
            F.conv2d(cx, cw, stride=stride, padding=1).sum().backward()
        out[key + "_fwd_bwd_gflops"] = 3 * flop / timed(2, 9, conv_both) / 1e9
    a = torch.randn(2048, 2048)
    with torch.no_grad():
        out["gemm_gflops"] = 2 * 2048 ** 3 / timed(1, 7, lambda: a @ a) / 1e9
    xr = F.pad(x[:32], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    yr = y[:32]
    m = ResNet18().eval()
    with torch.no_grad():
        out["resnet18_infer"] = 32 / timed(1, 5, lambda: m(xr))
    eps = 8 / 255
    for key, method, runs in [("resnet18_train_standard", "standard", 3), ("resnet18_train_pgd_at", "pgd-at", 2)]:
        m = ResNet18().train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def rstep():
            opt.zero_grad()
            if method == "standard":
                loss = F.cross_entropy(m(xr)[0], yr)
            else:
                adv = pgd(m, xr, yr, eps, 10, eps / 4, xr + torch.empty_like(xr).uniform_(-eps, eps))
                loss = F.cross_entropy(m(adv)[0], yr)
            loss.backward()
            opt.step()
        out[key] = 32 / timed(1, runs, rstep)
    m = Net(True).eval()
    one, y1 = x[:1], y[:1]
    out["pgd20_one_image_ms"] = 1000 * timed(2, 11, lambda: pgd(m, one, y1, 0.1, 20, 0.0125, one + torch.empty_like(one).uniform_(-0.1, 0.1)))

    def eval_1000():
        for i in range(0, 1000, 128):
            xb, yb = data[i:i + 128], lab[i:i + 128]
            adv = pgd(m, xb, yb, 0.1, 20, 0.0125, xb + torch.empty_like(xb).uniform_(-0.1, 0.1))
            with torch.no_grad():
                m(adv)[0].argmax(1)
    out["pgd20_eval_1000_s"] = timed(0, 1, eval_1000)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "--json" in sys.argv:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<24} {v}")


if __name__ == "__main__":
    main()
