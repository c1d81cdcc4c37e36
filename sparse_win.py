"""sparse_win: sparse adversarial training, after "Sparsity Winning Twice" (Chen et al., ICLR 2022).

Paper: arXiv:2202.09844. PGD adversarial training (AT) of a *sparse* network narrows the
robust generalization gap and robust overfitting while saving training and inference FLOPs.

    Robust Bird (RB, --mode static)    early-bird ticket from cheap standard training, then AT
                                       of that fixed sparse subnetwork (paper Sec. 3.1)
    Flying Bird (FB, --mode dynamic)   random sparse start; every T steps prune the smallest
                                       |w| and regrow as many, constant density (Sec. 3.2)
    Flying Bird+ (--mode dynamic+)     FB plus extra pruning when the robust gap widens and
                                       extra growth when val adversarial loss stalls (Sec. 3.2)
    dense AT (--mode dense)            the baseline

Symbols, as in the paper:  eps (attack budget), alpha (attack step size), K (attack steps),
d = 1 - sparsity (density), p (death rate, cosine 0.5 -> 0.005), T (update interval,
900 then 1200 steps), window 4 / prune ratio 0.4 / growth ratio 0.05 / threshold 0.5 (FB+).

Sections, in the order the data flows:
    config -> data -> models -> attack (pgd, evaluate) -> masks (SparseMask, FlyingBirdPlus)
    -> early bird (EarlyBird) -> FLOPs (layer_flops, FlopLedger) -> train -> report -> main

Run:     python sparse_win.py --dataset cifar100 --mode dynamic --sparsity 0.9
         python sparse_win.py --preset cpu-demo          # Fashion-MNIST, minutes on a CPU
Import:  from sparse_win import SparseMask, pgd, evaluate, layer_flops, FlopLedger
         (library parts need torch only; torchvision/tqdm/matplotlib are imported where used)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

MODES = ("dense", "static", "dynamic", "dynamic+")
ARCHS = ("resnet18", "preact_resnet18", "vgg16", "wrn")
ALLOCATIONS = ("igq", "erk", "uniform")


class SparseWinError(ValueError):
    """Bad input: the CLI prints it as one line and exits with status 2."""


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Every option of a run. The CLI is generated from these fields (--field-name)."""
    preset: str = opt("", "start from a preset (cpu-demo, smoke); explicit flags override it")
    dataset: str = opt("cifar10", "cifar10 | cifar100 | tiny-imagenet | fashion-mnist")
    data_dir: str = opt("./data", "where datasets live (torchvision layout; Tiny-ImageNet: official layout)")
    download: bool = opt(True, "download CIFAR / Fashion-MNIST through torchvision when missing")
    arch: str = opt("resnet18", "resnet18 | preact_resnet18 | vgg16 | wrn (WideResNet)")
    width: float = opt(1.0, "width multiplier (1.0 = paper; 0.25 = 16 base channels for CPU runs)")
    wrn_depth: int = opt(34, "WideResNet depth (6n+4)")
    wrn_widen: int = opt(10, "WideResNet widen factor")
    mode: str = opt("dense", "dense | static (Robust Bird) | dynamic (Flying Bird) | dynamic+ (Flying Bird+)")
    sparsity: float = opt(0.8, "fraction of conv+linear weights that are zero, s = 1 - d, in [0, 1)")
    allocation: str = opt("igq", "layer-wise density for FB/FB+: igq (released default) | erk | uniform")
    growth: str = opt("random", "FB regrowth: random (released default) | gradient (RigL-style)")
    death_rate: float = opt(0.5, "p at step 0; cosine decay to --death-rate-final (Sec. 3.2)")
    death_rate_final: float = opt(0.005, "p at the last step")
    update_interval: int = opt(900, "T: steps between topology updates in the first half of training")
    update_interval_late: int = opt(1200, "T in the second half of training")
    fbplus_start: int = opt(-1, "FB+: first epoch of adaptive pruning/growth (-1 = epochs // 2)")
    fbplus_window: int = opt(4, "FB+: number of consecutive differences looked at")
    fbplus_prune: float = opt(0.4, "FB+: extra prune ratio (extra = ceil(p * ratio * nnz))")
    fbplus_grow: float = opt(0.05, "FB+: extra growth ratio (grow (1 + ratio) x the pruned count)")
    fbplus_threshold: float = opt(0.5, "FB+: fraction of the window that must agree")
    eb_threshold: float = opt(0.08, "RB: mask distance below which the early bird has emerged")
    eb_queue: int = opt(5, "RB: FIFO length of recent ticket masks")
    eb_max_epochs: int = opt(50, "RB: cap on stage-1 (standard training) epochs")
    epochs: int = opt(200, "adversarial training epochs")
    batch_size: int = opt(128, "minibatch size")
    lr: float = opt(0.1, "SGD learning rate")
    milestones: tuple = opt((100, 150), "epochs where lr is multiplied by 0.1", nargs="+", type=int)
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay")
    norm: str = opt("linf", "attack norm: linf | l2")
    train_eps: float = opt(-1.0, "training eps in 1/255 units (-1 = dataset default: 8, Fashion-MNIST 25.5)")
    train_alpha: float = opt(-1.0, "training step size in 1/255 units (-1 = eps / 4)")
    train_steps: int = opt(10, "training PGD steps K (PGD-10)")
    test_eps: float = opt(-1.0, "evaluation eps in 1/255 units (-1 = train eps)")
    test_alpha: float = opt(-1.0, "evaluation step size in 1/255 units (-1 = eps / 4)")
    test_steps: int = opt(20, "evaluation PGD steps (PGD-20)")
    train_subset: int = opt(0, "use only the first N training images (0 = all)")
    eval_subset: int = opt(0, "evaluate on the first N val/test images (0 = all)")
    gap_subset: int = opt(5000, "training images for the final robust generalization gap (0 = all)")
    device: str = opt("auto", "auto | cpu | cuda")
    seed: int = opt(0, "seed of every random draw (data order, augmentation, attack starts, masks)")
    out: str = opt("", "run directory (default runs/<dataset>-<mode>-s<sparsity>-seed<seed>)")
    resume: bool = opt(False, "continue the run in --out from its last.pt")
    stop_after_epoch: int = opt(0, "stop after this epoch and keep last.pt, e.g. for time-limited jobs (0 = never)")
    amp: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = opt(False, "torch.compile the model (CUDA)")
    channels_last: bool = opt(True, "channels_last memory format on CUDA")
    progress: bool = opt(True, "progress bar within each epoch (tqdm)")
    benchmark: bool = opt(False, "print PGD-10 AT throughput for dense and sparse models, then exit")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def eps(self, train: bool) -> tuple[float, float]:
        """(eps, alpha) in pixel units for the training or evaluation attack."""
        eps = self.train_eps if self.train_eps > 0 else DATASETS[self.dataset]["eps"]
        alpha = self.train_alpha
        if not train:
            eps, alpha = (self.test_eps if self.test_eps > 0 else eps), self.test_alpha
        alpha = alpha if alpha > 0 else eps / 4
        return eps / 255, alpha / 255

    @property
    def fbplus_start_epoch(self) -> int:
        return self.fbplus_start if self.fbplus_start >= 0 else self.epochs // 2

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}-{self.mode}-s{self.sparsity:g}-seed{self.seed}")


PRESETS = {
    # Fashion-MNIST, 16-channel ResNet-18, PGD-5: every part of FB+ in a few minutes on 2 cores.
    "cpu-demo": dict(dataset="fashion-mnist", width=0.25, mode="dynamic+", sparsity=0.8, epochs=6,
                     milestones=(4, 5), train_steps=5, test_steps=10, train_subset=3000,
                     eval_subset=500, gap_subset=500, update_interval=20, update_interval_late=25,
                     eb_max_epochs=3, batch_size=128, lr=0.05),
    # A few steps of everything, for run_experiments.sh --smoke and the tests.
    "smoke": dict(dataset="fashion-mnist", width=0.0625, epochs=2, milestones=(1,), train_steps=2,
                  test_steps=2, train_subset=256, eval_subset=64, gap_subset=64, update_interval=2,
                  update_interval_late=3, eb_max_epochs=2, batch_size=64, progress=False),
}


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise SparseWinError(msg)
    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    need(cfg.mode in MODES, f"unknown mode {cfg.mode!r}; choose from {', '.join(MODES)}")
    need(cfg.arch in ARCHS, f"unknown arch {cfg.arch!r}; choose from {', '.join(ARCHS)}")
    need(cfg.allocation in ALLOCATIONS, f"unknown allocation {cfg.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    need(cfg.growth in ("random", "gradient"), f"unknown growth {cfg.growth!r}; choose random or gradient")
    need(cfg.norm in ("linf", "l2"), f"unknown norm {cfg.norm!r}; choose linf or l2")
    need(cfg.device in ("auto", "cpu", "cuda"), f"unknown device {cfg.device!r}; choose auto, cpu or cuda")
    need(0 <= cfg.sparsity < 1, f"--sparsity must be in [0, 1), got {cfg.sparsity}")
    need(cfg.width > 0, f"--width must be positive, got {cfg.width}")
    need(cfg.epochs > 0 and cfg.batch_size > 0, "--epochs and --batch-size must be positive")
    need(cfg.update_interval > 0 and cfg.update_interval_late > 0, "update intervals must be positive")
    need(cfg.train_steps >= 0 and cfg.test_steps >= 0, "attack steps must be >= 0")
    need(0 <= cfg.death_rate_final <= cfg.death_rate < 1, "need 0 <= --death-rate-final <= --death-rate < 1")
    need(cfg.arch != "wrn" or (cfg.wrn_depth - 4) % 6 == 0, "--wrn-depth must be 6n+4 (e.g. 34)")
    need(cfg.fbplus_window >= 1 and cfg.eb_queue >= 2, "need --fbplus-window >= 1 and --eb-queue >= 2")
    need(min(cfg.train_subset, cfg.eval_subset, cfg.gap_subset) >= 0, "subset sizes must be >= 0 (0 = all)")
    if cfg.device == "cuda":
        need(torch.cuda.is_available(), "--device cuda asked for, but torch sees no CUDA device")
    return cfg


# ----------------------------------------------------------------------------- data

DATASETS = {  # per-channel mean/std (PAPER_SPEC Sec. 2), default eps in 1/255 units
    "cifar10": dict(classes=10, channels=3, size=32, eps=8.0, rotate=0.0,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(classes=100, channels=3, size=32, eps=8.0, rotate=15.0,  # paper: +15 deg rotation
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": dict(classes=200, channels=3, size=64, eps=8.0, rotate=0.0,
                          mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
    "fashion-mnist": dict(classes=10, channels=1, size=28, eps=25.5, rotate=0.0,  # eps 0.1
                          mean=(0.2860,), std=(0.3530,)),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def split_last(x, y, n_val):
    """(train, val): the last n_val examples are validation (CIFAR: last 5,000 of 50,000)."""
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def load_cifar(name: str, root: str, download: bool = False):
    """CIFAR-10/100 as uint8 (N, 3, 32, 32) tensors: train 45,000 / val 5,000 / test 10,000."""
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        parts = [cls(root, train=t, download=download) for t in (True, False)]
    except Exception as e:  # offline download failure, missing or corrupt files
        folder = Path(root) / cls.base_folder
        files = "data_batch_1..5, test_batch" if name == "cifar10" else "train, test"
        why = (str(e).splitlines() or [""])[0][:80]
        raise SparseWinError(f"{name} not found in {folder} ({type(e).__name__}: {why}); "
                             f"put the python-version files ({files}) there, or run online with --download")
    (x, y), (xt, yt) = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(d.targets, dtype=torch.long)) for d in parts]
    train, val = split_last(x, y, len(x) // 10)
    return dict(train=train, val=val, test=(xt, yt))


def _read_idx(path) -> torch.Tensor:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 tensor."""
    import gzip
    data = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(root: str, download: bool = False, debian_dir: str = DEBIAN_FASHION_MNIST):
    """Fashion-MNIST (N, 1, 28, 28): train 54,000 / val 6,000 / test 10,000.

    Looks in root (torchvision layout), then in Debian's dataset-fashion-mnist package, then
    downloads through torchvision.
    """
    names = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
    for folder in (Path(root) / "FashionMNIST" / "raw", Path(debian_dir)):
        paths = {(s, k): next((p for p in (folder / (names[s].format(k, n)),
                                           folder / (names[s].format(k, n) + ".gz")) if p.exists()), None)
                 for s in names for k, n in (("images", 3), ("labels", 1))}
        if all(paths.values()):
            xs = {s: _read_idx(paths[s, "images"]).unsqueeze(1) for s in names}
            ys = {s: _read_idx(paths[s, "labels"]).long() for s in names}
            train, val = split_last(xs["train"], ys["train"], len(ys["train"]) // 10)
            return dict(train=train, val=val, test=(xs["test"], ys["test"]))
    if download:
        from torchvision import datasets
        try:
            for t in (True, False):
                datasets.FashionMNIST(root, train=t, download=True)
        except Exception as e:
            raise SparseWinError(f"fashion-mnist not found in {root}/FashionMNIST/raw or {debian_dir}, and the "
                                 f"download failed ({type(e).__name__}); install Debian's dataset-fashion-mnist "
                                 f"or put the four IDX files in {root}/FashionMNIST/raw")
        return load_fashion_mnist(root, download=False, debian_dir=debian_dir)
    raise SparseWinError(f"fashion-mnist not found in {root}/FashionMNIST/raw or {debian_dir}; install "
                         f"Debian's dataset-fashion-mnist or put the four IDX files there")


def load_tiny_imagenet(root: str):
    """Tiny-ImageNet from its official layout: train 90,000 / val 10,000 (fixed permutation) / test 10,000.

    root (or root/tiny-imagenet-200) holds train/<wnid>/images/*.JPEG and
    val/images/*.JPEG with val/val_annotations.txt; the official val set is our test set.
    """
    from PIL import Image
    base = next((b for b in (Path(root) / "tiny-imagenet-200", Path(root)) if (b / "train").is_dir()), None)
    if base is None or not (base / "val" / "val_annotations.txt").exists():
        raise SparseWinError(f"tiny-imagenet not found in {root}: put the official tiny-imagenet-200 folder "
                             f"there (train/<wnid>/images/*.JPEG, val/images/, val/val_annotations.txt)")
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    label = {w: i for i, w in enumerate(wnids)}

    def read(paths):
        return torch.stack([torch.frombuffer(bytearray(Image.open(p).convert("RGB").tobytes()), dtype=torch.uint8)
                            .view(64, 64, 3).permute(2, 0, 1) for p in paths])
    train = [(p, label[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    ann = [line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines() if line]
    test = [(base / "val" / "images" / f, label[w]) for f, w in ann]
    x, y = read([p for p, _ in train]), torch.tensor([c for _, c in train])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed, seed-independent split
    x, y = x[perm], y[perm]
    train_split, val = split_last(x, y, len(x) // 10)
    return dict(train=train_split, val=val, test=(read([p for p, _ in test]), torch.tensor([c for _, c in test])))


def load_data(cfg: Config) -> dict:
    """{'train'|'val'|'test': (uint8 images (N, C, H, W), int64 labels)} on the CPU."""
    if cfg.dataset in ("cifar10", "cifar100"):
        return load_cifar(cfg.dataset, cfg.data_dir, cfg.download)
    if cfg.dataset == "tiny-imagenet":
        return load_tiny_imagenet(cfg.data_dir)
    return load_fashion_mnist(cfg.data_dir, cfg.download)


def augment(x: torch.Tensor, *, pad: int = 4, flip: bool = True, rotate: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip, rotation (degrees) of a float batch, on its device."""
    B, C, H, W = x.shape
    dev = x.device
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy, ox = torch.randint(0, 2 * pad + 1, (2, B, 1), device=dev, generator=generator)
        rows = (oy + torch.arange(H, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox + torch.arange(W, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        x = padded[torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None],
                   rows, cols]
    if flip:
        x = torch.where(torch.rand(B, 1, 1, 1, device=dev, generator=generator) < 0.5, x.flip(3), x)
    if rotate:
        a = (torch.rand(B, device=dev, generator=generator) * 2 - 1) * math.radians(rotate)
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), torch.zeros_like(a)], 1),
                             torch.stack([a.sin(), a.cos(), torch.zeros_like(a)], 1)], 1)  # (B, 2, 3)
        x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    return x


class Batches:
    """Minibatches of a uint8 dataset held on one device; order and augmentation drawn there.

    No DataLoader: the whole split sits on the GPU (CIFAR train is 138 MB as uint8), so the
    step never waits on host workers.
    """

    def __init__(self, x, y, *, batch_size, shuffle=False, augmentation=None, generator=None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augmentation, self.generator = shuffle, augmentation, generator

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n, dev = len(self.y), self.y.device
        order = torch.randperm(n, device=dev, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size] if order is not None else slice(i, i + self.batch_size)
            x = self.x[idx].float().div_(255)
            if self.augmentation is not None:
                x = augment(x, **self.augmentation, generator=self.generator)
            yield x, self.y[idx]


# ----------------------------------------------------------------------------- models

class Normalize(nn.Module):
    """Per-channel normalization inside the model, so attacks work on pixels in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """ResNet v1 block: conv-bn-relu-conv-bn, plus (projected) shortcut, relu."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016), also the WideResNet block: bn-relu-conv twice."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool; stages halve the resolution."""

    def __init__(self, *, block, num_blocks, widths, stem, num_classes, in_channels, mean, std):
        super().__init__()
        self.preact = block is PreActBlock
        self.normalize = Normalize(mean, std)
        self.conv1 = conv3x3(in_channels, stem)
        self.bn1 = nn.Identity() if self.preact else nn.BatchNorm2d(stem)
        blocks, cin = [], stem
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            for j in range(n):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(cin) if self.preact else nn.Identity()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):  # x: (B, C, H, W) pixels in [0, 1]
        out = self.bn1(self.conv1(self.normalize(x)))
        out = self.layers(out if self.preact else F.relu(out))
        if self.preact:
            out = F.relu(self.bn_final(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))  # (B, classes)


class VGG(nn.Module):
    """VGG-16 with BN; pools use ceil_mode so 28x28 inputs work too (28-14-7-4-2-1)."""
    CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, *, num_classes, in_channels, width, mean, std):
        super().__init__()
        layers, cin = [Normalize(mean, std)], in_channels
        for v in self.CFG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                cout = max(1, round(v * width))
                layers += [conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build_model(arch: str, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                mean=(0.5,), std=(0.5,), wrn_depth: int = 34, wrn_widen: int = 10) -> nn.Module:
    """resnet18 | preact_resnet18 | vgg16 | wrn; width multiplies every channel count."""
    w = lambda c: max(1, round(c * width))  # noqa: E731
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if arch in ("resnet18", "preact_resnet18"):
        block = BasicBlock if arch == "resnet18" else PreActBlock
        return ResNet(block=block, num_blocks=(2, 2, 2, 2), widths=[w(c) for c in (64, 128, 256, 512)],
                      stem=w(64), **common)
    if arch == "vgg16":
        return VGG(width=width, **common)
    if arch == "wrn":  # Zagoruyko & Komodakis 2016: 3 groups of (depth-4)/6 pre-activation blocks
        n = (wrn_depth - 4) // 6
        return ResNet(block=PreActBlock, num_blocks=(n, n, n), widths=[w(c * wrn_widen) for c in (16, 32, 64)],
                      stem=w(16), **common)
    raise SparseWinError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------- attack

def _project(adv, x, eps, norm):
    """Back into the eps-ball around x and into [0, 1] (same op order as torchattacks)."""
    if norm == "linf":
        delta = torch.clamp(adv - x, min=-eps, max=eps)
    else:
        delta = adv - x
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(eps / n, max=1.0)
    return torch.clamp(x + delta, min=0, max=1)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        norm: str = "linf", random_start: bool = True, generator: torch.Generator | None = None,
        loss_fn=F.cross_entropy) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) on the loss of model(x) against y.

    Serves training (model in train mode) and evaluation (eval mode): the mode is left as
    it is, and only the input gradient is computed (torch.autograd.grad), so parameters'
    .grad stay untouched and no weight-gradient FLOPs are spent. Returns detached
    adversarial inputs within the eps-ball (L-inf or L2) and [0, 1].
    """
    x = x.detach()
    adv = x.clone()
    if random_start and steps > 0:
        if norm == "linf":
            adv = adv + torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        else:  # uniform radius along a Gaussian direction, as torchattacks.PGDL2
            d = torch.empty_like(x).normal_(generator=generator)
            n = d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            r = torch.empty(len(x), *[1] * (x.dim() - 1), device=x.device).uniform_(0, 1, generator=generator)
            adv = adv + d * r / n * eps
        adv = torch.clamp(adv, min=0, max=1).detach()
    with torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(model(adv), y), adv)
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            adv = _project(adv.detach() + alpha * step, x, eps, norm).detach()
    return adv


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, eps: float, alpha: float, steps: int, norm: str = "linf",
             generator=None, autocast=nullcontext) -> dict:
    """Clean (SA) and PGD (RA) accuracy in % plus mean losses, with the model in eval mode.

    Everything runs under no_grad except pgd's input gradient; parameters get no gradient.
    """
    was_training = model.training
    model.eval()
    n, total = 0, None  # on the device: clean correct, adv correct, clean loss, adv loss (one sync at the end)
    for x, y in batches:
        with autocast():
            logits = model(x)
            adv_logits = model(pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                                   generator=generator)) if steps > 0 else logits
        batch = torch.stack([(logits.argmax(1) == y).sum().double(), (adv_logits.argmax(1) == y).sum().double(),
                             F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             F.cross_entropy(adv_logits.float(), y, reduction="sum").double()])
        total = batch if total is None else total + batch
        n += len(y)
    model.train(was_training)
    sa, ra, loss, adv_loss = (total / n).tolist() if n else [0.0] * 4
    return dict(sa=100 * sa, ra=100 * ra, loss=loss, adv_loss=adv_loss)


# ----------------------------------------------------------------------------- masks

def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights that sparsity covers: every conv and linear weight (biases, norms stay dense)."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def layer_densities(shapes: list[tuple], density: float, allocation: str = "igq") -> list[float]:
    """Layer-wise densities whose weighted mean is `density` (before rounding to counts)."""
    sizes = [math.prod(s) for s in shapes]
    target = density * sum(sizes)
    if density >= 1:
        return [1.0] * len(sizes)
    if allocation == "uniform":
        return [density] * len(sizes)
    if allocation == "igq":  # ideal gas quotas: d_l = 1 / (1 + f n_l), f by bisection (log scale)
        total = lambda f: sum(n / (1 + f * n) for n in sizes)  # noqa: E731, decreasing in f
        lo, hi = 1e-30, 1.0
        while total(hi) > target:
            hi *= 2
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if total(mid) > target else (lo, mid)
        return [1 / (1 + hi * n) for n in sizes]
    if allocation == "erk":  # Erdos-Renyi-Kernel (Evci et al. 2020): d_l ~ sum(shape) / prod(shape)
        raw = [sum(s) / math.prod(s) for s in shapes]
        dense: set[int] = set()
        while True:
            free = [i for i in range(len(sizes)) if i not in dense]
            scale = (target - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in free)
            over = {i for i in free if scale * raw[i] > 1}
            if not over:
                return [1.0 if i in dense else scale * raw[i] for i in range(len(sizes))]
            dense |= over  # capped at 1; the surplus is spread over the rest
    raise SparseWinError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")


def allocate_counts(shapes: list[tuple], density: float, allocation: str = "igq") -> list[int]:
    """Active weights per layer: they sum to max(round(density * total), layers) exactly,
    with 1 <= count <= size in every layer (largest-remainder rounding)."""
    sizes = [math.prod(s) for s in shapes]
    ideal = [d * n for d, n in zip(layer_densities(shapes, density, allocation), sizes)]
    target = min(sum(sizes), max(len(sizes), round(density * sum(sizes))))
    counts = [min(n, max(1, math.floor(v))) for v, n in zip(ideal, sizes)]
    while (diff := target - sum(counts)) != 0:
        step = 1 if diff > 0 else -1
        order = sorted(range(len(sizes)), key=lambda i: ideal[i] - counts[i], reverse=step > 0)
        for i in order:
            if diff and 1 <= counts[i] + step <= sizes[i]:
                counts[i] += step
                diff -= step
    return counts


def cosine_death_rate(step: int, total_steps: int, initial: float = 0.5, final: float = 0.005) -> float:
    """Death rate p (Sec. 3.2): cosine decay from `initial` at step 0 to `final` at total_steps."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * t))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D *view* of t in memory order: contiguous and channels_last tensors alike.

    Masks are allocated like their weights (same strides), so equal flat positions are the
    same weight whatever the memory format.
    """
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return t.view(-1)


def _like(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bool copy of mask m on p's device with p's memory layout."""
    return torch.empty_like(p, dtype=torch.bool).copy_(m)


def _smallest(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of a 1-D tensor (ties broken by position).

    A selection (kthvalue, O(n)) instead of a sort: the hot part of a topology update.
    """
    if k >= len(v):
        return torch.arange(len(v), device=v.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=v.device)
    kth = v.kthvalue(k).values
    below = (v < kth).nonzero().squeeze(1)
    ties = (v == kth).nonzero().squeeze(1)[:k - len(below)]
    return torch.cat([below, ties])


def _choose(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct integers drawn uniformly from range(n), without an O(n) permutation when k << n.

    Distinct values of i.i.d. draws form a uniformly random set given its size; a random
    k-subset of it is a uniformly random k-subset of range(n).
    """
    if 4 * k > n:
        return torch.randperm(n, generator=generator)[:k]
    picked = torch.empty(0, dtype=torch.long)
    while len(picked) < k:
        draws = torch.randint(n, (k - len(picked) + k // 8 + 16,), generator=generator)
        picked = torch.cat([picked, draws]).unique()
    return picked[torch.randperm(len(picked), generator=generator)[:k]]


class SparseMask:
    """One boolean mask per conv/linear weight of any nn.Module, and the rules that change them.

        mask = SparseMask(model, density=0.2, allocation="igq", seed=0)  # random, exact counts
        ... optimizer.step(); mask.apply(optimizer)       # after every step: weights + momentum
        mask.update(death_rate=p)                           # every T steps: prune and regrow

    Masks are bool (one byte per weight). counts[i] is the number of active weights of layer i,
    kept as a Python int so that FLOP accounting never syncs with the device.
    """

    def __init__(self, model: nn.Module, *, density: float = 1.0, allocation: str = "igq", seed: int = 0,
                 masks: dict[str, torch.Tensor] | None = None):
        self.params = prunable(model)
        self.names = list(self.params)
        # CPU generator: identical draws on every device. Topology updates index weights in memory
        # order, so a channels_last run (CUDA default) regrows other positions than a CPU run.
        self.generator = torch.Generator().manual_seed(seed)
        if masks is None:
            shapes = [tuple(self.params[n].shape) for n in self.names]
            counts = allocate_counts(shapes, density, allocation)
            masks = {}
            for name, k in zip(self.names, counts):
                shape = self.params[name].shape
                m = torch.zeros(shape.numel(), dtype=torch.bool)  # drawn in logical order: same on every layout
                m[torch.randperm(shape.numel(), generator=self.generator)[:k]] = True
                masks[name] = m.view(shape)
        self.masks = {n: _like(self.params[n], masks[n]) for n in self.names}
        self.ever_active = {n: m.clone() for n, m in self.masks.items()}
        self.steps = 0
        self._refresh()
        self.apply()

    # -- bookkeeping
    def _refresh(self):
        """Recount after a topology change; build the multipliers apply() uses."""
        self.counts = [int(self.masks[n].sum()) for n in self.names]
        self.sizes = [self.masks[n].numel() for n in self.names]
        self._build_multipliers()

    def _build_multipliers(self):
        # CUDA: one fused _foreach kernel needs masks in the weights' dtype; CPU multiplies by bool.
        self._mult = [m.to(self.params[n].dtype) if m.is_cuda else m for n, m in self.masks.items()]

    @property
    def density(self) -> float:
        return sum(self.counts) / sum(self.sizes)

    def layer_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.counts))

    def itop_rate(self) -> float:
        """In-time over-parameterization (Liu et al. 2021): fraction of weights ever active."""
        return sum(int(m.sum()) for m in self.ever_active.values()) / sum(self.sizes)

    def _state_of(self, optimizer, p) -> list[torch.Tensor]:
        """Per-weight optimizer state of p (SGD momentum, Adam moments): what must be masked too."""
        if optimizer is None:
            return []
        return [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]

    # -- every step
    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None):
        """Zero masked weights and their optimizer state (momentum), in place."""
        tensors, mults = [], []
        for name, mult in zip(self.names, self._mult):
            p = self.params[name]
            for t in [p, *self._state_of(optimizer, p)]:
                tensors.append(t)
                mults.append(mult)
        torch._foreach_mul_(tensors, mults)

    def step(self, optimizer: torch.optim.Optimizer | None = None):
        """Call after optimizer.step(): re-apply the masks and count the step."""
        self.apply(optimizer)
        self.steps += 1

    # -- every T steps
    @torch.no_grad()
    def update(self, death_rate: float, *, growth: str = "random", extra_prune: float = 0.0,
               extra_growth: float = 0.0, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Prune and regrow every layer (Flying Bird, Sec. 3.2).

        Per layer with nnz active weights: prune k = ceil(p * nnz) active weights of smallest
        |w|, and regrow k positions that were inactive before this update, at random or by
        largest |grad| (RigL; uses p.grad). FB+: prune ceil(p * extra_prune * nnz) more, and
        regrow k + ceil(extra_growth * k). Regrown weights and their momentum start at zero.
        Returns {'pruned': n, 'grown': n} over all layers.
        """
        pruned = grown = 0
        for i, name in enumerate(self.names):
            p, mask = self.params[name], _flat(self.masks[name])
            nnz, size = self.counts[i], self.sizes[i]
            k = min(math.ceil(death_rate * nnz), size - nnz)  # a dense layer stays dense
            k_drop = k + max(0, min(math.ceil(death_rate * extra_prune * nnz), nnz - k - 1)) if extra_prune else k
            k_grow = min(k + (math.ceil(extra_growth * k) if extra_growth else 0), size - nnz)
            if k_drop <= 0 and k_grow <= 0:
                continue
            active = mask.nonzero().squeeze(1)
            inactive = (~mask).nonzero().squeeze(1)
            drop = active[_smallest(_flat(p)[active].abs(), k_drop)]
            if growth == "gradient":
                if p.grad is None:
                    raise SparseWinError("gradient growth needs p.grad: call update() after backward()")
                grow = inactive[_smallest(-_flat(p.grad)[inactive].abs(), k_grow)]
            else:
                grow = inactive[_choose(len(inactive), k_grow, self.generator).to(p.device)]
            both = torch.cat([drop, grow])
            mask.index_fill_(0, drop, False).index_fill_(0, grow, True)  # index_fill_: ~50x faster than t[idx] =
            _flat(self.ever_active[name]).index_fill_(0, grow, True)
            for t in [p, *self._state_of(optimizer, p)]:
                _flat(t).index_fill_(0, both, 0)  # pruned zero; regrown weights and momentum start at zero
            self.counts[i] = nnz - k_drop + k_grow
            pruned, grown = pruned + k_drop, grown + k_grow
        self._build_multipliers()
        return dict(pruned=pruned, grown=grown)

    # -- checkpoints
    def state_dict(self) -> dict:
        return dict(masks={n: m.cpu() for n, m in self.masks.items()},
                    ever_active={n: m.cpu() for n, m in self.ever_active.items()},
                    steps=self.steps, generator=self.generator.get_state())

    def load_state_dict(self, state: dict):
        masks = state["masks"]
        if list(masks) != self.names or any(masks[n].shape != self.masks[n].shape for n in self.names):
            raise SparseWinError("mask state does not match this model's prunable weights")
        for key in ("masks", "ever_active"):
            setattr(self, key, {n: _like(self.params[n], state[key][n]) for n in self.names})
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
        self._refresh()


def fbplus_decision(gaps: list[float], losses: list[float], *, window: int = 4,
                    threshold: float = 0.5) -> tuple[bool, bool]:
    """Flying Bird+ (Sec. 3.2): (extra prune, extra growth) from per-epoch histories.

    Extra pruning when at least threshold * window of the last `window` differences of the
    robust gap (train RA - val RA) are increases; extra growth when at least as many of the
    val adversarial loss's differences are not decreases. Too short a history: neither.
    """
    def count(h, rising):
        if len(h) < window + 1:
            return -1
        tail = h[-window - 1:]
        return sum((b > a) if rising else (b >= a) for a, b in zip(tail, tail[1:]))
    need = threshold * window
    return count(gaps, True) >= need, count(losses, False) >= need


class FlyingBirdPlus:
    """FB+ state: per-epoch gap and val adversarial loss histories, and the events that fired."""

    def __init__(self, *, start_epoch: int, window: int = 4, threshold: float = 0.5,
                 prune_ratio: float = 0.4, growth_ratio: float = 0.05):
        self.start_epoch, self.window, self.threshold = start_epoch, window, threshold
        self.prune_ratio, self.growth_ratio = prune_ratio, growth_ratio
        self.gaps: list[float] = []
        self.losses: list[float] = []
        self.events: list[dict] = []

    def record(self, gap: float, val_adv_loss: float):
        self.gaps.append(gap)
        self.losses.append(val_adv_loss)

    def decide(self, epoch: int, step: int) -> dict:
        """update() keyword arguments for this topology update; fired events are recorded."""
        prune, grow = (fbplus_decision(self.gaps, self.losses, window=self.window, threshold=self.threshold)
                       if epoch >= self.start_epoch else (False, False))
        if prune or grow:
            self.events.append(dict(epoch=epoch, step=step, prune=prune, grow=grow))
        return dict(extra_prune=self.prune_ratio if prune else 0.0, extra_growth=self.growth_ratio if grow else 0.0)

    def state_dict(self) -> dict:
        return dict(gaps=self.gaps, losses=self.losses, events=self.events)

    def load_state_dict(self, state: dict):
        self.gaps, self.losses, self.events = list(state["gaps"]), list(state["losses"]), list(state["events"])


# ----------------------------------------------------------------------------- early bird

def magnitude_mask(weights: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: keep exactly round(density * total) largest |w| over all layers."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(round(density * flat.numel()), sorted=False).indices] = True
    parts = keep.split([w.numel() for w in weights.values()])
    return {n: k.view(w.shape) for (n, w), k in zip(weights.items(), parts)}


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Normalized Hamming distance: fraction of positions where the two masks differ."""
    diff = sum(int((a[n] != b[n]).sum()) for n in a)
    return diff / sum(m.numel() for m in a.values())


class EarlyBird:
    """Early-bird ticket detector (You et al. 2020; Robust Bird, Sec. 3.1).

    After every standard-training epoch, record() computes the global magnitude mask of the
    conv weights at the target density (as the released code does) and keeps the last
    `queue` masks; the ticket has emerged when the newest is within `threshold` of each older one.
    """

    def __init__(self, *, density: float, queue: int = 5, threshold: float = 0.08):
        self.density, self.queue, self.threshold = density, queue, threshold
        self.masks: list[dict[str, torch.Tensor]] = []
        self.distances: list[float] = []  # max distance newest-to-older, per record

    def record(self, model: nn.Module) -> bool:
        convs = {n: w for n, w in prunable(model).items() if w.dim() == 4}
        self.masks = (self.masks + [{n: m.cpu() for n, m in magnitude_mask(convs, self.density).items()}])[-self.queue:]
        d = [mask_distance(self.masks[-1], m) for m in self.masks[:-1]]
        self.distances.append(max(d) if d else 1.0)
        return self.emerged

    @property
    def emerged(self) -> bool:
        return len(self.masks) == self.queue and self.distances[-1] <= self.threshold

    def ticket(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The ticket to train: global magnitude mask over conv *and* linear weights."""
        return magnitude_mask(prunable(model), self.density)

    def state_dict(self) -> dict:
        return dict(masks=self.masks, distances=self.distances)

    def load_state_dict(self, state: dict):
        self.masks, self.distances = list(state["masks"]), list(state["distances"])


# ----------------------------------------------------------------------------- FLOPs

@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple) -> dict[str, int]:
    """Forward FLOPs per image *per active weight* of each prunable layer, from one forward pass.

    A conv weight is used once per output position: 2 FLOPs (multiply + add) x H_out x W_out;
    a linear weight 2 FLOPs. Dense FLOPs of a layer = value x weight.numel(); with nnz active
    weights it costs value x nnz, so sparse counts are exact integers. This counts what
    torch.utils.flop_counter.FlopCounterMode counts (convolutions and matmuls).
    """
    modules = {f"{n}.weight" if n else "weight": m for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))}
    out, hooks = {}, []
    for name, m in modules.items():
        channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        hooks.append(m.register_forward_hook(
            lambda mod, inp, o, name=name, c=channels:  # accumulate: a layer may run more than once
            out.__setitem__(name, out.get(name, 0) + 2 * o.numel() // (o.shape[0] * c))))
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def forward_flops(per_weight: dict[str, int], counts: dict[str, int]) -> int:
    """Forward FLOPs per image of a model with `counts` active weights per layer."""
    return sum(per_weight[n] * counts[n] for n in per_weight)


class FlopLedger:
    """Training FLOPs, charged at every step with the density in force at that step.

    paper:  3 x (K + 1) x forward per image (K attack steps + 1 update, each a forward and a
            2x backward; PGD-10 AT = 33x, standard training = 3x), as the paper's table counts.
    actual: what runs: an attack step is a forward and an input-gradient backward (2x), the
            update a forward and a full backward (3x), so PGD-10 AT = 23x forward.
    """

    def __init__(self):
        self.paper = self.actual = self.images = self.steps = 0

    def charge(self, images: int, forward: int, attack_steps: int):
        self.paper += 3 * (attack_steps + 1) * forward * images
        self.actual += (2 * attack_steps + 3) * forward * images
        self.images += images
        self.steps += 1

    def state_dict(self) -> dict:
        return dict(paper=self.paper, actual=self.actual, images=self.images, steps=self.steps)

    def load_state_dict(self, state: dict):
        self.__dict__.update(state)


# ----------------------------------------------------------------------------- train

def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


RESUME_FREE = {"resume", "out", "device", "stop_after_epoch", "progress", "amp", "compile", "channels_last",
               "download", "data_dir", "preset", "benchmark"}  # may differ between a run and its resume


def check_run_dir(cfg: Config) -> Path:
    """Refuse early, before anything is created: never overwrite a previous run without --resume."""
    d = cfg.run_dir
    if cfg.resume and not (d / "last.pt").exists():
        raise SparseWinError(f"--resume: no {d / 'last.pt'} to resume from")
    if not cfg.resume and (d / "last.pt").exists():
        raise SparseWinError(f"{d} already holds a run; pass --resume to continue it or choose another --out")
    parent = next(p for p in [d, *d.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SparseWinError(f"cannot write to run directory {d}: {parent} is not a writable directory")
    return d


def make_run_dir(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SparseWinError(f"cannot write to run directory {d}: {e.strerror or e}")
    return d


def model_for(cfg: Config) -> nn.Module:
    """The configured architecture, sized for the configured dataset."""
    info = DATASETS[cfg.dataset]
    return build_model(cfg.arch, num_classes=info["classes"], in_channels=info["channels"], width=cfg.width,
                       mean=info["mean"], std=info["std"], wrn_depth=cfg.wrn_depth, wrn_widen=cfg.wrn_widen)


def train(cfg: Config, log=print) -> dict:
    """Run one experiment end to end; returns the summary (also written to summary.json)."""
    validate(cfg)
    run_dir = check_run_dir(cfg)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    info = DATASETS[cfg.dataset]
    data = load_data(cfg)
    make_run_dir(run_dir)
    if cfg.train_subset:
        data["train"] = tuple(t[:cfg.train_subset] for t in data["train"])
    if cfg.eval_subset:
        data["val"], data["test"] = [tuple(t[:cfg.eval_subset] for t in data[s]) for s in ("val", "test")]
    data = {s: (x.to(device), y.to(device)) for s, (x, y) in data.items()}

    net = model_for(cfg).to(device)
    input_shape = tuple(data["train"][0].shape[1:])
    per_weight = layer_flops(net, input_shape)
    dense_counts = {n: p.numel() for n, p in prunable(net).items()}
    dense_fwd = forward_flops(per_weight, dense_counts)
    if cuda and cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if cfg.compile else net
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and cfg.amp else nullcontext

    gen = torch.Generator(device).manual_seed(cfg.seed)  # data order, augmentation, attack starts
    aug = dict(pad=2 if info["size"] == 28 else 4, flip=True, rotate=info["rotate"])
    train_batches = Batches(*data["train"], batch_size=cfg.batch_size, shuffle=True, augmentation=aug, generator=gen)
    eval_batches = {s: Batches(*data[s], batch_size=max(cfg.batch_size, 256)) for s in ("val", "test")}
    (eps, alpha), (test_eps, test_alpha) = cfg.eps(train=True), cfg.eps(train=False)
    attack = dict(eps=eps, alpha=alpha, steps=cfg.train_steps, norm=cfg.norm, generator=gen)
    test_attack = dict(eps=test_eps, alpha=test_alpha, steps=cfg.test_steps, norm=cfg.norm, generator=gen)
    total_steps = cfg.epochs * len(train_batches)

    def make_optimizer(milestones):
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)

    optimizer, scheduler = make_optimizer(cfg.milestones)
    ledger = FlopLedger()
    mask = SparseMask(net, density=cfg.density, allocation=cfg.allocation, seed=cfg.seed) \
        if cfg.mode in ("dynamic", "dynamic+") else None
    fbplus = FlyingBirdPlus(start_epoch=cfg.fbplus_start_epoch, window=cfg.fbplus_window,
                            threshold=cfg.fbplus_threshold, prune_ratio=cfg.fbplus_prune,
                            growth_ratio=cfg.fbplus_grow) if cfg.mode == "dynamic+" else None
    early = EarlyBird(density=cfg.density, queue=cfg.eb_queue, threshold=cfg.eb_threshold) \
        if cfg.mode == "static" else None
    run = dict(epoch=0, ticket_epochs=0, ticket_flops=0, phase="ticket" if early else "adv",
               best_val_ra=-1.0, best_epoch=-1, history=[], updates=[], wall=0.0)
    config = dataclasses.asdict(cfg)

    def checkpoint() -> dict:
        return dict(config=config, model=net.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), mask=mask.state_dict() if mask else None,
                    fbplus=fbplus.state_dict() if fbplus else None, early=early.state_dict() if early else None,
                    ledger=ledger.state_dict(), run=run, generator=gen.get_state(), torch_rng=torch.get_rng_state())

    if cfg.resume:
        # map to the CPU: generator states must be CPU tensors; load_state_dict moves the rest
        try:
            ck = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
            ck["config"], ck["run"]
        except Exception as e:
            raise SparseWinError(f"{run_dir / 'last.pt'} is not a readable sparse_win checkpoint ({type(e).__name__})")
        changed = [k for k in config if k not in RESUME_FREE and ck["config"].get(k) != config[k]]
        if changed:
            k = changed[0]
            raise SparseWinError(f"{run_dir / 'last.pt'} was written with another config ({k}: "
                                 f"{ck['config'].get(k)!r}, now {config[k]!r}); resume with the same options")
        net.load_state_dict(ck["model"])
        run = ck["run"]
        if run["phase"] == "adv" and early is not None:  # the ticket was adopted before the checkpoint
            mask = SparseMask(net, masks=ck["mask"]["masks"])
        if mask is not None:
            mask.load_state_dict(ck["mask"])
        optimizer.load_state_dict(ck["optimizer"])
        for p, state in optimizer.state.items():  # momentum in its weight's layout (CPU run resumed on CUDA)
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p).copy_(v)
        scheduler.load_state_dict(ck["scheduler"])
        for obj, key in ((fbplus, "fbplus"), (early, "early"), (ledger, "ledger")):
            if obj is not None:
                obj.load_state_dict(ck[key])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed {run_dir} at epoch {run['epoch']} ({run['phase']})")
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run["history"]))
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=1))

    def run_epoch(attack_steps: int, desc: str) -> tuple[float, float]:
        """One epoch of AT (attack_steps > 0) or standard training; returns (loss, accuracy %)."""
        model.train()
        sums = torch.zeros(2, device=device)  # loss sum, correct (no host sync inside the loop)
        n = 0
        fwd = forward_flops(per_weight, mask.layer_counts()) if mask else dense_fwd
        bar = _progress(len(train_batches), desc, cfg.progress)
        for x, y in train_batches:
            with autocast():
                if attack_steps:
                    x = pgd(model, x, y, **{**attack, "steps": attack_steps})
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if mask is not None:
                mask.step(optimizer)
            ledger.charge(len(y), fwd, attack_steps)
            sums += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
            n += len(y)
            if cfg.mode in ("dynamic", "dynamic+"):
                late = run["epoch"] >= cfg.epochs // 2
                if mask.steps % (cfg.update_interval_late if late else cfg.update_interval) == 0:
                    p = cosine_death_rate(mask.steps, total_steps, cfg.death_rate, cfg.death_rate_final)
                    extra = fbplus.decide(run["epoch"], mask.steps) if fbplus else {}
                    changed = mask.update(p, growth=cfg.growth, optimizer=optimizer, **extra)
                    run["updates"].append(dict(step=mask.steps, epoch=run["epoch"], death_rate=p,
                                               density=mask.density, **changed, **extra))
                    fwd = forward_flops(per_weight, mask.layer_counts())
            bar.update(1)
        bar.close()
        loss_sum, correct = sums.tolist()
        return loss_sum / n, 100 * correct / n

    t0 = time.time() - run["wall"]
    # Robust Bird stage 1: standard training until the early-bird ticket emerges (Sec. 3.1)
    while run["phase"] == "ticket":
        run["ticket_epochs"] += 1
        loss, acc = run_epoch(0, f"ticket {run['ticket_epochs']}")
        emerged = early.record(net)
        log(f"ticket epoch {run['ticket_epochs']:3d} loss {loss:.4f} acc {acc:5.2f} "
            f"mask distance {early.distances[-1]:.4f}{' -> early bird' if emerged else ''}")
        if emerged or run["ticket_epochs"] >= cfg.eb_max_epochs:
            run["phase"], run["ticket_flops"], run["ticket_images"] = "adv", ledger.actual, ledger.images
            mask = SparseMask(net, masks=early.ticket(net))  # prune, keep weights; fresh optimizer + schedule
            optimizer, scheduler = make_optimizer(cfg.milestones)
        run["wall"] = time.time() - t0
        atomic_save(checkpoint(), run_dir / "last.pt")

    while run["epoch"] < cfg.epochs:
        if cfg.stop_after_epoch and run["epoch"] >= cfg.stop_after_epoch:
            log(f"stopped after epoch {run['epoch']} as asked; continue with --resume")
            return dict(stopped_at=run["epoch"])
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_ra = run_epoch(cfg.train_steps, f"epoch {run['epoch'] + 1}")
        scheduler.step()
        val = evaluate(model, eval_batches["val"], **test_attack, autocast=autocast)
        test = evaluate(model, eval_batches["test"], **test_attack, autocast=autocast)
        if fbplus is not None:
            fbplus.record(train_ra - val["ra"], val["adv_loss"])  # gap_t = train RA - val RA
        run["epoch"] += 1
        rec = dict(epoch=run["epoch"], lr=lr, train_loss=train_loss, train_ra=train_ra,
                   val_sa=val["sa"], val_ra=val["ra"], val_adv_loss=val["adv_loss"],
                   test_sa=test["sa"], test_ra=test["ra"], test_adv_loss=test["adv_loss"],
                   density=mask.density if mask else 1.0, train_flops=ledger.actual, train_flops_paper=ledger.paper,
                   itop=mask.itop_rate() if mask else 1.0, time=time.time() - t0)
        run["history"].append(rec)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"epoch {rec['epoch']:3d}/{cfg.epochs} lr {lr:.4f} loss {train_loss:.4f} train RA {train_ra:5.2f} | "
            f"val SA {val['sa']:5.2f} RA {val['ra']:5.2f} | test SA {test['sa']:5.2f} RA {test['ra']:5.2f} | "
            f"density {rec['density']:.4f} | {rec['time']:.0f}s")
        run["wall"] = time.time() - t0
        if val["ra"] > run["best_val_ra"]:  # best = highest *validation* RA (never the test set)
            run["best_val_ra"], run["best_epoch"] = val["ra"], run["epoch"]
            atomic_save(dict(config=config, model=net.state_dict(), mask=mask.state_dict() if mask else None,
                             epoch=run["epoch"], val_ra=val["ra"]), run_dir / "best.pt")
        atomic_save(checkpoint(), run_dir / "last.pt")

    # Robust generalization gap of the final model: train RA (eval mode, no augmentation) - test RA
    gap_x, gap_y = (t[:cfg.gap_subset or None] for t in data["train"])
    train_final = evaluate(model, Batches(gap_x, gap_y, batch_size=max(cfg.batch_size, 256)), **test_attack,
                           autocast=autocast)
    summary = summarize(cfg, run, ledger, train_final["ra"], dense_fwd,
                        forward_flops(per_weight, mask.layer_counts()) if mask else dense_fwd,
                        mask, fbplus, early)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    plot_curves(run["history"], fbplus.events if fbplus else [], run_dir / "curves.png", log)
    log(format_table([summary]))
    return summary


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is installed and wanted, else a stand-in that does nothing."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
    except ImportError:
        class Null:
            update = close = lambda self, *a: None  # noqa: E731
        return Null()


# ----------------------------------------------------------------------------- report

METHOD = {"dense": "dense AT", "static": "Robust Bird", "dynamic": "Flying Bird", "dynamic+": "Flying Bird+"}


def summarize(cfg, run, ledger, train_final_ra, dense_fwd, final_fwd, mask, fbplus, early) -> dict:
    """The paper's table row (Table 1 layout) plus density, ITOP rate and FLOP ratios."""
    h = run["history"]
    best, final = h[run["best_epoch"] - 1], h[-1]
    return dict(
        method=METHOD[cfg.mode], mode=cfg.mode, dataset=cfg.dataset, arch=cfg.arch, sparsity=cfg.sparsity,
        best_epoch=run["best_epoch"], epochs=len(h),
        ra_best=best["test_ra"], ra_final=final["test_ra"], ra_diff=best["test_ra"] - final["test_ra"],
        sa_best=best["test_sa"], sa_final=final["test_sa"], sa_diff=best["test_sa"] - final["test_sa"],
        train_flops=ledger.actual, train_flops_paper=ledger.paper,
        # paper convention, vs dense AT over the same AT epochs (Robust Bird's stage 1 included above)
        train_flops_dense_ratio=ledger.paper / (3 * (cfg.train_steps + 1) * dense_fwd
                                                * (ledger.images - run.get("ticket_images", 0))),
        inference_flops=final_fwd, inference_flops_dense=dense_fwd, inference_ratio=final_fwd / dense_fwd,
        robust_gap=train_final_ra - final["test_ra"], train_ra_final=train_final_ra,
        final_density=mask.density if mask else 1.0, itop_rate=mask.itop_rate() if mask else 1.0,
        ticket_epochs=run["ticket_epochs"], ticket_flops=run["ticket_flops"],
        topology_updates=len(run["updates"]), fbplus_events=fbplus.events if fbplus else [],
        early_bird_distances=early.distances if early else [], wall_seconds=run["wall"])


def format_table(rows: list[dict]) -> str:
    """Markdown table in the paper's layout (accuracies in %, FLOPs real, per image for inference)."""
    head = ("| method | RA best | RA final | diff | SA best | SA final | diff | train FLOPs | "
            "inference FLOPs (x dense) | robust gen. gap | density | ITOP |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ra_best']:.2f} | {r['ra_final']:.2f} | {r['ra_diff']:.2f} | "
                     f"{r['sa_best']:.2f} | {r['sa_final']:.2f} | {r['sa_diff']:.2f} | {r['train_flops']:.3e} | "
                     f"{r['inference_flops']:.3e} ({r['inference_ratio']:.3f}) | {r['robust_gap']:.2f} | "
                     f"{r['final_density']:.4f} | {r['itop_rate']:.3f} |")
    return "\n".join(lines)


def plot_curves(history: list[dict], events: list[dict], path: Path, log=print):
    """curves.png: train robust acc, test SA and test RA per epoch; FB+ extra prune/grow marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no curves.png")
        return
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_ra", "train RA"), ("test_sa", "test SA"), ("test_ra", "test RA")):
        ax.plot(ep, [r[key] for r in history], label=label)
    for i, e in enumerate(events):
        color = "tab:red" if e["prune"] else "tab:green"
        ax.axvline(e["epoch"] + 0.5, color=color, ls=":", lw=1,
                   label=None if i else "FB+ extra prune (red) / grow (green)")
    ax.set(xlabel="epoch", ylabel="accuracy (%)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -- study: many runs -> one table and three figures (run_experiments.sh --study)

STUDY_COLUMNS = (  # (header, summary key, decimals): the paper's Table 1 layout, ratios to dense AT
    ("RA best", "ra_best", 2), ("RA final", "ra_final", 2), ("diff", "ra_diff", 2),
    ("SA best", "sa_best", 2), ("SA final", "sa_final", 2), ("diff", "sa_diff", 2),
    ("robust gen. gap", "robust_gap", 2), ("train FLOPs (x dense)", "train_flops_dense_ratio", 3),
    ("inference FLOPs (x dense)", "inference_ratio", 3), ("final density", "final_density", 4))


def load_runs(root) -> list[dict]:
    """Every finished run under root (a run dir holds summary.json): summary, per-epoch history, config."""
    runs = []
    for path in sorted(Path(root).rglob("summary.json")):
        d = path.parent
        read = lambda name, parse: parse((d / name).read_text()) if (d / name).exists() else None  # noqa: E731
        history = read("metrics.jsonl", lambda t: [json.loads(line) for line in t.splitlines() if line.strip()])
        runs.append(dict(dir=d, summary=json.loads(path.read_text()), history=history or [],
                         config=read("config.json", json.loads) or {}))
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    """{(mode, sparsity): runs}, seeds pooled; dense AT is keyed at sparsity 0 whatever it was given."""
    groups = {}
    for r in runs:
        s = r["summary"]
        groups.setdefault((s["mode"], 0.0 if s["mode"] == "dense" else float(s["sparsity"])), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])))


def group_stats(runs: list[dict]) -> dict:
    """Mean and std over seeds of every STUDY_COLUMNS value, plus train_ra_final and the seeds."""
    keys = [k for _, k, _ in STUDY_COLUMNS] + ["train_ra_final"]
    return dict(n=len(runs), seeds=sorted(r["config"].get("seed") for r in runs),
                **{k: mean_std([r["summary"][k] for r in runs]) for k in keys})


def _study_table(rows: list[tuple[str, dict]], extra=()) -> str:
    cols = [*STUDY_COLUMNS, *extra]
    lines = ["| method | n | " + " | ".join(h for h, _, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, st in rows:
        cells = [f"{st[k][0]:.{d}f} ± {st[k][1]:.{d}f}" for _, k, d in cols]
        lines.append(f"| {label} | {st['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_figure(fig, path: Path):
    """savefig to a temporary name, then rename: a crash mid-write leaves no half PNG."""
    import matplotlib.pyplot as plt
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def study_report(runs_root, out_dir, *, sparsity: float = 0.8, sweep_mode: str = "dynamic", log=print) -> dict:
    """Aggregate a study: table.md, curves.png, gap.png and sparsity.png in out_dir.

    Runs are grouped by (mode, sparsity); every number is mean ± sample std over seeds.
    Main table: dense AT and every method at `sparsity`; sweep table and sparsity.png: the
    `sweep_mode` runs (Flying Bird) at each sparsity, the analogue of the paper's Figure 1.
    Returns {(mode, sparsity): group_stats}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(load_runs(runs_root))
    if not groups:
        raise SparseWinError(f"no finished runs (summary.json) under {runs_root}")
    stats = {k: group_stats(v) for k, v in groups.items()}
    main = [k for k in groups if k[0] == "dense" or math.isclose(k[1], sparsity)]
    sweep = [k for k in groups if k[0] == sweep_mode]
    label = lambda k: METHOD[k[0]] + ("" if k[0] == "dense" else f" s={k[1]:g}")  # noqa: E731
    train_ra = (("train RA (final model)", "train_ra_final", 2),)
    text = (f"# Study: {runs_root}\n\nMean ± sample std over n seeds. Accuracies in %, test set; best = epoch of "
            f"best validation RA; robust gen. gap = train RA - test RA of the final model; FLOPs as a "
            f"fraction of dense AT.\n\n## Methods at sparsity {sparsity:g}\n\n"
            + _study_table([(label(k), stats[k]) for k in main])
            + f"\n\n## {METHOD[sweep_mode]} across sparsity\n\n"
            + _study_table([(label(k), stats[k]) for k in sweep], extra=train_ra) + "\n")
    write_text_atomic(out_dir / "table.md", text)

    colors = {k: f"C{i}" for i, k in enumerate(main)}
    fig, ax = plt.subplots(figsize=(7, 4))  # curves.png: mean over seeds per epoch
    for k in main:
        for key, ls, what in (("test_ra", "-", "test RA"), ("train_ra", "--", "train RA")):
            per_epoch = {}
            for r in groups[k]:
                for h in r["history"]:
                    per_epoch.setdefault(h["epoch"], []).append(h[key])
            ep = sorted(per_epoch)
            ax.plot(ep, [mean_std(per_epoch[e])[0] for e in ep], ls, color=colors[k], label=f"{label(k)} {what}")
    ax.set(xlabel="epoch", ylabel="robust accuracy (%)", title="test RA (solid), running train RA (dashed)")
    ax.legend(fontsize=7)
    _save_figure(fig, out_dir / "curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))  # gap.png: one point per seed, bar = mean ± std
    for ax, key, title in zip(axes, ("robust_gap", "ra_diff"), ("robust gen. gap", "robust overfitting (RA best - final)")):
        for i, k in enumerate(main):
            values = [r["summary"][key] for r in groups[k]]
            ax.bar(i, stats[k][key][0], yerr=stats[k][key][1], color=colors[k], alpha=0.4, capsize=4)
            ax.plot([i] * len(values), values, "o", color=colors[k])
        ax.set_xticks(range(len(main)), [label(k) for k in main], rotation=20, fontsize=7)
        ax.set(ylabel="points (%)", title=title)
    _save_figure(fig, out_dir / "gap.png")

    fig, ax = plt.subplots(figsize=(6, 4))  # sparsity.png: Figure-1 analogue
    xs = [k[1] for k in sweep]
    for key, what in (("train_ra_final", "train RA (final model)"), ("ra_final", "test RA (final)")):
        ax.errorbar(xs, [stats[k][key][0] for k in sweep], yerr=[stats[k][key][1] for k in sweep],
                    marker="o", capsize=4, label=what)
    ax.set(xlabel="sparsity", ylabel="robust accuracy (%)", title=f"{METHOD[sweep_mode]}: robust train vs test")
    ax.legend()
    _save_figure(fig, out_dir / "sparsity.png")
    log(text)
    return stats


# ----------------------------------------------------------------------------- benchmark

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def benchmark(cfg: Config, log=print) -> list[dict]:
    """PGD-K AT throughput (images/s) of dense and sparse models at the dataset's input shape.

    Rows: fp32 eager (the baseline), then the fast path (bf16 autocast + channels_last
    [+ compile]) on CUDA. Prints projected epoch time and achieved fraction of bf16 peak.
    """
    device = resolve_device(cfg.device)
    info = DATASETS[cfg.dataset]
    shape = (info["channels"], info["size"], info["size"])
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x = torch.rand(cfg.batch_size, *shape, device=device, generator=gen)
    y = torch.randint(0, info["classes"], (cfg.batch_size,), device=device, generator=gen)
    eps, alpha = cfg.eps(train=True)
    peak = next((v for k, v in BF16_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    variants = [("fp32 eager", False, False, False)]
    if device.type == "cuda":
        variants.append(("bf16 channels_last" + (" compile" if cfg.compile else ""), True, True, cfg.compile))
    rows = []
    for label, amp, cl, comp in variants:
        for sparse in (False, True):
            net = model_for(cfg).to(device)
            per_weight = layer_flops(net, shape)
            dense_fwd = forward_flops(per_weight, {n: p.numel() for n, p in prunable(net).items()})
            if cl:
                net = net.to(memory_format=torch.channels_last)
            mask = SparseMask(net, density=cfg.density, allocation=cfg.allocation) if sparse else None  # as train()
            model = torch.compile(net) if comp else net
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

            def step():
                with ctx():
                    xa = pgd(model, x, y, eps=eps, alpha=alpha, steps=cfg.train_steps, norm=cfg.norm, generator=gen)
                    loss = F.cross_entropy(model(xa), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if mask is not None:
                    mask.step(opt)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            for _ in range(3):
                step()
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            n, t0 = 0, time.perf_counter()
            while n < 5 or time.perf_counter() - t0 < 2.0:
                step()
                n += 1
            sync()
            ips = n * cfg.batch_size / (time.perf_counter() - t0)
            executed = (2 * cfg.train_steps + 3) * dense_fwd  # the hardware runs dense kernels
            rows.append(dict(variant=label, model="sparse" if sparse else "dense", images_per_s=ips,
                             epoch_s=45000 / ips, tflops=executed * ips / 1e12,
                             peak_fraction=executed * ips / peak if peak else None,
                             peak_memory=torch.cuda.max_memory_allocated() if device.type == "cuda" else None))
            r = rows[-1]
            log(f"{label:28s} {r['model']:6s} {ips:9.1f} img/s  epoch (45k) {r['epoch_s']:8.1f} s  "
                f"{r['tflops']:7.2f} TFLOP/s" + (f"  {100 * r['peak_fraction']:.1f}% of bf16 peak" if peak else "")
                + (f"  peak mem {r['peak_memory'] / 2**30:.2f} GiB" if r["peak_memory"] else ""))
    return rows


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the command line: preset values first, explicit flags over them."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2 (argparse prints the usage block otherwise)
            raise SparseWinError(message)
    parser = Parser(prog="sparse_win.py", description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        kw = {k: v for k, v in f.metadata.items() if k != "help"}
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                help=f"{f.metadata['help']} (default: {f.default})")
        else:
            kw.setdefault("type", type(f.default))
            parser.add_argument(flag, help=f"{f.metadata['help']} (default: {f.default})", **kw)
    args = vars(parser.parse_args(argv))
    preset = args.get("preset", "")
    if preset and preset not in PRESETS:
        raise SparseWinError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **args}
    if "milestones" in values:
        values["milestones"] = tuple(values["milestones"])
    return validate(Config(**values))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.benchmark:
            benchmark(cfg)
        else:
            train(cfg)
    except SparseWinError as e:
        print(f"sparse_win.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse_win.py: interrupted; last.pt holds the last finished epoch (--resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
