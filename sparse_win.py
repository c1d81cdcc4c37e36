"""sparse_win: sparse adversarial training, after "Sparsity Winning Twice" (Chen et al., ICLR 2022, arXiv:2202.09844).

PGD adversarial training (AT) of a *sparse* network narrows the robust generalization gap and robust overfitting
while saving training and inference FLOPs. The methods (--mode):
    dense       dense AT, the baseline
    static      Robust Bird (Sec. 3.1): an early-bird ticket from cheap standard training, then AT of that fixed
                sparse subnetwork (--ticket channel: a BatchNorm-channel ticket, a physically thinner network)
    dynamic     Flying Bird (Sec. 3.2): random sparse start; every T steps prune the smallest |w|, regrow as many
    dynamic+    Flying Bird+ (Sec. 3.2): FB, plus extra pruning when the robust gap widens and extra growth when
                the val adversarial loss stalls
Symbols as in the paper: eps (attack budget), alpha (step size), K (attack steps), d = 1 - sparsity (density),
p (death rate, cosine 0.5 -> 0.005), T (update interval, 900 then 1200 steps); FB+: window 4, prune ratio 0.4,
growth ratio 0.05, threshold 0.5.

The library (torch only) is the file down to "# === program": models, attack, masks, the methods in the paper's
order each with its machinery (Dense; EarlyBird, RobustBird; FlyingBird; FlyingBirdPlus), regularizers,
adversarial_step, FLOPs, checkpoints. The program below it follows the data.

Run:     python sparse_win.py --dataset cifar100 --mode dynamic --sparsity 0.9
         python sparse_win.py --preset cpu-demo          # Fashion-MNIST, minutes on a CPU
         torchrun --nproc_per_node=4 sparse_win.py ...    # the same run on 4 GPUs (DDP)
         python sparse_win.py --eval runs/<run>          # clean, PGD-50 x 5 restarts, AutoAttack, checks
Import:  from sparse_win import build_model, FlyingBird, adversarial_step, evaluate, save_model, load_model
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- errors and constants

class SparseWinError(ValueError):
    """Bad input (unknown name, mismatched state, missing package): the CLI prints one line, exits with 2."""


ARCHS = ("resnet18", "preact_resnet18", "vgg16", "wrn")  # build_model
NORMS = ("linf", "l2")  # attack norms
ATTACKS = ("pgd", "fgsm-rs", "none")  # training attacks: perturb, adversarial_step
LOSSES = ("ce", "trades")  # AT objectives: adversarial_step
ALLOCATIONS = ("igq", "erk", "uniform")  # layer-wise density: layer_densities, SparseMask
GROWTHS = ("random", "gradient")  # Flying Bird's regrowth
TICKETS = ("unstructured", "channel")  # Robust Bird's ticket kinds


def check_choice(what: str, value, choices):
    if value not in choices:
        raise SparseWinError(f"unknown {what} {value!r}; choose from {', '.join(map(str, choices))}"
                             + did_you_mean(str(value), map(str, choices)))
    return value


def did_you_mean(word: str, names) -> str:  # "; did you mean X?" naming the nearest of `names`, or ""
    import difflib
    close = difflib.get_close_matches(word, list(names), n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def autocast(device_type: str, bf16: bool):  # the one mixed-precision context: bf16 autocast, or nothing (fp32)
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ----------------------------------------------------------------------------- models

class Normalize(nn.Module):  # per-channel normalization inside the model: attacks work on pixels in [0, 1]
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):  # ResNet v1 block: conv-bn-relu-conv-bn, plus (projected) shortcut, relu
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):  # pre-activation block (He et al. 2016), also WideResNet's: bn-relu-conv twice
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class ResNet(nn.Module):  # CIFAR-style: 3x3 stride-1 stem, no max-pool; stages halve the resolution
    def __init__(self, *, block, num_blocks, widths, stem, num_classes, in_channels, mean, std):
        super().__init__()
        self.preact = block is PreActBlock
        self.normalize, self.conv1 = Normalize(mean, std), conv3x3(in_channels, stem)
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


class VGG(nn.Module):  # VGG-16 with BN; pools use ceil_mode so 28x28 inputs work too (28-14-7-4-2-1)
    CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, *, num_classes, in_channels, width, mean, std):
        super().__init__()
        layers, cin = [Normalize(mean, std)], in_channels
        for v in self.CFG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                cout = max(1, round(v * width))
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout  # the conv has a bias, as released
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build_model(arch: str, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                mean=(0.5,), std=(0.5,), wrn_depth: int = 34, wrn_widen: int = 10) -> nn.Module:
    check_choice("arch", arch, ARCHS)
    w = lambda c: max(1, round(c * width))  # noqa: E731 (width multiplies every channel count)
    common = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if arch in ("resnet18", "preact_resnet18"):
        return ResNet(block=BasicBlock if arch == "resnet18" else PreActBlock, num_blocks=(2, 2, 2, 2),
                      widths=[w(c) for c in (64, 128, 256, 512)], stem=w(64), **common)
    if arch == "vgg16":
        return VGG(width=width, **common)
    if arch == "wrn":  # Zagoruyko & Komodakis 2016: 3 groups of (depth-4)/6 pre-activation blocks
        n = (wrn_depth - 4) // 6
        net = ResNet(block=PreActBlock, num_blocks=(n, n, n), widths=[w(c * wrn_widen) for c in (16, 32, 64)],
                     stem=w(16), **common)
        for m in net.modules():  # the released WideResNet's init: Kaiming fan-out convs, zero linear bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        return net


def channel_groups(model: nn.Module) -> dict[str, tuple[str, str]]:
    """What a channel ticket may prune: {BN name: (producing conv, consuming layer)} for each residual block's inner
    channels and every VGG-16 conv. The residual stream stays whole: its channels are tied across the sums."""
    groups = {}
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, BasicBlock):
            groups[p + "bn1"] = (p + "conv1", p + "conv2")
        elif isinstance(m, PreActBlock):  # bn2 scales conv1's outputs, the channels conv2 reads
            groups[p + "bn2"] = (p + "conv1", p + "conv2")
        elif isinstance(m, VGG):
            convs = [i for i, layer in enumerate(m.features) if isinstance(layer, nn.Conv2d)]
            for i, j in zip(convs, convs[1:] + [None]):  # features[i + 1] is conv i's BatchNorm
                groups[f"{p}features.{i + 1}"] = (f"{p}features.{i}", p + ("linear" if j is None else f"features.{j}"))
    if not groups:
        raise SparseWinError("a channel ticket prunes the BatchNorm-scaled channels of resnet18, preact_resnet18, "
                             "wrn or vgg16 blocks; this model has none")
    return groups


def _keep_only(m: nn.Module, names: tuple[str, ...], idx: torch.Tensor, dim: int):
    for n in names:  # parameters or buffers, sliced to idx along dim
        t = getattr(m, n)
        if t is not None:
            new = t.detach().index_select(dim, idx).clone()
            setattr(m, n, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)


def slim(model: nn.Module, keep: dict[str, torch.Tensor | int]) -> nn.Module:
    """A physically thinner copy of `model` (left as it was). keep: BN name -> bool mask of its kept channels, or
    n (the first n: a checkpoint's thin architecture); groups left out stay whole. In eval mode the copy computes
    what `model` computes with the pruned channels' BN scale and shift zeroed (ReLU(0) = 0: nothing is read)."""
    groups, thin = channel_groups(model), copy.deepcopy(model)
    mods = dict(thin.named_modules())
    for bn_name, k in keep.items():
        bn = mods[bn_name]
        mask = torch.arange(bn.num_features) < k if isinstance(k, int) else k.flatten().bool().cpu()
        if mask.numel() != bn.num_features or not mask.any():
            raise SparseWinError(f"{bn_name}: keep 1 to {bn.num_features} channels, got {int(mask.sum())} of "
                                 f"{mask.numel()}")
        idx = mask.nonzero().flatten().to(bn.weight.device)
        producer, consumer = (mods[n] for n in groups[bn_name])
        _keep_only(producer, ("weight", "bias"), idx, 0)
        _keep_only(bn, ("weight", "bias", "running_mean", "running_var"), idx, 0)
        _keep_only(consumer, ("weight",), idx, 1)  # conv (out, in, k, k) or linear (out, in): its inputs
        producer.out_channels = bn.num_features = len(idx)
        setattr(consumer, "in_features" if isinstance(consumer, nn.Linear) else "in_channels", len(idx))
    return thin


# ----------------------------------------------------------------------------- attack

def _project(adv, x, eps, norm):  # back into the eps-ball around x and [0, 1] (op order as in torchattacks)
    if norm == "linf":
        delta = torch.clamp(adv - x, min=-eps, max=eps)
    else:
        delta = adv - x
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        delta = delta * torch.clamp(eps / n, max=1.0)
    return torch.clamp(x + delta, min=0, max=1)


def attack_start(shape, *, eps: float, norm: str = "linf", kind: str = "pgd", generator=None, device=None,
                 dtype=None) -> torch.Tensor:
    """A random start, as an offset from x: uniform in the L-inf ball; in the L2 ball a uniform radius along a
    Gaussian direction (torchattacks.PGDL2); kind "trades": 0.001 N(0, I). Slice it to split a batch."""
    if kind == "trades":
        return 0.001 * torch.empty(shape, device=device, dtype=dtype).normal_(generator=generator)
    if check_choice("norm", norm, NORMS) == "linf":
        return torch.empty(shape, device=device, dtype=dtype).uniform_(-eps, eps, generator=generator)
    d = torch.empty(shape, device=device, dtype=dtype).normal_(generator=generator)
    n = d.flatten(1).norm(dim=1).view(-1, *[1] * (len(shape) - 1))
    r = torch.empty(shape[0], *[1] * (len(shape) - 1), device=device).uniform_(0, 1, generator=generator)
    return d * r / n * eps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        norm: str = "linf", random_start: bool = True, generator: torch.Generator | None = None,
        loss_fn=F.cross_entropy, start: torch.Tensor | None = None, init: torch.Tensor | None = None) -> torch.Tensor:
    """PGD (Madry et al. 2018), returning detached inputs in the eps-ball (L-inf or L2) and [0, 1]. For training and
    evaluation: the model's mode is left as it is, only the input gets a gradient. start: the random start's offset
    (default: attack_start from generator); init: begin there instead, unclamped (TRADES; the ball stays on x)."""
    check_choice("norm", norm, NORMS)
    x = x.detach()
    adv = init.detach().clone() if init is not None else x.clone()
    if init is None and random_start and steps > 0:
        if start is None:
            start = attack_start(x.shape, eps=eps, norm=norm, generator=generator, device=x.device, dtype=x.dtype)
        adv = torch.clamp(adv + start, min=0, max=1).detach()
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


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
            generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """FGSM-RS ("Fast is better than free", Wong et al. 2020): PGD-1 from a uniform start, step 1.25 eps."""
    return pgd(model, x, y, eps=eps, alpha=1.25 * eps, steps=1, norm=norm, generator=generator, start=start)


def attack_cost(kind: str, steps: int) -> int:  # attack steps per example, for the FLOP ledger
    return {"none": 0, "fgsm-rs": 1, "pgd": steps}[check_choice("attack", kind, ATTACKS)]


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, kind: str, eps: float, alpha: float,
            steps: int, norm: str = "linf", generator: torch.Generator | None = None,
            start: torch.Tensor | None = None) -> torch.Tensor:  # the training attack; none: x itself
    if not attack_cost(kind, steps):
        return x
    if kind == "fgsm-rs":
        return fgsm_rs(model, x, y, eps=eps, norm=norm, generator=generator, start=start)
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator, start=start)


@torch.no_grad()
def evaluate_examples(model: nn.Module, batches, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                      restarts: int = 1, random_start: bool = True, generator=None,
                      start=None) -> dict[str, torch.Tensor]:
    """Per example, in eval mode, (N,) tensors: 'clean', 'robust' (correct), 'loss', 'adv_loss' (cross-entropy);
    with restarts, the worst case over PGD runs. start: x -> PGD's random start (default: drawn from generator).
    Always fp32, even inside autocast: a bf16 attack can be weaker and inflate RA."""
    was_training, parts = model.training, []
    model.eval()
    device = next(model.parameters()).device.type
    with torch.autocast(device, enabled=False):  # fp32, whatever autocast region the caller is in
        for x, y in batches:
            logits = model(x)
            clean, loss = logits.argmax(1) == y, F.cross_entropy(logits, y, reduction="none")
            robust, adv_loss = clean, loss
            for r in range(restarts if steps > 0 else 0):
                adv_logits = model(pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm,
                                       random_start=random_start, generator=generator,
                                       start=start(x) if start is not None and random_start else None))
                hit, hit_loss = adv_logits.argmax(1) == y, F.cross_entropy(adv_logits, y, reduction="none")
                robust, adv_loss = (hit, hit_loss) if r == 0 else (robust & hit, torch.maximum(adv_loss, hit_loss))
            parts.append((clean, robust, loss, adv_loss))
    model.train(was_training)
    keys = ("clean", "robust", "loss", "adv_loss")
    return {k: torch.cat(v) for k, v in zip(keys, zip(*parts))} if parts else {k: torch.empty(0) for k in keys}


def evaluate(model: nn.Module, batches, *, eps: float, alpha: float, steps: int, norm: str = "linf",
             generator=None, start=None, reduce=None) -> dict:
    """Clean (SA) and PGD (RA) accuracy in % and mean losses, in eval mode. reduce: applied to the float64
    sums (correct, losses, count), e.g. a sum over processes that each evaluated a shard."""
    ex = evaluate_examples(model, batches, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator,
                           start=start)
    sums = torch.stack([ex[k].double().sum() for k in ex] + [torch.tensor(float(len(ex["clean"])))
                                                             .to(ex["clean"].device, torch.float64)])
    *totals, n = (reduce(sums) if reduce is not None else sums).tolist()  # one host sync
    sa, ra, loss, adv_loss = (t / n for t in totals) if n else (0.0,) * 4
    return dict(sa=100 * sa, ra=100 * ra, loss=loss, adv_loss=adv_loss)


# ----------------------------------------------------------------------------- masks

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _weight_names(m: nn.Module) -> tuple[str, ...]:
    if isinstance(m, nn.MultiheadAttention):  # out_proj is an nn.Linear child, covered on its own
        packed = m.in_proj_weight is not None  # separate q/k/v weights when kdim or vdim != embed_dim
        return ("in_proj_weight",) if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return ("weight",) if isinstance(m, (*CONVS, *CONV_TRANSPOSES, nn.Linear)) else ()


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights sparsity covers, in module order: conv (1-3d, transposed), linear, attention in_proj weights."""
    return {f"{name}.{a}" if name else a: getattr(m, a) for name, m in model.named_modules()
            for a in _weight_names(m)}


def weight_counts(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in prunable(model).items()}  # a dense model's active weights


def layer_densities(shapes: list[tuple], density: float, allocation: str = "igq") -> list[float]:
    """Layer-wise densities whose weighted mean is `density` (before rounding to counts)."""
    check_choice("allocation", allocation, ALLOCATIONS)
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


def allocate_counts(shapes: list[tuple], density: float, allocation: str = "igq") -> list[int]:
    """Active weights per layer: max(round(density * total), layers) in all, 1 <= count <= size (largest remainder)."""
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


@functools.lru_cache  # a search: once per configuration
def small_dense_width(arch: str, sparsity: float, *, width: float = 1.0, **model) -> float:
    """The width of the dense `arch` whose conv + linear weights are nearest in number to the active weights of a
    `sparsity` model of `width` (model: build_model's other arguments): the capacity-matched control (as the
    released SmallDenseResNet18). Counts grow with width in steps (rounded channels): bisect; the step's shortest
    decimal."""
    def count(w):  # conv + linear weights of the dense network of width w, built without memory
        with torch.device("meta"):
            return sum(weight_counts(build_model(arch, width=w, **model)).values())
    with torch.device("meta"):
        layers, net = len(prunable(build_model(arch, width=width, **model))), build_model(arch, **model)
    target = min(total := count(width), max(layers, round((1 - sparsity) * total)))  # as allocate_counts
    edges = sorted({(j + 0.5) / m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)
                    for j in range(math.ceil(m.out_channels * width) + 1)} | {0.0, width})
    steps = [(lo, hi) for lo, hi in zip(edges, edges[1:]) if lo < hi <= width]
    lo, hi = 0, len(steps) - 1  # the first step whose count reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(sum(steps[mid]) / 2) < target else (lo, mid)
    near = min(steps[max(lo - 1, 0):lo + 1], key=lambda st: abs(count(sum(st) / 2) - target))  # ties: narrower
    return next((w for d in range(1, 7) if (w := math.ceil(near[0] * 10 ** d) / 10 ** d) < near[1]
                 and count(w) == count(sum(near) / 2)), sum(near) / 2)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D *view* of t in memory order, any dense layout (masks share their weights' strides)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost dim first: (0, 2, 3, 1) for NHWC
    return t.permute(order).view(-1)


def _memory_index(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions in _flat(t) of logical (row-major) flat indices: channels_last gets the masks contiguous gets."""
    if t.is_contiguous():
        return idx
    coords = torch.unravel_index(idx, t.shape)  # one (k,) tensor per dim
    return sum(c * s for c, s in zip(coords, t.stride()))


def _like(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(p, dtype=torch.bool).copy_(m)  # bool, on p's device, in p's memory layout


def _smallest(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of a 1-D v, ties by position: kthvalue (O(n)), not a sort (the hot part)."""
    if k >= len(v):
        return torch.arange(len(v), device=v.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=v.device)
    v = v.nan_to_num(nan=-math.inf)  # NaN first: kthvalue would pick fewer than k (exact counts even then)
    kth = v.kthvalue(k).values
    below = (v < kth).nonzero().squeeze(1)
    ties = (v == kth).nonzero().squeeze(1)[:k - len(below)]
    return torch.cat([below, ties])


def _choose(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform k-subset of range(n), no O(n) permutation when k << n (distinct i.i.d. draws: a uniform set)."""
    if 4 * k > n:
        return torch.randperm(n, generator=generator)[:k]
    picked = torch.empty(0, dtype=torch.long)
    while len(picked) < k:
        draws = torch.randint(n, (k - len(picked) + k // 8 + 16,), generator=generator)
        picked = torch.cat([picked, draws]).unique()
    return picked[torch.randperm(len(picked), generator=generator)[:k]]


class SparseMask:
    """One bool mask per prunable weight (conv, linear, attention in_proj) of any nn.Module, and the rules
    that change them. counts[i], layer i's active weights, is a Python int: FLOP accounting never syncs.

        mask = SparseMask(model, density=0.2, allocation="igq", seed=0)  # random, exact counts
        ... optimizer.step(); mask.apply(optimizer)       # after every step: weights + momentum
        mask.update(death_rate=p)                           # every T steps: prune and regrow
    """
    def __init__(self, model: nn.Module, *, density: float = 1.0, allocation: str = "igq", seed: int = 0,
                 masks: dict[str, torch.Tensor] | None = None):
        self.params = prunable(model)
        self.names = list(self.params)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
        if masks is None:
            counts = allocate_counts([tuple(self.params[n].shape) for n in self.names], density, allocation)
            masks = {}
            for name, k in zip(self.names, counts):
                shape = self.params[name].shape
                m = torch.zeros(shape.numel(), dtype=torch.bool)  # logical order: same on every memory layout
                m[torch.randperm(shape.numel(), generator=self.generator)[:k]] = True
                masks[name] = m.view(shape)
        self.masks = {n: _like(self.params[n], masks[n]) for n in self.names}
        self.ever_active = {n: m.clone() for n, m in self.masks.items()}
        self.steps = 0
        self._refresh()
        self.apply()

    def _refresh(self):  # after a topology change
        self.counts = [int(self.masks[n].sum()) for n in self.names]
        self.sizes = [self.masks[n].numel() for n in self.names]
        self._build_multipliers()

    def _build_multipliers(self):  # CUDA: one fused _foreach kernel needs the weights' dtype; CPU: bool
        self._mult = [m.to(self.params[n].dtype) if m.is_cuda else m for n, m in self.masks.items()]

    @property
    def density(self) -> float:
        return sum(self.counts) / sum(self.sizes)

    def layer_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.counts))

    def itop_rate(self) -> float:  # in-time over-parameterization (Liu et al. 2021): fraction ever active
        return sum(int(m.sum()) for m in self.ever_active.values()) / sum(self.sizes)

    def _state_of(self, optimizer, p) -> list[torch.Tensor]:  # per-weight state (momentum, Adam moments)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None):  # zero masked weights and their momentum
        pairs = [(t, mult) for name, mult in zip(self.names, self._mult)
                 for t in [self.params[name], *self._state_of(optimizer, self.params[name])]]
        torch._foreach_mul_([t for t, _ in pairs], [mult for _, mult in pairs])

    def step(self, optimizer: torch.optim.Optimizer | None = None):  # after optimizer.step(): apply, count
        self.apply(optimizer)
        self.steps += 1

    @torch.no_grad()
    def update(self, death_rate: float, *, growth: str = "random", extra_prune: float = 0.0,
               extra_growth: float = 0.0, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Flying Bird's prune and regrow (Sec. 3.2), as released, in each layer not fully dense (nnz active): prune
        the k = ceil(p * nnz) of smallest |w| (FB+: ceil(p * extra_prune * nnz) more), regrow k (FB+: k +
        ceil(extra_growth * k)) among *all* positions then inactive, at random or by largest |grad| (RigL), as many
        as there are, at zero with zero momentum (released code can keep stale values). -> {'pruned', 'grown'}"""
        check_choice("growth", growth, GROWTHS)
        pruned = grown = 0
        for i, name in enumerate(self.names):
            p, mask = self.params[name], self.masks[name].reshape(-1).clone()  # logical order, a copy
            nnz, size = self.counts[i], self.sizes[i]
            k = math.ceil(death_rate * nnz)
            if nnz == size or k <= 0:  # released: a full layer is never pruned, not even by FB+'s extra
                continue
            k_drop = min(k + (math.ceil(death_rate * extra_prune * nnz) if extra_prune else 0), nnz)
            active = mask.nonzero().squeeze(1)
            drop = active[_smallest(p.reshape(-1)[active].abs(), k_drop)]
            mask.index_fill_(0, drop, False)
            pool = (~mask).nonzero().squeeze(1)  # inactive after pruning: the just-pruned included
            k_grow = min(k + (math.ceil(extra_growth * k) if extra_growth else 0), len(pool))
            if growth == "gradient":
                if p.grad is None:
                    raise SparseWinError("gradient growth needs p.grad: call update() after backward()")
                grow = pool[_smallest(-p.grad.reshape(-1)[pool].abs(), k_grow)]
            else:
                grow = pool[_choose(len(pool), k_grow, self.generator).to(p.device)]
            drop, grow = _memory_index(p, drop), _memory_index(p, grow)  # where they sit in _flat(p)
            both = torch.cat([drop, grow])
            # index_fill_: ~50x faster than t[idx] = ...; False first, so a pruned-and-regrown weight ends active
            _flat(self.masks[name]).index_fill_(0, drop, False).index_fill_(0, grow, True)
            _flat(self.ever_active[name]).index_fill_(0, grow, True)
            for t in [p, *self._state_of(optimizer, p)]:
                _flat(t).index_fill_(0, both, 0)  # pruned zero; regrown weights and momentum start at zero
            self.counts[i] = nnz - k_drop + k_grow
            pruned, grown = pruned + k_drop, grown + k_grow
        self._build_multipliers()
        return dict(pruned=pruned, grown=grown)

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


# ----------------------------------------------------------------------------- methods

class Method:
    """The hooks train() or your loop calls, and the model now (dense while mask is None). end_pretrain_epoch():
    True when AT starts afresh on `model` (a channel ticket thins it); after_step(): a topology update or None."""
    name = "method"
    milestones = (100, 150)  # lr x0.1 at these epochs (paper Sec. 2), unless the caller's schedule says otherwise

    def __init__(self):
        self.mask, self.model, self.channels, self.pretraining = None, None, None, False  # channels: kept by slim()

    def start(self, model: nn.Module, *, total_steps: int, epochs: int): self.model = model
    def end_pretrain_epoch(self, model: nn.Module, loss: float, acc: float, log=print) -> bool: return False
    def before_update(self): pass
    def end_epoch(self, train_ra: float, val: dict): pass
    def summary(self) -> dict: return dict(ticket_epochs=0, fbplus_events=[], early_bird_distances=[])
    @property
    def pretrain_epochs(self) -> int: return 0

    def _started(self) -> nn.Module:
        if self.model is None:
            raise SparseWinError(f"{self.name}: call start(model, total_steps=, epochs=) before using it")
        return self.model

    def after_step(self, optimizer: torch.optim.Optimizer, epoch: int) -> dict | None:
        self._started()
        if self.mask is not None:
            self.mask.step(optimizer)  # masked weights and their momentum back to zero

    @property
    def density(self) -> float: return self.mask.density if self.mask is not None else 1.0  # active fraction
    def itop_rate(self) -> float: return self.mask.itop_rate() if self.mask is not None else 1.0  # ever active

    def layer_counts(self) -> dict[str, int]:  # active weights per prunable layer
        return self.mask.layer_counts() if self.mask is not None else weight_counts(self._started())

    def forward_flops(self, per_weight: dict[str, int], constant: int = 0) -> int:  # from model_flops()
        return forward_flops(per_weight, self.layer_counts(), constant)

    def state_dict(self) -> dict:
        return dict(mask=self.mask.state_dict() if self.mask is not None else None, channels=self.channels,
                    pretraining=self.pretraining)

    def load_state_dict(self, state: dict):  # into the model it describes (thinned by slim() to `channels`)
        self.pretraining, self.channels = state["pretraining"], state.get("channels")
        if state["mask"] is not None:
            if self.mask is None:  # adopted after start(): Robust Bird's ticket
                self.mask = SparseMask(self.model, masks=state["mask"]["masks"])
            self.mask.load_state_dict(state["mask"])


class Dense(Method):  # dense PGD AT (Madry et al. 2018): the baseline rows of Table 1
    name = "dense AT"


# ----------------------------------------------------------------------------- Robust Bird (Sec. 3.1)

def magnitude_mask(weights: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: keep exactly round(density * total) largest |w| over all layers."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(round(density * flat.numel()), sorted=False).indices] = True
    return {n: k.view(w.shape) for (n, w), k in zip(weights.items(), keep.split([w.numel() for w in weights.values()]))}


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:  # normalized Hamming distance
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(m.numel() for m in a.values())


def bn_gammas(model: nn.Module) -> dict[str, nn.Parameter]:  # BatchNorm scales of the channel_groups, by BN name
    mods = dict(model.named_modules())
    return {n: mods[n].weight for n in channel_groups(model)}


def channel_mask(gammas: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Network slimming's global threshold (Liu et al. 2017; Early-Bird's channel tickets): keep the
    max(round(density * total), groups) largest |gamma| over all groups, each group's largest first."""
    flat = torch.cat([g.detach().abs().float().flatten() for g in gammas.values()])
    sizes = [g.numel() for g in gammas.values()]
    starts = torch.tensor([0] + sizes[:-1], device=flat.device).cumsum(0)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[starts + torch.stack([part.argmax() for part in flat.split(sizes)])] = True  # one per group
    rest = max(round(density * flat.numel()), len(sizes)) - len(sizes)
    keep[flat.masked_fill(keep, -1.0).topk(rest, sorted=False).indices] = True  # |gamma| >= 0 > -1
    return {n: k for n, k in zip(gammas, keep.split(sizes))}


EB_THRESHOLD = {"unstructured": 0.08, "channel": 0.1}  # released RB; Early-Bird's channel tickets (You et al.)


class EarlyBird:
    """Early-bird ticket detector (You et al. 2020; Sec. 3.1): emerged when the newest of the last `queue` masks
    is within `threshold` (normalized Hamming) of each older one; masks of conv magnitudes (as released) or channels."""

    def __init__(self, *, density: float, queue: int = 5, threshold: float = 0.08, kind: str = "unstructured"):
        check_choice("ticket", kind, TICKETS)
        self.density, self.queue, self.threshold, self.kind = density, queue, threshold, kind
        self.masks, self.distances = [], []  # the last `queue` masks; max distance newest-to-older, per record

    def current(self, model: nn.Module) -> dict[str, torch.Tensor]:  # the mask record() compares
        if self.kind == "channel":
            return channel_mask(bn_gammas(model), self.density)
        return magnitude_mask({n: w for n, w in prunable(model).items() if w.dim() >= 3}, self.density)

    def record(self, model: nn.Module) -> bool:
        self.masks = (self.masks + [{n: m.cpu() for n, m in self.current(model).items()}])[-self.queue:]
        d = [mask_distance(self.masks[-1], m) for m in self.masks[:-1]]
        self.distances.append(max(d) if d else 1.0)
        return self.emerged

    @property
    def emerged(self) -> bool: return len(self.masks) == self.queue and self.distances[-1] <= self.threshold

    def ticket(self, model: nn.Module) -> dict[str, torch.Tensor]:  # magnitude over conv *and* linear; or channels
        return self.current(model) if self.kind == "channel" else magnitude_mask(prunable(model), self.density)

    def state_dict(self) -> dict: return dict(masks=self.masks, distances=self.distances)
    def load_state_dict(self, state: dict): self.masks, self.distances = list(state["masks"]), list(state["distances"])


class RobustBird(Method):
    """Robust Bird (Sec. 3.1): dense training, no attack (counted in the FLOPs), until EarlyBird's ticket emerges; then
    AT of that subnetwork, weights kept. ticket="channel": L1 `bn_l1` on BN scales (network slimming), then slim()."""
    name = "Robust Bird"
    milestones = (50, 150)  # released: the ticket's AT reuses stage 1's schedule, lr x0.1 at 50 and 150

    def __init__(self, *, density: float, queue: int = 5, threshold: float | None = None, max_epochs: int = 50,
                 ticket: str = "unstructured", bn_l1: float = 1e-4):
        super().__init__()
        threshold = EB_THRESHOLD.get(ticket, 0.0) if threshold is None else threshold
        self.early = EarlyBird(density=density, queue=queue, threshold=threshold, kind=ticket)
        self.max_epochs, self.ticket_epochs, self.pretraining = max_epochs, 0, True
        self.ticket, self.bn_l1, self.full_weights = ticket, bn_l1, 0

    def start(self, model, *, total_steps, epochs):
        super().start(model, total_steps=total_steps, epochs=epochs)
        self.full_weights = sum(weight_counts(model).values())
        if self.ticket == "channel":
            channel_groups(model)  # a model without channel groups is refused now, not after stage 1

    def before_update(self):
        if self.pretraining and self.ticket == "channel" and self.bn_l1:
            for g in bn_gammas(self.model).values():  # network slimming: d/dgamma of bn_l1 * |gamma|
                if g.grad is not None:
                    g.grad.add_(torch.sign(g.detach()), alpha=self.bn_l1)

    @property
    def density(self) -> float:  # a channel ticket: the thin network's weights over the full network's
        return super().density if self.channels is None else sum(weight_counts(self.model).values()) / self.full_weights

    def itop_rate(self) -> float: return self.density if self.channels is not None else super().itop_rate()

    def end_pretrain_epoch(self, model, loss, acc, log=print) -> bool:
        self.ticket_epochs += 1
        emerged = self.early.record(model)
        log(f"ticket epoch {self.ticket_epochs:3d} loss {loss:.4f} acc {acc:5.2f} "
            f"mask distance {self.early.distances[-1]:.4f}{' -> early bird' if emerged else ''}")
        if not (emerged or self.ticket_epochs >= self.max_epochs):
            return False
        if self.ticket == "channel":  # a thinner dense network; the surviving weights stay
            keep = self.early.ticket(model)
            self.model, self.channels = slim(model, keep), {n: int(k.sum()) for n, k in keep.items()}
        else:
            self.mask = SparseMask(model, masks=self.early.ticket(model))  # prune; the weights stay
        self.pretraining = False
        return True

    def summary(self) -> dict:
        return dict(ticket_epochs=self.ticket_epochs, fbplus_events=[], early_bird_distances=self.early.distances)

    def state_dict(self) -> dict:
        return dict(super().state_dict(), early=self.early.state_dict(), ticket_epochs=self.ticket_epochs)

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.early.load_state_dict(state["early"])
        self.ticket_epochs = state["ticket_epochs"]

    @property
    def pretrain_epochs(self) -> int: return self.ticket_epochs


# ----------------------------------------------------------------------------- Flying Bird (Sec. 3.2)

def cosine_death_rate(step: int, total_steps: int, initial: float = 0.5, final: float = 0.005) -> float:
    """Death rate p (Sec. 3.2): cosine decay from `initial` at step 0 to `final` at total_steps."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * t))


class FlyingBird(Method):
    """Flying Bird (Sec. 3.2): dynamic sparse AT at constant density from a random mask (IGQ, as released): every T
    steps each layer not full drops its ceil(p * nnz) smallest |w| and regrows as many (random, or |grad|: RigL)."""
    name = "Flying Bird"

    def __init__(self, *, density: float = 0.2, allocation: str = "igq", growth: str = "random", seed: int = 0,
                 death_rate: float = 0.5, death_rate_final: float = 0.005, interval: int = 900,
                 interval_late: int = 1200):
        super().__init__()
        self.allocation = check_choice("allocation", allocation, ALLOCATIONS)
        self.target_density, self.growth, self.seed = density, check_choice("growth", growth, GROWTHS), seed
        self.death_rate, self.death_rate_final = death_rate, death_rate_final
        self.interval, self.interval_late = interval, interval_late

    def start(self, model, *, total_steps, epochs):
        super().start(model, total_steps=total_steps, epochs=epochs)
        self.mask = SparseMask(model, density=self.target_density, allocation=self.allocation, seed=self.seed)
        self.total_steps, self.late_epoch = total_steps, epochs // 2
        early = total_steps * self.late_epoch // max(epochs, 1)  # steps before T switches to interval_late
        if not (self.interval <= early or total_steps // self.interval_late > early // self.interval_late):
            warnings.warn(f"{self.name}: no topology update in {total_steps} steps (T = {self.interval}, then "
                          f"{self.interval_late}): the mask stays as drawn; choose shorter intervals", stacklevel=2)

    def decide(self, epoch: int, step: int) -> dict: return {}  # update()'s extra arguments at this step: FB+'s

    def after_step(self, optimizer, epoch) -> dict | None:
        self._started()
        self.mask.step(optimizer)
        interval = self.interval_late if epoch >= self.late_epoch else self.interval  # released: T 900, then 1200
        if self.mask.steps % interval:
            return None
        p = cosine_death_rate(self.mask.steps, self.total_steps, self.death_rate, self.death_rate_final)
        extras = self.decide(epoch, self.mask.steps)
        changed = self.mask.update(p, growth=self.growth, optimizer=optimizer, **extras)
        return dict(step=self.mask.steps, epoch=epoch, death_rate=p, density=self.mask.density, **changed, **extras)


# ----------------------------------------------------------------------------- Flying Bird+ (Sec. 3.2)

def fbplus_decision(gaps: list[float], losses: list[float], *, window: int = 4,
                    threshold: float = 0.5) -> tuple[bool, bool]:
    """Flying Bird+ (Sec. 3.2): (extra prune, extra growth): whether >= threshold * window of the last `window` changes
    of the robust gap (train RA - val RA) are rises / of the val adversarial loss not falls. Short history: neither."""
    def count(h, rising):
        tail = h[-window - 1:]
        return sum((b > a) if rising else (b >= a) for a, b in zip(tail, tail[1:])) if len(h) > window else -1
    enough = threshold * window
    return count(gaps, True) >= enough, count(losses, False) >= enough


class FlyingBirdPlus(FlyingBird):
    """Flying Bird+ (Sec. 3.2): from `start_epoch` (half of training) a topology update prunes ceil(p * prune_ratio
    * nnz) more per layer when the robust gap rose, and regrows k + ceil(growth_ratio * k), k = ceil(p * nnz) (as
    released), when the val adversarial loss did not fall, each in >= threshold x window of the last `window` epochs."""
    name = "Flying Bird+"

    def __init__(self, *, start_epoch: int, window: int = 4, threshold: float = 0.5, prune_ratio: float = 0.4,
                 growth_ratio: float = 0.05, **flying_bird):
        super().__init__(**flying_bird)
        self.start_epoch, self.window, self.threshold = start_epoch, window, threshold
        self.prune_ratio, self.growth_ratio = prune_ratio, growth_ratio
        self.gaps, self.losses, self.events = [], [], []  # per epoch: gap, val adv loss; the fired FB+ events

    def record(self, gap: float, val_adv_loss: float):
        self.gaps.append(gap)
        self.losses.append(val_adv_loss)

    def end_epoch(self, train_ra, val): self.record(train_ra - val["ra"], val["adv_loss"])  # gap_t = train - val RA

    def decide(self, epoch: int, step: int) -> dict:
        prune, grow = (fbplus_decision(self.gaps, self.losses, window=self.window, threshold=self.threshold)
                       if epoch >= self.start_epoch else (False, False))
        if prune or grow:
            self.events.append(dict(epoch=epoch, step=step, prune=prune, grow=grow))
        return dict(extra_prune=self.prune_ratio if prune else 0.0, extra_growth=self.growth_ratio if grow else 0.0)

    def summary(self) -> dict: return dict(super().summary(), fbplus_events=self.events)

    def state_dict(self) -> dict:
        return dict(super().state_dict(), gaps=self.gaps, losses=self.losses, events=self.events)

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.gaps, self.losses, self.events = list(state["gaps"]), list(state["losses"]), list(state["events"])


# ----------------------------------------------------------------------------- regularizers, with every method
# The abstract: sparsity "can be organically combined with existing regularizers"; these three keep the masks.

def trades_attack(model: nn.Module, x: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                  generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """TRADES' inner maximization (Zhang et al. 2019): PGD on KL(f(x) || f(x')) from x + start (attack_start's)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    if start is None:
        start = attack_start(x.shape, eps=eps, kind="trades", generator=generator, device=x.device, dtype=x.dtype)
    kl = lambda logits, p: F.kl_div(F.log_softmax(logits, dim=1), p, reduction="sum")  # noqa: E731 (reference: sum)
    return pgd(model, x, p_clean, eps=eps, alpha=alpha, steps=steps, norm=norm, loss_fn=kl, init=x + start)


def trades_loss(model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, *, beta: float):
    """TRADES' objective CE(f(x), y) + beta * KL(f(x) || f(x')), batchmean as the reference: (loss, adv logits)."""
    logits, adv_logits = model(x), model(x_adv)
    kl = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl, adv_logits


def awp_perturbation(model: nn.Module, loss_fn, *, gamma: float, masks: dict[str, torch.Tensor] | None = None,
                     reduce=None) -> dict[str, torch.Tensor]:
    """AWP (Wu et al. 2020): v_l = gamma ||w_l|| g_l / ||g_l|| per prunable weight, g the gradient of loss_fn(forward)
    (one ascent step, as the reference) with copied buffers (BN statistics stay), 0 where masks prune; reduce: on g."""
    weights = prunable(model)
    state = {**dict(model.named_parameters()), **{n: b.clone() for n, b in model.named_buffers()}}
    loss = loss_fn(lambda x: torch.func.functional_call(model, state, (x,)))
    grads = torch.autograd.grad(loss, list(weights.values()))
    if reduce is not None:
        flat = reduce(torch.cat([g.flatten() for g in grads]))
        grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
    grads = {n: g * masks[n] if masks is not None and n in masks else g for n, g in zip(weights, grads)}
    return {n: gamma * weights[n].detach().norm() * g / (g.norm() + 1e-20) for n, g in grads.items()}  # ref. EPS 1e-20


class perturbed:
    """with perturbed(model, v): weights at w + v inside, restored from a copy (w + v - v can round), also on raise."""

    def __init__(self, model: nn.Module, v: dict[str, torch.Tensor] | None):
        self.weights, self.v = prunable(model), v or {}

    def __enter__(self):
        self.saved = {n: self.weights[n].detach().clone() for n in self.v}
        with torch.no_grad():
            for n, d in self.v.items():
                self.weights[n].add_(d)

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, w in self.saved.items():
                self.weights[n].copy_(w)


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * w for weights and float buffers, integer buffers copied (Gowal et al. 2020;
    Rebuffi et al. 2021); masks keep it exactly as sparse as the model (regrown at zero). `model`: the average."""

    def __init__(self, model: nn.Module, *, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None):
        for a, p in zip(self.model.parameters(), model.parameters()):
            a.lerp_(p.detach(), 1 - self.decay)
        for a, b in zip(self.model.buffers(), model.buffers()):
            a.lerp_(b, 1 - self.decay) if a.is_floating_point() else a.copy_(b)
        if masks is not None:
            weights = prunable(self.model)
            for n, m in masks.items():
                weights[n].mul_(m)

    def state_dict(self) -> dict: return self.model.state_dict()
    def load_state_dict(self, state: dict): self.model.load_state_dict(state)


# ----------------------------------------------------------------------------- the adversarial training step

def adversarial_step(model: nn.Module, x, y, optimizer, method: Method | None = None, *, eps: float, alpha: float,
                     steps: int, norm: str = "linf", kind: str = "pgd", loss: str = "ce", beta: float = 6.0,
                     awp_gamma: float = 0.0, average: WeightAverage | None = None, epoch: int = 0, generator=None,
                     start=None, bf16: bool = False, before_backward=None, reduce=None, attack_model=None,
                     update_model=None) -> dict:
    """One optimizer step of the paper's AT (Sec. 2): attack `kind` (none: standard training; loss "trades": TRADES'
    KL attack), the loss at the AWP-moved weights, backward, step, method.after_step, the average. before_backward(loss)
    may raise: a bad step never touches the weights. attack_model / update_model: those forwards if not model (compiled,
    DDP). Returns loss, logits (of x_adv), update (topology update or None), passes, forwards (FlopLedger.charge's)."""
    trades = check_choice("attack", kind, ATTACKS) != "none" and check_choice("loss", loss, LOSSES) == "trades"
    awp, masks = kind != "none" and awp_gamma > 0, method.mask.masks if method and method.mask else None
    attack = dict(eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator, start=start)
    attack_model, update_model = (m if m is not None else model for m in (attack_model, update_model))  # not `or`:
    with autocast(x.device.type, bf16):  # a compiled module has no truth value
        x_adv = trades_attack(attack_model, x, **attack) if trades else perturb(attack_model, x, y, kind=kind, **attack)

    def objective(f):  # (loss, logits on x_adv) of a forward f
        if trades:
            return trades_loss(f, x, x_adv, y, beta=beta)
        logits = f(x_adv)
        return F.cross_entropy(logits, y), logits
    with autocast(x.device.type, bf16):
        v = (awp_perturbation(model, lambda f: objective(f)[0], gamma=awp_gamma, masks=masks, reduce=reduce)
             if awp else None)
    with perturbed(model, v):  # AWP: the gradient at w + v, then w restored exactly
        with autocast(x.device.type, bf16):
            value, logits = objective(update_model)
        if before_backward is not None:
            before_backward(value)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if method is not None:
            method.before_update()  # Robust Bird's channel ticket: the BatchNorm L1 subgradient in stage 1
    optimizer.step()
    update = method.after_step(optimizer, epoch) if method is not None else None
    if average is not None:
        average.update(model, masks)  # the weights as re-masked (and maybe updated) just now
    return dict(loss=value, logits=logits, update=update, passes=(2 if trades else 1) * (2 if awp else 1),
                forwards=int(trades))


# ----------------------------------------------------------------------------- FLOPs

def _weight_flops(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:  # per weight of a call: 2 (mul + add) x uses
    if isinstance(m, CONV_TRANSPOSES):  # each input position scatters through the whole kernel
        return 2 * inp[0].numel() // m.in_channels
    return 2 * out.numel() // (m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def _attention_flops(m: nn.MultiheadAttention, prefix: str, args: tuple, kwargs: dict) -> tuple[dict, int]:
    """One nn.MultiheadAttention call: (FLOPs per projection weight, FLOPs of Q K^T and softmax(.) V, always dense)."""
    q, k = (args[i] if len(args) > i else kwargs[key] for i, key in enumerate(("query", "key")))
    b = 1 if q.dim() == 2 else q.shape[0 if m.batch_first else 1]  # q: (L, E), (B, L, E) or (L, B, E)
    lq, lk = q.numel() // (b * q.shape[-1]), k.numel() // (b * k.shape[-1])  # query, key tokens
    if m.in_proj_weight is not None and lq != lk:  # rows 0:E serve the queries, E:3E the keys
        raise SparseWinError(f"{prefix}in_proj_weight: {lq} queries but {lk} keys use its rows unevenly, "
                             "so no one FLOPs-per-weight value is exact")
    w = {"in_proj_weight": 2 * b * lq} if m.in_proj_weight is not None else {
        "q_proj_weight": 2 * b * lq, "k_proj_weight": 2 * b * lk, "v_proj_weight": 2 * b * lk}
    w["out_proj.weight"] = 2 * b * lq  # applied by F.multi_head_attention_forward: out_proj's own hook never fires
    keys = lk + (m.bias_k is not None) + m.add_zero_attn  # add_bias_kv / add_zero_attn append a key each
    return {prefix + n: f for n, f in w.items()}, 2 * 2 * b * lq * keys * m.embed_dim  # heads x head_dim = E


@torch.no_grad()
def model_flops(model: nn.Module, input_shape: tuple) -> tuple[dict[str, int], int]:
    """Forward FLOPs per image: (per active weight of each prunable layer, a dense constant: MultiheadAttention's
    matmuls). A weight costs 2 FLOPs per use (output position of a conv, input position of a transposed conv, token),
    so exactly value x nnz; together FlopCounterMode's count if every matmul runs in these modules (not in raw SDPA)."""
    per_weight, constant, hooks = dict.fromkeys(prunable(model), 0), [0], []  # a layer that never runs costs 0

    def add(flops: dict[str, int], unowned: int = 0):  # accumulate: a layer may run more than once
        for n, f in flops.items():
            per_weight[n] += f
        constant[0] += unowned
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):  # with_kwargs: key may be passed by name
            hook = lambda mod, a, kw, o, pre=pre: add(*_attention_flops(mod, pre, a, kw))  # noqa: E731
            hooks.append(m.register_forward_hook(hook, with_kwargs=True))
        elif _weight_names(m):
            hook = lambda mod, i, o, n=pre + "weight": add({n: _weight_flops(mod, i, o)})  # noqa: E731
            hooks.append(m.register_forward_hook(hook))
    was_training, p = model.training, next(model.parameters())
    try:
        model.eval()  # eval fast paths: MHA's still calls its hook; TransformerEncoderLayer's is off with hooks on
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return per_weight, constant[0]


def forward_flops(per_weight: dict[str, int], counts: dict[str, int], constant: int = 0) -> int:
    """Forward FLOPs per image with `counts` active weights per layer, plus model_flops' dense `constant`."""
    return sum(per_weight[n] * counts[n] for n in per_weight) + constant


class FlopLedger:
    """Training FLOPs at each step's density. paper: 3 x (K + 1) x forward per image (K attack steps + 1 update, each a
    forward and a 2x backward; PGD-10 AT = 33x). actual: an attack step 2x (input gradient), the update 3x: 23x.
    passes: weight forward+backward passes per step (TRADES 2, AWP x2); forwards: with no backward (TRADES 1)."""

    def __init__(self): self.paper = self.actual = self.images = self.steps = 0

    def charge(self, images: int, forward: int, attack_steps: int, passes: int = 1, forwards: int = 0):
        self.paper += (3 * (attack_steps + passes) + forwards) * forward * images
        self.actual += (2 * attack_steps + 3 * passes + forwards) * forward * images
        self.images, self.steps = self.images + images, self.steps + 1

    def state_dict(self) -> dict:
        return dict(paper=self.paper, actual=self.actual, images=self.images, steps=self.steps)

    def load_state_dict(self, state: dict): self.__dict__.update(state)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 3  # 1: unversioned, the mask twice; 2: the mask once; 3: and build_model's arguments


def save_model(path, model: nn.Module, *, architecture: dict, mask: SparseMask | None = None,
               channels: dict[str, int] | None = None, save=torch.save, **extra):
    """Write the weights and all load_model needs (build_model's arguments, mask, slim()'s channels), plus extra."""
    save(dict(extra, format=CHECKPOINT_FORMAT, architecture=dict(architecture), model=model.state_dict(),
              mask=mask.state_dict() if mask is not None else None, channels=channels), path)


def find_checkpoint(path) -> str:  # a file as given; a run directory means its best.pt
    if not os.path.exists(path):
        raise SparseWinError(f"no such checkpoint or run directory: {path}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "best.pt")):
            raise SparseWinError(f"{path} holds no best.pt; pass a checkpoint file (best.pt or last.pt)")
        return os.path.join(path, "best.pt")
    return str(path)


def read_checkpoint(path) -> dict:
    """A checkpoint, read on the CPU by the weights-only unpickler; format 1's second mask dropped, newer refused."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SparseWinError(f"{path} is not a sparse_win checkpoint ({type(e).__name__})") from None
    version = ck.get("format", 1) if isinstance(ck, dict) else 1
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise SparseWinError(f"{path} was written by a newer sparse_win (checkpoint format {version}); this one "
                             f"reads formats 1 to {CHECKPOINT_FORMAT}")
    if not isinstance(ck, dict) or not {"model", "mask"} <= set(ck):
        raise SparseWinError(f"{path} is not a sparse_win checkpoint (it lacks model or mask)")
    if isinstance(ck.get("method"), dict):
        ck["method"].pop("mask", None)  # format 1: the same state as ck["mask"]
    return ck


def build_thin(architecture: dict, channels: dict[str, int] | None = None) -> nn.Module:  # slim()'d to channels
    net = build_model(**architecture)
    return slim(net, channels) if channels else net


def model_from_checkpoint(ck: dict, path="checkpoint", architecture: dict | None = None):
    """(the model on the CPU in eval mode, masks or None), masked weights checked zero; architecture: for format < 3."""
    arch = ck.get("architecture") or architecture
    if arch is None:
        raise SparseWinError(f"{path}: checkpoint format {ck.get('format', 1)} does not record its architecture; "
                             f"pass architecture= (build_model's arguments), or evaluate it with sparse_win.py --eval")
    net = build_thin(arch, ck.get("channels"))
    try:
        net.load_state_dict(ck["model"])
    except RuntimeError:
        raise SparseWinError(f"{path}: the weights do not fit a {arch['arch']} (width {arch.get('width', 1.0)}) "
                             f"with {arch.get('num_classes', 10)} classes") from None
    masks = ck["mask"]["masks"] if ck["mask"] else None
    if masks is not None:
        weights = prunable(net)
        if set(masks) != set(weights) or any(masks[n].shape != weights[n].shape for n in weights):
            raise SparseWinError(f"{path}: its mask does not fit the model's conv and linear weights")
        if alive := sum(int(weights[n].detach()[~masks[n]].count_nonzero()) for n in weights):
            raise SparseWinError(f"{path}: {alive} masked weights are not zero; the checkpoint is corrupt")
    return net.eval(), masks


def load_model(path, *, device="cpu", architecture: dict | None = None) -> nn.Module:
    """The trained model of a checkpoint file or run directory (its best.pt), for attacks: eval mode, masked
    weights checked to be zero, inputs in [0, 1], logits out (the RobustBench / torchattacks convention)."""
    path = find_checkpoint(path)
    return model_from_checkpoint(read_checkpoint(path), path, architecture)[0].to(device)


# === program: everything above this line is the library (torch only; copy the file down to here to use it)
# Below, the program (python sparse_win.py ...) as the data flows: config, data, run, distributed, files, train, report.

import argparse, dataclasses, errno, hashlib, importlib.util, io, json, re, signal, sys, time  # noqa: E401, E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402


# ----------------------------------------------------------------------------- config

MODES = ("dense", "static", "dynamic", "dynamic+", "small-dense")
EVAL_ATTACKS = ("pgd", "autoattack", "all")
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


# Exit statuses of the CLI besides 0 and 2 (bad input): each a one-line message, never a traceback.
DIVERGED, DESYNC, OUT_OF_MEMORY, IO_ERROR, INTERRUPTED, TERMINATED = 3, 4, 5, 74, 130, 143  # 74 EX_IOERR; 128 + signal


class RunError(RuntimeError):
    """A run that cannot go on (diverged, disk full, preempted); `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def option(default, help: str, *, valid=None, **kw):
    """A Config field: default, --help, check (valid=(predicate, what it must be)), argparse keywords (choices=)."""
    return field(default=default, metadata={"help": help, "valid": valid, **kw})


POSITIVE, AT_LEAST_0 = (lambda v: v > 0, "positive"), (lambda v: v >= 0, ">= 0")  # option(valid=...)
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class Config:
    """Every option of a run. The CLI is generated from these fields (--field-name)."""
    preset: str = option("", "start from a preset; explicit flags override it")
    dataset: str = option("cifar10", "the dataset", choices=tuple(DATASETS))
    data_dir: str = option("./data", "where datasets live (torchvision layout; Tiny-ImageNet: official layout)")
    download: bool = option(True, "download CIFAR / Fashion-MNIST through torchvision when missing")
    arch: str = option("resnet18", "architecture (wrn: WideResNet)", choices=ARCHS)
    width: float = option(1.0, "width multiplier (1.0 = paper; 0.25 = 16 base channels for CPU runs)", valid=POSITIVE)
    wrn_depth: int = option(34, "WideResNet depth (6n+4)")
    wrn_widen: int = option(10, "WideResNet widen factor")
    mode: str = option("dense", "dense AT | static (Robust Bird) | dynamic (Flying Bird) | dynamic+ (Flying Bird+) | "
                       "small-dense (dense AT, narrowed to a --sparsity model's weights)", choices=MODES)
    sparsity: float = option(0.8, "s = 1 - d: the fraction of conv+linear weights that are zero (--ticket channel: of "
                             "the prunable channels removed; the weight density is reported)", valid=FRACTION)
    allocation: str = option("igq", "layer-wise density for FB/FB+ (igq: released default)", choices=ALLOCATIONS)
    growth: str = option("random", "FB regrowth (random: released default; gradient: RigL-style)", choices=GROWTHS)
    death_rate: float = option(0.5, "p at step 0; cosine decay to --death-rate-final (Sec. 3.2)")
    death_rate_final: float = option(0.005, "p at the last step")
    update_interval: int = option(900, "T: steps between topology updates (first half of training)", valid=POSITIVE)
    update_interval_late: int = option(1200, "T in the second half of training", valid=POSITIVE)
    fbplus_start: int = option(-1, "FB+: first epoch of adaptive pruning/growth (-1 = epochs // 2)")
    fbplus_window: int = option(4, "FB+: number of consecutive differences looked at")
    fbplus_prune: float = option(0.4, "FB+: extra prune ratio (extra = ceil(p * ratio * nnz))")
    fbplus_grow: float = option(0.05, "FB+: extra growth ratio (grow (1 + ratio) x the pruned count)")
    fbplus_threshold: float = option(0.5, "FB+: fraction of the window that must agree")
    ticket: str = option("unstructured", "RB: unstructured (the paper) | channel (a thinner network)", choices=TICKETS)
    bn_l1: float = option(1e-4, "RB channel ticket: stage 1's L1 on BN scales (network slimming)", valid=AT_LEAST_0)
    eb_threshold: float = option(-1.0, "RB: mask distance at which the early bird emerged (-1: 0.08; channel 0.1)")
    eb_queue: int = option(5, "RB: FIFO length of recent ticket masks")
    eb_max_epochs: int = option(50, "RB: cap on stage-1 (standard training) epochs")
    epochs: int = option(200, "adversarial training epochs", valid=POSITIVE)
    batch_size: int = option(128, "minibatch size", valid=POSITIVE)
    lr: float = option(0.1, "SGD learning rate")
    milestones: tuple = option((), "epochs of lr x0.1 (default 100 150; Robust Bird's AT 50 150)", nargs="+", type=int)
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    norm: str = option("linf", "attack norm", choices=NORMS)
    train_eps: float = option(-1.0, "training eps in 1/255 units (-1 = dataset default: 8, Fashion-MNIST 25.5)")
    train_alpha: float = option(-1.0, "training step size in 1/255 units (-1 = eps / 4)")
    train_steps: int = option(10, "training PGD steps K (PGD-10)", valid=AT_LEAST_0)
    test_eps: float = option(-1.0, "evaluation eps in 1/255 units (-1 = train eps)")
    test_alpha: float = option(-1.0, "evaluation step size in 1/255 units (-1 = eps / 4)")
    test_steps: int = option(20, "evaluation PGD steps (PGD-20)", valid=AT_LEAST_0)
    train_subset: int = option(0, "use only the first N training images (0 = all)", valid=AT_LEAST_0)
    augment: bool = option(True, "augment training images: random crop + flip (+ 15-degree rotation on CIFAR-100)")
    eval_every: int = option(1, "evaluate val/test every N epochs and the last (best, FB+ see those)", valid=POSITIVE)
    eval_subset: int = option(0, "evaluate on the first N val/test images (0 = all)", valid=AT_LEAST_0)
    gap_subset: int = option(5000, "training images for the final robust gap (0 = all)", valid=AT_LEAST_0)
    device: str = option("auto", "where to run (auto: CUDA when there is one)", choices=("auto", "cpu", "cuda"))
    seed: int = option(0, "seed of every random draw (data order, augmentation, attack starts, masks)")
    out: str = option("", "run directory (default runs/<dataset>-<mode>-s<sparsity>-seed<seed>)")
    resume: str = option("no", "continue --out from its last.pt; --resume auto: continue, start, or exit 0 if finished",
                         nargs="?", const="yes", negate="no", choices=("no", "yes", "auto"))
    stop_after_epoch: int = option(0, "stop after this epoch and keep last.pt, e.g. for time-limited jobs (0 = never)")
    checkpoint_every: int = option(0, "also write last.pt every N optimizer steps (0: at epoch ends)", valid=AT_LEAST_0)
    amp: bool | None = option(None, "bf16 autocast", switch="on for CUDA, off for CPU")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "torchrun: SyncBatchNorm across ranks (CUDA); else each rank's BN sees its shard")
    dist_timeout: int = option(600, "torchrun: seconds a collective waits for the other ranks", valid=POSITIVE)
    channels_last: bool | None = option(None, "channels_last memory format", switch="on for CUDA, off for CPU")
    progress: bool = option(True, "progress bar within each epoch (tqdm)")
    benchmark: bool = option(False, "print PGD-10 AT throughput for dense and sparse models, then exit")
    train_attack: str = option("pgd", "PGD-K | fgsm-rs: Fast AT (Wong et al. 2020)", choices=ATTACKS[:2])
    loss: str = option("ce", "ce: PGD-AT (Madry et al. 2018) | trades: TRADES (Zhang et al. 2019)", choices=LOSSES)
    trades_beta: float = option(6.0, "TRADES: beta, the weight of the KL term", valid=AT_LEAST_0)
    awp_gamma: float = option(0.0, "AWP (Wu et al. 2020): size of the adversarial weight perturbation relative to each "
                              "layer's norm (0 = off; 0.005 = the reference's)", valid=AT_LEAST_0)
    awp_warmup: int = option(10, "AWP's first epoch (from 1; the reference's 'epoch >= awp_warmup')", valid=AT_LEAST_0)
    ema_decay: float = option(0.0, "weight averaging: EMA decay per step (0 = off); the average is evaluated and saved",
                              valid=FRACTION)
    ticket_attack: str = option("none", "Robust Bird stage 1 (none: standard training, the paper)", choices=ATTACKS)
    eval: str = option("", "evaluate a checkpoint (best.pt, last.pt, or a run directory = its best.pt), then exit")
    split: str = option("test", "--eval: the images (train: the run's, unaugmented)", choices=("test", "val", "train"))
    eval_steps: int = option(50, "--eval: PGD steps", valid=POSITIVE)
    restarts: int = option(5, "--eval: PGD restarts (robust only if every one fails)", valid=POSITIVE)
    attack: str = option("all", "--eval: the attacks (AutoAttack needs the pyautoattack package)", choices=EVAL_ATTACKS)
    aa_version: str = option("standard", "--eval: AutoAttack version", choices=("standard", "rand", "plus"))
    aa_iters: int = option(0, "--eval: AutoAttack's iterations (0: standard; others: a quick check)", valid=AT_LEAST_0)
    check_subset: int = option(1000, "--eval: images for the gradient-masking checks (0 = all)", valid=AT_LEAST_0)
    force: bool = option(False, "--eval: overwrite the results file of an earlier evaluation with the same options")
    final_eval: str = option("none", "--eval best.pt and last.pt at the end", choices=("none", "autoattack"))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def eps(self, train: bool) -> tuple[float, float]:  # (eps, alpha) in pixels, of the training or evaluation attack
        r = resolved(self)
        return (r.train_eps / 255, r.train_alpha / 255) if train else (r.test_eps / 255, r.test_alpha / 255)

    @property
    def eval_batch_size(self) -> int:  # evaluation: at least 256 (train() and --eval alike: the same SA, bit for bit)
        return max(self.batch_size, 256)

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}-{self.mode}-s{self.sparsity:g}-seed{self.seed}")


PRESETS = {
    # Fashion-MNIST, 16-channel ResNet-18, PGD-5: every part of FB+ in a few minutes on 2 cores.
    "cpu-demo": dict(dataset="fashion-mnist", width=0.25, mode="dynamic+", sparsity=0.8, epochs=6,
                     milestones=(4, 5), train_steps=5, test_steps=10, train_subset=3000,
                     eval_subset=500, gap_subset=500, update_interval=20, update_interval_late=25,
                     eb_max_epochs=3, batch_size=128, lr=0.05),
    # Seconds of Flying Bird+ (run_experiments.sh --smoke, the tests): a topology update every 2-3 steps, and its
    # adaptive rule forced to fire (from epoch 0, window 1, threshold 0: extra pruning and growth in epoch 3).
    "smoke": dict(dataset="fashion-mnist", width=0.0625, mode="dynamic+", epochs=3, milestones=(2,), train_steps=2,
                  test_steps=2, train_subset=256, eval_subset=64, gap_subset=64, update_interval=2,
                  update_interval_late=3, fbplus_start=0, fbplus_window=1, fbplus_threshold=0.0, eb_max_epochs=2,
                  batch_size=64, progress=False, out="runs/smoke"),
}


def need(ok: bool, msg: str):
    if not ok:
        raise SparseWinError(msg)


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def validate(cfg: Config, *, world: int = 1) -> Config:
    """cfg, checked: options in range and consistent, CUDA and pyautoattack there if asked for, batch % world == 0."""
    for f in dataclasses.fields(Config):
        v, valid = getattr(cfg, f.name), f.metadata["valid"]
        if "choices" in f.metadata:
            check_choice(f.name.replace("_", " "), v, f.metadata["choices"])
        need(valid is None or valid[0](v), f"--{f.name.replace('_', '-')} must be {valid and valid[1]}, got {v}")
    need(0 <= cfg.death_rate_final <= cfg.death_rate < 1, "need 0 <= --death-rate-final <= --death-rate < 1")
    need(cfg.arch != "wrn" or (cfg.wrn_depth - 4) % 6 == 0, "--wrn-depth must be 6n+4 (e.g. 34)")
    need(cfg.fbplus_window >= 1 and cfg.eb_queue >= 2, "need --fbplus-window >= 1 and --eb-queue >= 2")
    need(cfg.ticket == "unstructured" or cfg.mode == "static",
         f"--ticket {cfg.ticket} is Robust Bird's (--mode static), not --mode {cfg.mode}'s")
    need(cfg.eb_threshold >= 0 or cfg.eb_threshold == -1, "need --eb-threshold >= 0 (or -1, the ticket's default)")
    need(cfg.loss == "ce" or cfg.train_attack == "pgd", "--loss trades runs its own PGD attack: drop --train-attack")
    need(cfg.final_eval == "none" or cfg.attack != "pgd", "--final-eval autoattack runs AutoAttack: drop --attack pgd")
    if cfg.final_eval != "none" or (cfg.eval and cfg.attack != "pgd"):  # refuse now, not after hours of work
        need(importlib.util.find_spec("pyautoattack") is not None, AA_MISSING + " (or pass --attack pgd)")
    if cfg.device == "cuda":
        need(torch.cuda.is_available(), "--device cuda asked for, but torch sees no CUDA device")
    need(not cfg.sync_bn or resolve_device(cfg.device).type == "cuda",
         "--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
    need(cfg.batch_size % world == 0, f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                                      f"number of processes, {world}")
    return cfg


# ----------------------------------------------------------------------------- data

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def splits(x, y, test: tuple, source) -> dict:  # the last tenth of (x, y) is validation (CIFAR: 5,000 of 50,000)
    n = len(x) // 10
    return dict(train=(x[:-n], y[:-n]), val=(x[-n:], y[-n:]), test=test, source=str(source))  # source: the folder


def torchvision_datasets(why: str):  # torchvision.datasets, or how to install it (the library needs torch alone)
    try:
        from torchvision import datasets
    except ImportError:
        raise SparseWinError(f"{why} needs torchvision: pip install torchvision (requirements.txt pins the version "
                             f"that matches torch)") from None
    return datasets


def load_cifar(name: str, root: str, download: bool = False):
    """CIFAR-10/100 as uint8 (N, 3, 32, 32) tensors: train 45,000 / val 5,000 / test 10,000."""
    cls = getattr(torchvision_datasets(f"reading {name}"), name.upper())  # CIFAR10, CIFAR100
    try:
        parts = [cls(root, train=t, download=download) for t in (True, False)]
    except Exception as e:  # offline download failure, missing or corrupt files
        files = "data_batch_1..5, test_batch" if name == "cifar10" else "train, test"
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
        raise SparseWinError(f"{name} not found in {Path(root) / cls.base_folder} ({why}); put the python-version "
                             f"files ({files}) there, or run online with --download")
    (x, y), test = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                     torch.tensor(d.targets, dtype=torch.long)) for d in parts]
    return splits(x, y, test, Path(root) / cls.base_folder)


def _read_idx(path) -> torch.Tensor:  # an IDX file (MNIST format, optionally gzipped) as a uint8 tensor
    import gzip
    data = (gzip.open if str(path).endswith(".gz") else open)(path, "rb").read()
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]  # data[3]: ndim
    return torch.frombuffer(bytearray(data[4 + 4 * len(dims):]), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(root: str, download: bool = False, debian_dir: str = DEBIAN_FASHION_MNIST):
    """Fashion-MNIST (N, 1, 28, 28), 54,000 / 6,000 / 10,000: from root, else Debian's package, else a download."""
    names = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
    for folder in (Path(root) / "FashionMNIST" / "raw", Path(debian_dir)):
        paths = {(s, k): next((p for p in (folder / f, folder / (f + ".gz")) if p.exists()), None)
                 for s in names for k, n in (("images", 3), ("labels", 1)) for f in [names[s].format(k, n)]}
        if all(paths.values()):
            xs = {s: _read_idx(paths[s, "images"]).unsqueeze(1) for s in names}
            ys = {s: _read_idx(paths[s, "labels"]).long() for s in names}
            return splits(xs["train"], ys["train"], (xs["test"], ys["test"]), folder)
    missing = (f"fashion-mnist not found in {root}/FashionMNIST/raw or {debian_dir}", "; install Debian's "
               f"dataset-fashion-mnist or put the four IDX files in {root}/FashionMNIST/raw")
    need(download, "".join(missing))
    datasets = torchvision_datasets("downloading fashion-mnist")
    try:
        for t in (True, False):
            datasets.FashionMNIST(root, train=t, download=True)
    except Exception as e:
        raise SparseWinError(f"{missing[0]}, and the download failed ({type(e).__name__}){missing[1]}")
    return load_fashion_mnist(root, download=False, debian_dir=debian_dir)


def load_tiny_imagenet(root: str):
    """Tiny-ImageNet's official folder (root or root/tiny-imagenet-200): 90,000 / 10,000 / 10,000 (its val set)."""
    try:
        from PIL import Image
    except ImportError:
        raise SparseWinError("reading tiny-imagenet's JPEGs needs Pillow: pip install pillow (torchvision brings "
                             "it)") from None
    base = next((b for b in (Path(root) / "tiny-imagenet-200", Path(root)) if (b / "train").is_dir()), None)
    if base is None or not (base / "val" / "val_annotations.txt").exists():
        raise SparseWinError(f"tiny-imagenet not found in {root}: put the official tiny-imagenet-200 folder "
                             f"there (train/<wnid>/images/*.JPEG, val/images/, val/val_annotations.txt)")
    label = {w: i for i, w in enumerate(sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))}

    def read(items):  # [(JPEG path, label)] -> uint8 (N, 3, 64, 64), int64 labels
        return (torch.stack([torch.frombuffer(bytearray(Image.open(p).convert("RGB").tobytes()), dtype=torch.uint8)
                             .view(64, 64, 3).permute(2, 0, 1) for p, _ in items]), torch.tensor([c for _, c in items]))
    train = [(p, label[w]) for w in label for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    ann = [line.split("\t")[:2] for line in (base / "val" / "val_annotations.txt").read_text().splitlines() if line]
    (x, y), test = read(train), read([(base / "val" / "images" / f, label[w]) for f, w in ann])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed, seed-independent split
    return splits(x[perm], y[perm], test, base)


def load_data(cfg: Config) -> dict:  # {'train'|'val'|'test': (uint8 images (N, C, H, W), int64 labels)} on the CPU
    if cfg.dataset == "tiny-imagenet":
        return load_tiny_imagenet(cfg.data_dir)
    load = load_fashion_mnist if cfg.dataset == "fashion-mnist" else functools.partial(load_cifar, cfg.dataset)
    return load(cfg.data_dir, cfg.download)


def subsets(cfg: Config, data: dict) -> dict:  # the first --train-subset / --eval-subset images of each split (0 = all)
    n = dict(train=cfg.train_subset, val=cfg.eval_subset, test=cfg.eval_subset)
    return {s: tuple(t[:n[s] or None] for t in data[s]) for s in n}


# ----------------------------------------------------------------------------- the configured run

METHOD = {"dense": Dense.name, "static": RobustBird.name, "dynamic": FlyingBird.name, "dynamic+": FlyingBirdPlus.name,
          "small-dense": "small dense AT"}


def architecture(cfg: Config, matched: bool = True) -> dict:
    """build_model's arguments (what checkpoints record); small-dense: the matched width (matched=False: --width)."""
    info = DATASETS[cfg.dataset]
    arch = dict(arch=cfg.arch, num_classes=info["classes"], in_channels=info["channels"], width=cfg.width,
                mean=info["mean"], std=info["std"], wrn_depth=cfg.wrn_depth, wrn_widen=cfg.wrn_widen)
    small = cfg.mode == "small-dense" and matched
    return dict(arch, width=small_dense_width(sparsity=cfg.sparsity, **arch)) if small else arch


def model_for(cfg: Config) -> nn.Module:
    return build_model(**architecture(cfg))


def method_for(cfg: Config) -> Method:
    """The configured method (--mode), with its constants from the config."""
    cfg = resolved(cfg)
    if cfg.mode == "static":
        return RobustBird(density=cfg.density, queue=cfg.eb_queue, threshold=cfg.eb_threshold,
                          max_epochs=cfg.eb_max_epochs, ticket=cfg.ticket, bn_l1=cfg.bn_l1)
    if cfg.mode not in ("dynamic", "dynamic+"):
        return Dense()
    fb = dict(density=cfg.density, allocation=cfg.allocation, growth=cfg.growth, seed=cfg.seed,
              death_rate=cfg.death_rate, death_rate_final=cfg.death_rate_final, interval=cfg.update_interval,
              interval_late=cfg.update_interval_late)
    return FlyingBird(**fb) if cfg.mode == "dynamic" else FlyingBirdPlus(
        start_epoch=cfg.fbplus_start, window=cfg.fbplus_window, threshold=cfg.fbplus_threshold,
        prune_ratio=cfg.fbplus_prune, growth_ratio=cfg.fbplus_grow, **fb)


def resolved(cfg: Config, cuda: bool = False) -> Config:
    """cfg with each default that depends on something else made explicit, as config.json records it and --resume
    compares it: the method's milestones, the early bird's threshold, FB+'s start, eps and steps (1/255), amp and
    channels_last."""
    train_eps = cfg.train_eps if cfg.train_eps > 0 else DATASETS[cfg.dataset]["eps"]
    test_eps = cfg.test_eps if cfg.test_eps > 0 else train_eps
    return dataclasses.replace(
        cfg, milestones=tuple(cfg.milestones) or (RobustBird if cfg.mode == "static" else Method).milestones,
        eb_threshold=cfg.eb_threshold if cfg.eb_threshold >= 0 else EB_THRESHOLD[cfg.ticket],
        fbplus_start=cfg.fbplus_start if cfg.fbplus_start >= 0 else cfg.epochs // 2,
        train_eps=train_eps, train_alpha=cfg.train_alpha if cfg.train_alpha > 0 else train_eps / 4, test_eps=test_eps,
        test_alpha=cfg.test_alpha if cfg.test_alpha > 0 else test_eps / 4, amp=cuda if cfg.amp is None else cfg.amp,
        channels_last=cuda if cfg.channels_last is None else cfg.channels_last)


def sgd(cfg: Config, net: nn.Module):
    """The paper's SGD with momentum and weight decay, lr x0.1 at cfg.milestones (setup() fills in the method's)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=0.1)


def augment(x: torch.Tensor, *, pad: int = 4, flip: bool = True, rotate: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip, rotation (degrees) of a float batch, on its device."""
    (B, C, H, W), dev = x.shape, x.device
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
        x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="nearest",
                          align_corners=False)  # nearest: torchvision RandomRotation's default, as released
    return x


class Batches:
    """Minibatches (x in [0, 1], y) of a uint8 dataset on one device, drawn there: no DataLoader, no host to wait on.
    Under torchrun batch_size is global: every rank draws its order and augmentation and keeps rows lo:hi (self.rows
    = (lo, hi, n)), whatever the world size; drop_small: skip a last batch smaller than the world (training)."""

    def __init__(self, x, y, *, batch_size, shuffle=False, augmentation=None, generator=None, rank=0, world=1,
                 drop_small=False):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.augmentation, self.generator, self.order = augmentation, generator, None  # this epoch's order, to resume
        self.rank, self.world, self.drop_small, self.rows = rank, world, drop_small, None

    def __len__(self):
        n, b = len(self.y), self.batch_size
        return -(-n // b) - (self.drop_small and 0 < n % b < self.world)

    def epoch(self, order: torch.Tensor | None = None, start: int = 0):  # from batch `start`; `order` resumes an epoch
        if self.shuffle and order is None:
            order = torch.randperm(len(self.y), device=self.y.device, generator=self.generator)
        self.order = order
        for i in range(start * self.batch_size, len(self) * self.batch_size, self.batch_size):
            idx = order[i:i + self.batch_size] if order is not None else slice(i, i + self.batch_size)
            x = self.x[idx].float().div_(255)
            if self.augmentation is not None:
                x = augment(x, **self.augmentation, generator=self.generator)
            q, r = divmod(len(x), self.world)  # this rank's rows of the global batch
            lo = self.rank * q + min(self.rank, r)
            self.rows = (lo, lo + q + (self.rank < r), len(x))
            yield x[lo:self.rows[1]], self.y[idx][lo:self.rows[1]]

    __iter__ = epoch  # a whole epoch, drawn afresh

    def start(self, x: torch.Tensor, **attack) -> torch.Tensor:  # attack_start for rows x, drawn for the whole batch
        lo, hi, n = self.rows
        return attack_start((n, *x.shape[1:]), device=x.device, dtype=x.dtype, **attack)[lo:hi]


def batches_for(cfg: Config, data: dict, generator: torch.Generator, dist: Dist) -> tuple[Batches, dict]:
    """Training batches (shuffled, augmented) and the val / test / gap evaluation batches, this rank's shard."""
    info, shard = DATASETS[cfg.dataset], dict(rank=dist.rank, world=dist.world)
    aug = dict(pad=2 if info["size"] == 28 else 4, flip=True, rotate=info["rotate"]) if cfg.augment else None
    train = Batches(*data["train"], batch_size=cfg.batch_size, shuffle=True, augmentation=aug, generator=generator,
                   drop_small=True, **shard)
    data = dict(data, gap=tuple(t[:cfg.gap_subset or None] for t in data["train"]))  # for the robust gap
    return train, {s: Batches(*data[s], batch_size=cfg.eval_batch_size, **shard) for s in ("val", "test", "gap")}


def fast_path(cfg: Config, net: nn.Module, dist: Dist) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(net, core, model): net in channels_last (CUDA), SyncBatchNorm'd if asked; core compiled if asked; model DDP."""
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    core = torch.compile(net) if cfg.compile else net
    if not dist.on:
        return net, core, core
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    # BN buffers: rank 0's are broadcast once per epoch (Dist.share_buffers), not at every forward of the attack
    quiet = "forward_sync_buffers" in inspect.signature(DDP).parameters  # torch >= 2.14 renames the option
    ddp = DDP(net, **{"forward_sync_buffers" if quiet else "broadcast_buffers": False})
    return net, core, torch.compile(ddp) if cfg.compile else ddp


# ----------------------------------------------------------------------------- distributed (torchrun)

class Dist:
    """This process's place in a torchrun job and the collectives train() needs (no-ops in a single process)."""

    def __init__(self):
        import torch.distributed as td
        self.td, self.on = td, td.is_available() and td.is_initialized()
        self.rank, self.world = (td.get_rank(), td.get_world_size()) if self.on else (0, 1)
        self.main = self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.td.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.on:
            self.td.broadcast(t, src)
        return t

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        self.td.all_reduce(t, op=self.td.ReduceOp.MAX)
        return t

    def any(self, flags: list[bool], device) -> list[bool]:  # per flag: raised on any rank? (all branch alike)
        if not self.on:
            return [bool(f) for f in flags]
        return [bool(v) for v in self._max(torch.tensor(flags, dtype=torch.float32, device=device)).tolist()]

    def _differs(self, v: torch.Tensor) -> bool:  # whether the scalar v differs between ranks: max and -min at once
        both = self._max(torch.stack([v, -v]))
        return bool(both[0] != -both[1])

    def check_masks(self, mask: SparseMask, where: str):  # stop the run when the masks differ between ranks
        if self.on and self._differs(torch.stack([(_flat(m).nonzero().squeeze(1) * (i + 1)).sum()  # int64: exact
                                                  for i, m in enumerate(mask.masks.values())]).sum()):
            raise RunError(f"the masks differ between ranks after the topology update at {where}; "
                           f"stopping (rank {self.rank})", DESYNC)

    def agree(self, flag: bool, device, what: str) -> bool:  # flag, checked to be the same on every rank
        if self.on and self._differs(torch.tensor(float(flag), device=device)):
            raise RunError(f"the ranks disagree on {what}; stopping (rank {self.rank})", DESYNC)
        return flag

    def share_masks(self, mask: SparseMask | None):  # rank 0's masks on every rank, the weights masked again
        if not self.on or mask is None:
            return
        for name in mask.names:
            mask.masks[name].copy_(self.broadcast_(mask.masks[name].to(torch.uint8)).bool())
        mask._refresh()
        mask.apply()

    def share_buffers(self, net: nn.Module):  # rank 0's buffers (BatchNorm statistics) on every rank
        for b in net.buffers():
            self.broadcast_(b)

    def barrier(self):
        if self.on:
            self.td.barrier()


def init_distributed(cfg: Config):
    """Join the torchrun job (WORLD_SIZE > 1) once, with a timeout: a rank that dies or hangs fails the job."""
    import datetime
    import torch.distributed as td
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    cuda, env = resolve_device(cfg.device).type == "cuda", os.environ
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    if cuda:
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    store = None  # torchrun's own store outlives an elastic restart: the keys of each attempt under a prefix of its own
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in env:
        store = td.PrefixStore(f"sparse_win/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", td.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), False, timeout=timeout))
    td.init_process_group("nccl" if cuda else "gloo", store=store, timeout=timeout,
                          **dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"])) if store else {})


# ----------------------------------------------------------------------------- run directory and checkpoints

RESUME_FREE = {"resume", "out", "device", "stop_after_epoch", "checkpoint_every", "progress", "amp", "compile",
               "channels_last", "download", "data_dir", "preset", "benchmark", "dist_timeout", "eval", "split",
               "eval_steps", "restarts", "attack", "aa_version", "aa_iters", "check_subset", "force",
               "final_eval"}  # may differ between a run and its resume


def strict_json(obj, **kw) -> str:
    """JSON that strict readers (jq, JavaScript, pyarrow) accept: NaN and Infinity are written as null."""
    def finite(o):
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        return None if isinstance(o, float) and not math.isfinite(o) else o
    return json.dumps(finite(obj), allow_nan=False, **kw)


def write_atomic(path: Path, data: bytes):
    """Write path.tmp, fsync, rename: the old file stays whole until the new one is (an OSError: one line, exit 74)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _io_error(path, e) from None


def _io_error(path: Path, e: OSError) -> RunError:
    why = f"{e.strerror or e}" + (f" [{errno.errorcode[e.errno]}]" if e.errno in errno.errorcode else "")
    again = "rerun with --resume" if (path.parent / "last.pt").exists() else "run the same command again"
    return RunError(f"cannot write {path}: {why}; its previous version is intact: fix that and {again}", IO_ERROR)


def atomic_save(obj, path: Path):
    """torch.save into memory, then write_atomic: a crash or a full disk leaves the old file intact."""
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
    except OSError as e:
        raise _io_error(path, e) from None
    write_atomic(path, buf.getvalue())


def write_text_atomic(path: Path, text: str):
    write_atomic(path, text.encode())


class Finished(Exception):
    """--resume auto on a finished run: nothing to do (exit 0)."""


def check_run_dir(cfg: Config, world: int) -> tuple[Path, bool]:
    """(run directory, whether to resume), before any write; --resume auto: continue, start, or raise Finished."""
    d, held = cfg.run_dir, (cfg.run_dir / "last.pt").exists()
    if cfg.resume == "auto" and held and (d / "summary.json").exists():
        check_resume(read_checkpoint(d / "last.pt"), d / "last.pt", dataclasses.asdict(cfg), world)
        raise Finished(f"finished: {d / 'summary.json'} is there; nothing to do")
    if cfg.resume == "yes" and not held:
        raise SparseWinError(f"--resume: no {d / 'last.pt'} to resume from")
    if cfg.resume == "no" and held:
        raise SparseWinError(f"{d} already holds a run; pass --resume to continue it or choose another --out")
    parent = next(p for p in [d, *d.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SparseWinError(f"cannot write to run directory {d}: {parent} is not a writable directory")
    return d, held


class StopRequest:
    """SIGTERM, SIGUSR1 (Slurm) or a first Ctrl-C: stop after the step in flight, last.pt written; 2nd Ctrl-C: now."""
    signal: int | None = None  # the signal received

    def __call__(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        import threading  # signal handlers can only be set from the main thread
        main_thread = threading.current_thread() is threading.main_thread()
        kinds = (signal.SIGTERM, signal.SIGINT, *[getattr(signal, "SIGUSR1")] * hasattr(signal, "SIGUSR1"))
        self._old = {s: signal.signal(s, self) for s in kinds} if main_thread else {}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def take_run_dir(d: Path, stack: contextlib.ExitStack):
    """Create the run directory and lock it for the run (stack releases it): one training process per directory.
    An flock on <run>/.lock (the holder's pid in it): the kernel drops it when the process ends, killed or not."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SparseWinError(f"cannot write to run directory {d}: {e.strerror or e}") from None
    stack.callback(os.close, fd)  # closing the descriptor drops the lock
    fcntl = importlib.util.find_spec("fcntl") and importlib.import_module("fcntl")  # POSIX only: elsewhere, no lock
    try:
        fcntl and fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        raise SparseWinError(f"{d} is in use by another training process (pid {holder}); wait for it to end or "
                             f"stop it, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


def check_resume(ck: dict, path: Path, config: dict, world: int):
    """Refuse in one line what is not this run's last.pt: a best.pt, other options, another number of processes."""
    if not {"run", "method", "optimizer"} <= set(ck):
        raise SparseWinError(f"{path} is not a resumable sparse_win checkpoint (best.pt? resume from last.pt)")
    old = dataclasses.asdict(resolved(config_of(ck)))  # both sides resolved: a last.pt that recorded -1 for eps
    k = next((k for k in config if k not in RESUME_FREE and old[k] != config[k]), None)
    if k is not None:
        raise SparseWinError(f"{path} was written with another config ({k}: {old[k]!r}, now {config[k]!r}); resume "
                             f"with the same options")
    if ck["run"].get("world", 1) != world:
        raise SparseWinError(f"{path} was written by {ck['run'].get('world', 1)} processes, now {world}: resume "
                             f"with the same number (the data shards and RNG streams depend on it)")


def write_metrics(run_dir: Path, history: list[dict]):
    """metrics.jsonl, one strict-JSON record per epoch, rewritten whole (an append cut short leaves half a record)."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in history))


# ----------------------------------------------------------------------------- train

NOT_EVALUATED = dict(sa=None, ra=None, adv_loss=None)  # an epoch that --eval-every skips


@dataclass
class RunState:
    """The run's record, as last.pt holds it (a dict)."""
    epoch: int = 0
    best_val_ra: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)  # one metrics.jsonl row per epoch
    updates: list = field(default_factory=list)  # the topology updates
    wall: float = 0.0
    partial: dict | None = None  # the epoch in progress at a mid-epoch save: step, sums, order
    world: int = 1  # processes
    ticket_flops: int = 0  # Robust Bird's stage 1
    ticket_images: int = 0
    thin: dict | None = None  # a channel ticket's thin_report
    data: str = ""  # the folder the data were read from (by the latest process)


class Trainer:
    """One process's run around adversarial_step; net, core (attacks, evaluation), model (the update): fast_path."""

    def __init__(self, cfg: Config, method: Method, *, device: torch.device, dist: Dist, input_shape: tuple,
                 stop: StopRequest | None = None, run_dir: Path | None = None, log=print):
        cfg = resolved(cfg, cuda=device.type == "cuda")  # amp and channels_last: on for CUDA unless said otherwise
        self.cfg, self.method, self.device, self.dist = cfg, method, device, dist
        self.stop, self.run_dir, self.log = stop, run_dir, log
        net = model_for(cfg).to(device)
        per_weight, unowned = model_flops(net, input_shape)  # (per weight, constant, the dense network's forward)
        self.flops = (per_weight, unowned, forward_flops(per_weight, weight_counts(net), unowned))
        self.amp = cfg.amp  # bf16 autocast: the fast path
        self.net, self.core, self.model = fast_path(cfg, net, dist)
        # data order, augmentation and attack starts: drawn for the global batch on every rank (same state)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.optimizer, self.scheduler = sgd(cfg, self.net)
        self.ledger, self.run, self.config = FlopLedger(), RunState(world=dist.world), dataclasses.asdict(cfg)
        self.batches, self.eval_batches = None, {}  # training Batches; val / test / gap Batches
        self.average, self.fwd = None, None  # --ema-decay's WeightAverage; forward FLOPs now (None: count again)
        self.t0 = time.time()

    def step(self, x: torch.Tensor, y: torch.Tensor, i: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Step i: adversarial_step (kind none: RB's stage 1) with the global batch's start, AWP's warmup, the checks
        over ranks before backward, the ledger, the masks compared. Returns (loss, adversarial logits, stop asked)."""
        cfg, (eps, alpha), stopping = self.cfg, self.cfg.eps(train=True), []
        trades, cost = kind != "none" and cfg.loss == "trades", attack_cost(kind, self.cfg.train_steps)
        start = (self.batches.start(x, eps=eps, norm=cfg.norm, kind="trades" if trades else "pgd",
                                    generator=self.generator) if trades or cost else None)

        def check(loss):  # one sync, every rank alike: a loss that is not finite on any rank stops the run here
            stop, bad = self.dist.any([self.stop is not None and self.stop.signal is not None,
                                       not torch.isfinite(loss)], self.device)
            if bad:
                raise diverged(loss.item(), self.where(i), self.run_dir, cfg.lr, self.amp)
            stopping.append(stop)
        # the density in force at this step, counted again only when the masks may have changed
        self.fwd = self.fwd or self.method.forward_flops(*self.flops[:2])
        out = adversarial_step(
            self.net, x, y, self.optimizer, self.method, eps=eps, alpha=alpha, steps=cfg.train_steps, norm=cfg.norm,
            kind=kind, loss=cfg.loss, beta=cfg.trades_beta, epoch=self.run.epoch, generator=self.generator,
            awp_gamma=cfg.awp_gamma if self.run.epoch + 1 >= cfg.awp_warmup else 0.0, start=start, bf16=self.amp,
            average=self.average if kind != "none" else None, before_backward=check, reduce=self.dist.sum_,
            attack_model=self.core, update_model=self.model)
        self.ledger.charge(self.batches.rows[2], self.fwd, cost, out["passes"], out["forwards"])
        if out["update"] is not None:
            self.fwd = None
            self.dist.check_masks(self.method.mask, self.where(i))
            self.run.updates.append(out["update"])
        if kind != "none" and cfg.ema_decay and self.average is None:  # from the (masked) weights of the first AT step
            self.average = WeightAverage(self.net, decay=cfg.ema_decay)
        return out["loss"], out["logits"], stopping[0]

    def epoch(self, kind: str, desc: str) -> tuple[float, float]:
        """One epoch (kind: the attack): the global (loss, acc %); resumes run.partial (order, batches, sums)."""
        self.model.train()
        self.fwd = None  # a resumed or adopted mask: count from the masks in force now
        part = self.run.partial or {}
        sums = torch.zeros(3, device=self.device)  # loss sum, correct, n: this rank's, summed at the end
        if part and self.dist.main:  # the sums of the steps before the checkpoint (all ranks') restart on rank 0
            sums += part["sums"].to(self.device)
        start = part.get("step", 0)
        bar = _progress(len(self.batches), desc, self.cfg.progress and self.dist.main)
        bar.update(start)
        order = part["order"].to(self.device) if part.get("order") is not None else None
        for i, (x, y) in enumerate(self.batches.epoch(order, start), start + 1):
            loss, logits, stopping = self.step(x, y, i, kind)
            sums[:2] += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
            sums[2] += len(y)
            bar.update(1)
            if stopping or (self.cfg.checkpoint_every and self.ledger.steps % self.cfg.checkpoint_every == 0):
                order = self.batches.order
                self.run.partial = dict(step=i, sums=self.dist.sum_(sums.clone()).cpu(),
                                        order=None if order is None else order.cpu())
                save_last(self)
                self.run.partial = None
            if stopping:
                raise stopped(self.stop, self.where(i))
        bar.close()
        self.run.partial = None
        loss_sum, correct, n = self.dist.sum_(sums).tolist()
        return loss_sum / n, 100 * correct / n

    def where(self, step: int) -> str:  # for messages: 'epoch 3, step 5/40'
        m = self.method
        stage = f"ticket epoch {m.pretrain_epochs + 1}" if m.pretraining else f"epoch {self.run.epoch + 1}"
        return f"{stage}, step {step}/{len(self.batches)}"

    def start_afresh(self):
        """Robust Bird's ticket adopted: rank 0's masks everywhere, stage 1's cost kept, a fresh optimizer, schedule."""
        self.dist.share_masks(self.method.mask)
        if self.method.model is not self.net:
            self.adopt(self.method.model)
            self.run.thin = thin_report(self.cfg, self.method, self.net, self.batches, self.amp,
                                        self.flops)  # measured now, on this run's batch and device
            self.log(thin_line(self.run.thin))
        self.run.ticket_flops, self.run.ticket_images = self.ledger.actual, self.ledger.images
        self.optimizer, self.scheduler = sgd(self.cfg, self.net)
        self.fwd = None

    def adopt(self, net: nn.Module):
        """Train slim's thinner `net` from now on (the caller makes a new optimizer); FLOPs per weight stay."""
        self.net, self.core, self.model = fast_path(self.cfg, net.to(self.device), self.dist)
        self.method.model = self.net

    def evaluate(self, split: str) -> dict:
        """SA, RA (%) and losses on the val, test or gap batches (all shards) of the average (--ema-decay) or model."""
        (eps, alpha), b = self.cfg.eps(train=False), self.eval_batches[split]
        start = lambda x: b.start(x, eps=eps, norm=self.cfg.norm, generator=self.generator)  # noqa: E731
        return evaluate(self.average.model if self.average is not None else self.core, b, eps=eps, alpha=alpha,
                        steps=self.cfg.test_steps, norm=self.cfg.norm, start=start, reduce=self.dist.sum_)

    def share_buffers(self):  # rank 0's BatchNorm statistics (the model's and its average's) on every rank
        for net in [self.net] + ([self.average.model] if self.average is not None else []):
            self.dist.share_buffers(net)


def record(t: Trainer, lr: float, train_loss: float, train_ra: float, val: dict, test: dict):
    """The epoch's row of metrics.jsonl, written at once, and its log line."""
    t.run.history.append(dict(
        epoch=t.run.epoch, lr=lr, train_loss=train_loss, train_ra=train_ra, val_sa=val["sa"], val_ra=val["ra"],
        val_adv_loss=val["adv_loss"], test_sa=test["sa"], test_ra=test["ra"], test_adv_loss=test["adv_loss"],
        density=t.method.density, train_flops=t.ledger.actual, train_flops_paper=t.ledger.paper,
        itop=t.method.itop_rate(), time=time.time() - t.t0))
    if t.dist.main:
        write_metrics(t.run_dir, t.run.history)
    t.log(epoch_line(t.run.history[-1], t.cfg.epochs))


def save(t: Trainer, name: str, **obj):
    """A checkpoint (rank 0 writes): save_model's, of the average if any (what --eval reads), config and obj."""
    if t.dist.main:
        save_model(t.run_dir / name, t.average.model if t.average is not None else t.net,
                   architecture=architecture(t.cfg), mask=t.method.mask, channels=t.method.channels, save=atomic_save,
                   config=t.config, **obj)


def save_last(t: Trainer):
    """last.pt: everything a resume needs."""
    t.run.wall = time.time() - t.t0
    method = {k: v for k, v in t.method.state_dict().items() if k not in ("mask", "channels")}
    save(t, "last.pt", method=method, raw=t.net.state_dict() if t.average is not None else None,  # trained weights
         optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(), ledger=t.ledger.state_dict(),
         run=dataclasses.asdict(t.run), generator=t.generator.get_state(), torch_rng=torch.get_rng_state())


def save_best(t: Trainer, val_ra: float):
    """best.pt: the model of the best validation RA so far, for --eval and load_model."""
    t.run.best_val_ra, t.run.best_epoch = val_ra, t.run.epoch
    save(t, "best.pt", epoch=t.run.epoch, val_ra=val_ra)


def resume(t: Trainer):
    """last.pt's state in this freshly built run (--resume), refused unless it is this run's."""
    path = t.run_dir / "last.pt"
    ck = read_checkpoint(path)  # on the CPU: generator states must be CPU tensors; load_state_dict moves the rest
    check_resume(ck, path, t.config, t.dist.world)
    if ck.get("channels"):  # a channel ticket's thin network: rebuilt to the recorded channel counts
        t.adopt(build_thin(architecture(t.cfg), ck["channels"]))
        t.optimizer, t.scheduler = sgd(t.cfg, t.net)
    t.net.load_state_dict(ck["model"] if ck.get("raw") is None else ck["raw"])
    if ck.get("raw") is not None:  # --ema-decay: 'model' is the average
        t.average = WeightAverage(t.net, decay=t.cfg.ema_decay)
        t.average.load_state_dict(ck["model"])
    t.method.load_state_dict(dict(ck["method"], mask=ck["mask"], channels=ck.get("channels")))
    t.optimizer.load_state_dict(ck["optimizer"])
    for p, state in t.optimizer.state.items():  # momentum in its weight's layout (CPU run resumed on CUDA)
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p).copy_(v)
    t.scheduler.load_state_dict(ck["scheduler"])
    t.ledger.load_state_dict(ck["ledger"])
    t.generator.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    t.run = RunState(**{k: v for k, v in ck["run"].items() if k in RunState.__dataclass_fields__})
    step = f", step {t.run.partial['step']}" if t.run.partial else ""
    t.log(f"continuing {t.run_dir} at epoch {t.run.epoch}{step}")


def setup(cfg: Config, log, stop: StopRequest | None, lock: contextlib.ExitStack) -> Trainer:
    """Everything before the first step: options, data on the device, the run directory locked (rank 0), last.pt."""
    dist = Dist()
    validate(cfg, world=dist.world)
    device = resolve_device(cfg.device)
    cfg = resolved(cfg, cuda=device.type == "cuda")  # the values used, as config.json records them
    method = method_for(cfg)
    log = log if dist.main else (lambda *a, **k: None)
    run_dir, resuming = check_run_dir(cfg, dist.world)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    log(f"data: {cfg.dataset} from {(source := data['source'])}")
    data = {s: (x.to(device), y.to(device)) for s, (x, y) in subsets(cfg, data).items()}
    dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    refused = None
    if dist.main:
        try:
            take_run_dir(run_dir, lock)  # a second process on this directory stops here (exit 2)
        except SparseWinError as e:
            refused = e
    if dist.any([refused is not None], device)[0]:  # every rank stops, not only rank 0
        raise refused or SparseWinError(f"rank 0 could not take {run_dir}; see its message")
    t = Trainer(cfg, method, device=device, dist=dist, input_shape=tuple(data["train"][0].shape[1:]), stop=stop,
                run_dir=run_dir, log=log)
    t.batches, t.eval_batches = batches_for(cfg, data, t.generator, dist)
    with warnings.catch_warnings(record=True) as caught:  # the library's warnings, as one line each
        warnings.simplefilter("always")
        method.start(t.net, total_steps=cfg.epochs * len(t.batches), epochs=cfg.epochs)
    for w in caught:
        log(f"warning: {w.message}")
    if dist.agree(resuming, device, "whether --out holds a run to continue"):
        resume(t)
    else:
        log(f"starting {run_dir}")
    t.run.data = source
    dist.share_masks(method.mask)  # rank 0's masks everywhere, from the first step
    if dist.main:
        write_metrics(run_dir, t.run.history)
        write_text_atomic(run_dir / "config.json", strict_json(t.config, indent=1))
    t.t0 = time.time() - t.run.wall
    return t


def train(cfg: Config, log=print, stop: StopRequest | None = None) -> dict:
    """One run end to end, the paper's sparse AT loop, on every rank (rank 0 logs and writes): summary.json's dict."""
    with contextlib.ExitStack() as lock:
        t = setup(cfg, log, stop, lock)
        cfg, method, run, dist = t.cfg, t.method, t.run, t.dist
        while method.pretraining:  # Robust Bird's stage 1: standard training until the ticket emerges
            loss, acc = t.epoch(cfg.ticket_attack, "stage 1")
            dist.share_buffers(t.net)  # rank 0's weights = every rank's (DDP)
            if dist.agree(method.end_pretrain_epoch(t.net, loss, acc, t.log), t.device, "the early-bird decision"):
                t.start_afresh()  # the ticket is adopted: prune, keep the weights, AT from a fresh optimizer
            save_last(t)

        while run.epoch < cfg.epochs:  # AT: attack, update, re-mask; every T steps prune and regrow (FB, FB+)
            if cfg.stop_after_epoch and run.epoch >= cfg.stop_after_epoch:
                t.log(f"stopped after epoch {run.epoch} as asked; continue with --resume")
                return dict(stopped_at=run.epoch)
            lr = t.optimizer.param_groups[0]["lr"]
            train_loss, train_ra = t.epoch(cfg.train_attack, f"epoch {run.epoch + 1}")
            t.scheduler.step()
            t.share_buffers()  # rank 0's BatchNorm statistics: every rank evaluates (and saves) one model
            run.epoch += 1
            evaluated = run.epoch % cfg.eval_every == 0 or run.epoch == cfg.epochs  # --eval-every, and the last
            val, test = (t.evaluate("val"), t.evaluate("test")) if evaluated else (NOT_EVALUATED, NOT_EVALUATED)
            if evaluated:
                method.end_epoch(train_ra, val)  # FB+ records the robust gap and the val adversarial loss
            record(t, lr, train_loss, train_ra, val, test)
            if evaluated and val["ra"] > run.best_val_ra:  # best = highest *validation* RA (never the test set)
                save_best(t, val["ra"])
            save_last(t)

        train_final = t.evaluate("gap")  # robust generalization gap: train RA (eval mode, no augmentation) - test RA
        summary = summarize(cfg, t.run, t.ledger, method, t.flops, train_final["ra"])
        if dist.main:
            summary.update(final_eval(cfg, t.run_dir, t.log))  # --final-eval autoattack: AA of best.pt and last.pt
            write_text_atomic(t.run_dir / "summary.json", strict_json(summary, indent=1))
            plot_curves(run.history, summary["fbplus_events"], t.run_dir / "curves.png", t.log)
        t.log(format_table([summary]))
        return summary


def stopped(stop: StopRequest | None, where: str) -> RunError:
    name = signal.Signals(stop.signal).name if stop is not None and stop.signal else "SIGTERM"  # another rank's
    return RunError(f"stopped by {name} at {where}; last.pt holds this step: continue with the same command and "
                    f"--resume (or --resume auto)", INTERRUPTED if name == "SIGINT" else TERMINATED)


def diverged(loss: float, where: str, run_dir: Path | None, lr: float, amp: bool) -> RunError:
    kept = ("last.pt and best.pt hold the last good checkpoint" if run_dir is not None and
            (run_dir / "last.pt").exists() else "no checkpoint had been written yet")
    return RunError(f"training diverged: the loss is {loss} at {where}; {kept}; try a smaller --lr (now {lr:g})"
                    + (" or --no-amp" if amp else ""), DIVERGED)


def epoch_line(r: dict, epochs: int) -> str:
    evaluation = (f" | val SA {r['val_sa']:5.2f} RA {r['val_ra']:5.2f} | test SA {r['test_sa']:5.2f} RA "
                  f"{r['test_ra']:5.2f}" if r["val_ra"] is not None else " | (not evaluated: --eval-every)")
    return (f"epoch {r['epoch']:3d}/{epochs} lr {r['lr']:.4f} loss {r['train_loss']:.4f} train RA {r['train_ra']:5.2f}"
            f"{evaluation} | density {r['density']:.4f} | {r['time']:.0f}s")


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is installed and wanted, else a stand-in that does nothing."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
    except ImportError:
        return type("NoBar", (), dict(update=lambda self, n: None, close=lambda self: None))()


# ----------------------------------------------------------------------------- report

def summarize(cfg: Config, run: RunState, ledger: FlopLedger, method: Method, flops: tuple, train_ra: float):
    """The paper's Table 1 row plus density, ITOP rate and FLOP ratios; flops: (per_weight, unowned, dense forward)."""
    final_fwd, dense_fwd = method.forward_flops(*flops[:2]), flops[2]
    best, final = run.history[run.best_epoch - 1], run.history[-1]
    return dict(
        method=METHOD[cfg.mode], mode=cfg.mode, dataset=cfg.dataset, arch=cfg.arch, sparsity=cfg.sparsity,
        best_epoch=run.best_epoch, epochs=len(run.history), milestones=list(cfg.milestones),
        ra_best=best["test_ra"], ra_final=final["test_ra"], ra_diff=best["test_ra"] - final["test_ra"],
        sa_best=best["test_sa"], sa_final=final["test_sa"], sa_diff=best["test_sa"] - final["test_sa"],
        train_flops=ledger.actual, train_flops_paper=ledger.paper,
        # paper convention, vs dense AT over the same AT epochs (Robust Bird's stage 1 included above)
        train_flops_dense_ratio=ledger.paper / (3 * (attack_cost(cfg.train_attack, cfg.train_steps) + 1)
                                                * dense_fwd * (ledger.images - run.ticket_images)),
        inference_flops=final_fwd, inference_flops_dense=dense_fwd, inference_ratio=final_fwd / dense_fwd,
        robust_gap=train_ra - final["test_ra"], train_ra_final=train_ra,
        final_density=method.density, itop_rate=method.itop_rate(),
        ticket_flops=run.ticket_flops, topology_updates=len(run.updates),
        ticket=cfg.ticket if cfg.mode == "static" else None, objective=objective_name(cfg),
        thin=run.thin,  # channel ticket: the thin network's size and measured speed (thin_report)
        active_weights=sum(method.layer_counts().values()), **small_dense(cfg, final_fwd),
        data=run.data, updates=run.updates,  # per topology update: step, epoch, p, density, pruned, grown, FB+'s
        **method.summary(), wall_seconds=run.wall)


def small_dense(cfg: Config, fwd: int) -> dict:
    """--mode small-dense: the width, the weights matched (allocate_counts') and forward FLOPs x full width."""
    if cfg.mode != "small-dense":
        return {}
    info, full = DATASETS[cfg.dataset], build_model(**architecture(cfg, matched=False))
    per_weight, unowned = model_flops(full, (info["channels"], info["size"], info["size"]))
    total = sum((counts := weight_counts(full)).values())
    return dict(width=architecture(cfg)["width"], inference_ratio_full_width=fwd / forward_flops(per_weight, counts,
                unowned), matched_weights=min(total, max(len(counts), round(cfg.density * total))))


def seconds(fn, *, device: torch.device, reps: int = 5) -> float:
    """Median wall time of fn() over `reps` calls, after two warm-up calls (CUDA: synchronized)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[reps // 2]


def step_seconds(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: dict, amp: bool) -> tuple[float, float]:
    """(seconds of a PGD AT step, of an inference forward) of `net` on (x, y), measured on a copy of it."""
    net, dev = copy.deepcopy(net), x.device
    opt, gen = torch.optim.SGD(net.parameters(), lr=0.0), torch.Generator(dev).manual_seed(0)
    at_step = seconds(lambda: adversarial_step(net.train(), x, y, opt, generator=gen, bf16=amp, **attack), device=dev)
    with torch.no_grad(), autocast(dev.type, amp):
        return at_step, seconds(lambda: net.eval()(x), device=dev)


def thin_report(cfg: Config, method: Method, net: nn.Module, batches: Batches, amp: bool, flops: tuple) -> dict:
    """A channel ticket's thin network x the full one: channels, weights, parameters, FLOPs, measured seconds."""
    full = model_for(cfg).to(batches.x.device)
    if next(net.parameters()).is_contiguous(memory_format=torch.channels_last):
        full = full.to(memory_format=torch.channels_last)  # both in the layout the run trains in
    kept, total = sum(method.channels.values()), sum(g.numel() for g in bn_gammas(full).values())
    x, y = batches.x[:cfg.batch_size].float().div(255), batches.y[:cfg.batch_size]
    attack = dict(zip(("eps", "alpha"), cfg.eps(train=True)), norm=cfg.norm, steps=10)  # PGD-10, the paper's
    thin_s, dense_s = (step_seconds(n, x, y, attack=attack, amp=amp) for n in (net, full))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return dict(channels=dict(method.channels), channel_sparsity=1 - kept / total,
                weight_density=method.density, params_ratio=count(net) / count(full),
                flops_ratio=method.forward_flops(*flops[:2]) / flops[2], batch=len(y),
                at_step_s=thin_s[0], at_step_dense_s=dense_s[0], at_speedup=dense_s[0] / thin_s[0],
                inference_s=thin_s[1], inference_dense_s=dense_s[1], inference_speedup=dense_s[1] / thin_s[1])


def thin_line(r: dict) -> str:
    return (f"channel ticket: {r['channel_sparsity']:.3f} of the prunable channels removed; thin network: weights "
            f"{r['weight_density']:.4f}, parameters {r['params_ratio']:.4f}, forward FLOPs {r['flops_ratio']:.4f} of "
            f"dense; measured at batch {r['batch']}: PGD-10 AT step {r['at_step_s'] * 1e3:.1f} ms vs dense "
            f"{r['at_step_dense_s'] * 1e3:.1f} ms ({r['at_speedup']:.2f}x), inference {r['inference_s'] * 1e3:.1f} ms "
            f"vs {r['inference_dense_s'] * 1e3:.1f} ms ({r['inference_speedup']:.2f}x)")


def objective_name(cfg: Config) -> str:  # the AT objective and regularizers, e.g. 'TRADES (beta 6) + EMA (0.999)'
    return " + ".join([f"TRADES (beta {cfg.trades_beta:g})" if cfg.loss == "trades" else "PGD-AT"]
                      + ([f"AWP (gamma {cfg.awp_gamma:g} from epoch {cfg.awp_warmup})"] if cfg.awp_gamma else [])
                      + ([f"EMA ({cfg.ema_decay:g})"] if cfg.ema_decay else []))


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header, the |---| rule, one line per row of cells (every table sparse_win writes)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def format_table(rows: list[dict]) -> str:
    """Markdown, the paper's layout (accuracies %, FLOPs real, inference per image); below, any thin network's line."""
    aa = any("ra_aa_best" in r for r in rows)  # --final-eval autoattack
    head = ["method", "RA best", "RA final", "diff", "SA best", "SA final", "diff", "train FLOPs",
            "inference FLOPs (x dense)", "robust gen. gap", "density", "ITOP"] + (["AA best", "AA final"] if aa else [])
    thin = [f"{r['method']}: {thin_line(r['thin'])}" for r in rows if r.get("thin")]
    return "\n".join([markdown_table(head, [
        [r["method"] + (f", {r['objective']}" if r.get("objective", "PGD-AT") != "PGD-AT" else ""),
         *(f"{r[k]:.2f}" for k in ("ra_best", "ra_final", "ra_diff", "sa_best", "sa_final", "sa_diff")),
         f"{r['train_flops']:.3e}", f"{r['inference_flops']:.3e} ({r['inference_ratio']:.3f})",
         f"{r['robust_gap']:.2f}", f"{r['final_density']:.4f}", f"{r['itop_rate']:.3f}",
         *((f"{r[k]:.2f}" if k in r else "-" for k in ("ra_aa_best", "ra_aa_final")) if aa else ())] for r in rows]),
        *thin])


def plot_curves(history: list[dict], events: list[dict], path: Path, log=print):
    """curves.png: train robust acc, test SA and test RA per epoch; FB+ extra prune/grow marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no curves.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_ra", "train RA"), ("test_sa", "test SA"), ("test_ra", "test RA")):
        ax.plot(*zip(*[(r["epoch"], r[key]) for r in history if r[key] is not None]), label=label)  # --eval-every
    for i, e in enumerate(events):
        ax.axvline(e["epoch"] + 0.5, color="tab:red" if e["prune"] else "tab:green", ls=":", lw=1,
                   label=None if i else "FB+ extra prune (red) / grow (green)")
    ax.set(xlabel="epoch", ylabel="accuracy (%)")
    ax.legend()
    save_figure(fig, path)


def save_figure(fig, path: Path):  # as a PNG rendered in memory, written with write_atomic; the figure is closed
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- evaluate a checkpoint

AA_MISSING = "AutoAttack needs the pyautoattack package: pip install pyautoattack"
EVAL_OVERRIDES = {"test_eps", "test_alpha", "norm", "data_dir", "download", "batch_size"}  # --eval flags over the run's


def autoattack_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                    version: str = "standard", attacks: list[str] | None = None, iters: int = 0,
                    batch_size: int = 250, seed: int = 0, done: dict | None = None, on_batch=None) -> dict:
    """AutoAttack (Croce & Hein 2020, pyautoattack) on x in [0, 1]: {'robust': per example, 'flags': its warnings};
    'custom' runs `attacks`; iters > 0: their iterations (quick checks). `done` (an interrupted call's result) is
    skipped, on_batch(result so far) runs after each batch. pyautoattack seeds torch's global generator."""
    import logging
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise SparseWinError(AA_MISSING) from None
    aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version=version, attacks=attacks,
                    seed=seed, device=x.device)
    if iters:
        aa.fab.n_iter = aa.fab.n_iter_orig = aa.square.n_queries = iters
        for attack in (aa.apgd, aa.apgd_targeted):  # and the step-size checkpoints, as APGD's constructor sets them
            attack.n_iter = attack.n_iter_orig = iters
            attack.n_iter_2, attack.n_iter_min, attack.size_decr = (max(int(f * iters), 1) for f in (0.22, 0.06, 0.03))
    result = dict(robust=list(done["robust"]), flags=list(done["flags"])) if done else dict(robust=[], flags=[])

    class Flags(logging.Handler):  # AutoAttack's own warnings (randomized or dynamic defence, Square better...)
        def emit(self, record):
            if record.getMessage() not in result["flags"]:
                result["flags"].append(record.getMessage())
    aa.logger.addHandler(handler := Flags(logging.WARNING))
    was_training = model.training
    model.eval()
    try:
        for i in range(len(result["robust"]), len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            _, y_adv = aa.run_standard_evaluation(xb, yb, batch_size=batch_size)
            result["robust"] += (y_adv == yb).tolist()  # wrong clean or broken: the prediction is not y
            if on_batch is not None:
                on_batch(result)
    finally:
        aa.logger.removeHandler(handler)
        model.train(was_training)
    return result


def masking_checks(model: nn.Module, batches, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                   seed: int = 0, tol: float = 1.0) -> dict[str, dict]:
    """Gradient-masking checks (Carlini et al. 2019, Sec. 5) on PGD's output accuracy (%), from one seed's start: eps 0
    changes nothing; more steps or 2x eps never raise RA by > tol; eps = the whole box leaves RA <= tol."""
    x0 = next(iter(batches))[0]
    big = 1.0 if norm == "linf" else math.sqrt(x0[0].numel())  # L-inf / L2 diameter of [0, 1]^d

    def run(e, a, k):
        ex = evaluate_examples(model, batches, eps=e, alpha=a, steps=k, norm=norm,
                               generator=torch.Generator(x0.device).manual_seed(seed))
        return ex, 100 * ex["robust"].double().mean().item()
    (zero, ra0), (_, ra1), (_, ra), (_, ra2), (_, ra_big) = (
        run(0.0, 0.0, 1), run(eps, alpha, 1), run(eps, alpha, steps), run(2 * eps, 2 * alpha, steps),
        run(big, 2.5 * big / steps, steps))  # 2.5 eps / K: Madry et al.'s step size for the unbounded run
    differ, sa = int((zero["robust"] != zero["clean"]).sum()), 100 * zero["clean"].double().mean().item()
    n = len(zero["clean"])
    return dict(
        eps0_equals_clean=dict(ok=differ == 0, changed=differ, examples=n, sa=sa, ra=ra0,
                               detail=f"at eps 0, {differ} of {n} predictions changed (SA {sa:.2f}, RA {ra0:.2f})"),
        ra_falls_with_steps=dict(ok=ra <= ra1 + tol, ra_1_step=ra1, ra=ra, steps=steps,
                                 detail=f"RA {ra1:.2f} after 1 step, {ra:.2f} after {steps}"),
        ra_falls_with_eps=dict(ok=ra2 <= ra + tol, ra=ra, ra_2eps=ra2,
                               detail=f"RA {ra:.2f} at eps {eps:.4g}, {ra2:.2f} at {2 * eps:.4g}"),
        unbounded_ra_zero=dict(ok=ra_big <= tol, eps=big, ra=ra_big,
                               detail=f"RA {ra_big:.2f} at eps {big:.4g} (the whole input box)"),
    )


def aa_checks(ra_pgd: float | None, ra_aa: float | None, flags: list[str], tol: float = 1.0) -> dict[str, dict]:
    """AutoAttack RA <= PGD RA (+ tol), and no warning from AutoAttack's own checks; ok None when not run."""
    if ra_aa is None:
        return dict(aa_not_above_pgd=dict(ok=None, detail="AutoAttack not run"),
                    autoattack_flags=dict(ok=None, flags=[], detail="AutoAttack not run"))
    return dict(
        aa_not_above_pgd=dict(ok=None if ra_pgd is None else ra_aa <= ra_pgd + tol, ra_aa=ra_aa, ra_pgd=ra_pgd,
                              detail="PGD not run" if ra_pgd is None else
                              f"AutoAttack RA {ra_aa:.2f}, PGD RA {ra_pgd:.2f}"),
        autoattack_flags=dict(ok=not flags, flags=list(flags), detail="; ".join(flags) or "none"))


def config_of(ck: dict, **overrides) -> Config:
    """The run's Config from its checkpoint, with `overrides`; fields newer than the checkpoint take defaults."""
    values = {k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
    return validate(Config(**{**values, "eval": "", "final_eval": "none", "device": "auto", "resume": "no",
                              **overrides}))  # resume: true / false before --resume auto


def density_of(net: nn.Module, masks: dict | None, full: int = 0) -> tuple[float, float]:
    """(mask density, fraction of nonzero conv/linear weights), of `full` weights if given (a thin network's)."""
    weights = prunable(net)
    total = sum(w.numel() for w in weights.values())
    active = sum(int(m.sum()) for m in masks.values()) if masks else total
    return active / (full or total), sum(int(w.count_nonzero()) for w in weights.values()) / (full or total)


class EvalProgress:
    """The finished parts of one --eval, saved after each (and each AutoAttack batch) for a rerun to continue."""

    def __init__(self, path: Path, key: dict, log=print):
        self.path, self.key, self.done = path, key, {}
        with contextlib.suppress(OSError, ValueError):  # none saved, or unreadable: from the start
            state = json.loads(path.read_text())
            if state.get("key") == key:
                self.done = state["done"]
                log(f"continuing the evaluation saved in {path} (done: {', '.join(self.done) or 'nothing'})")

    def put(self, name: str, value):
        self.done[name] = value
        write_text_atomic(self.path, strict_json(dict(key=self.key, done=self.done), indent=1))

    def part(self, name: str, compute):  # done[name], computed once; compute may save done[name + "_partial"]
        if name not in self.done:
            value = compute()
            self.done.pop(name + "_partial", None)
            self.put(name, value)
        return self.done[name]


def eval_filename(ck_path: Path, key: dict, overrides: dict) -> str:
    """eval-<checkpoint>-<split>-<images>-<attacks>[-<overridden eps, alpha, norm>].json"""
    parts = [ck_path.stem, key["split"], f"n{key['subset']}" if key["subset"] else "all"]
    parts += [f"pgd{key['steps']}x{key['restarts']}"] if key["attack"] != "autoattack" else []
    if key["attack"] != "pgd":
        parts.append(f"aa-{key['aa_version']}" + (f"-i{key['aa_iters']}" if key["aa_iters"] else ""))
    parts += [f"{k.removeprefix('test_')}{overrides[k]:g}" for k in ("test_eps", "test_alpha") if k in overrides]
    parts += [overrides["norm"]] if "norm" in overrides else []
    return "eval-" + "-".join(parts) + ".json"


def evaluate_checkpoint(path, *, split: str = "test", subset: int = 0, steps: int = 50, restarts: int = 5,
                        attack: str = "all", aa_version: str = "standard", aa_iters: int = 0,
                        check_subset: int = 1000, seed: int = 0, device: str = "auto", force: bool = False,
                        reuse: bool = False, overrides: dict | None = None, log=print) -> dict:
    """--eval: SA, PGD, AutoAttack and gradient-masking checks of a checkpoint, as its config (with EVAL_OVERRIDES)
    says, into eval-<checkpoint>-<options>.json (force: overwrite; reuse: return one of the same key)."""
    t0, ck_path = time.time(), Path(find_checkpoint(path))
    ck = read_checkpoint(ck_path)
    overrides = {k: v for k, v in (overrides or {}).items() if k in EVAL_OVERRIDES}
    step = {"test_alpha": -1.0} if "test_eps" in overrides else {}  # a new eps, given no step: eps / 4
    cfg = config_of(ck, device=device, **{**step, **overrides})
    (eps, alpha), dev = cfg.eps(train=False), resolve_device(cfg.device)
    opts = dict(steps=steps, restarts=restarts, attack=attack, aa_version=aa_version, aa_iters=aa_iters,
                check_subset=check_subset, seed=seed)
    key = dict(checkpoint_sha256=hashlib.sha256(ck_path.read_bytes()).hexdigest(), split=split, subset=subset, **opts,
               eps=eps, alpha=alpha, norm=cfg.norm)
    out = ck_path.with_name(eval_filename(ck_path, key, overrides))
    if out.exists() and reuse and json.loads(out.read_text()).get("key") == key:
        return json.loads(out.read_text())
    if out.exists() and not (force or reuse):
        raise SparseWinError(f"{out} exists; pass --force to overwrite it")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SparseWinError(f"cannot write the results to {out.parent}: not a writable directory")
    need(attack == "pgd" or importlib.util.find_spec("pyautoattack") is not None, AA_MISSING)  # now, not after PGD
    net, masks = model_from_checkpoint(ck, ck_path, architecture(cfg))
    net = net.to(dev)
    density, nonzero = density_of(net, masks, sum(weight_counts(model_for(cfg)).values()))
    data = load_data(cfg)
    if split == "train":  # the run's training images (its --train-subset), unaugmented: the robust gap's
        data["train"] = tuple(t[:cfg.train_subset or None] for t in data["train"])
    x, y = (t[:subset or None].to(dev) for t in data[split])
    bs = overrides.get("batch_size") or cfg.eval_batch_size  # as train() evaluates: the same SA, bit for bit
    progress = EvalProgress(out.with_name(out.stem + ".partial.json"), key, log)
    first, checks, aa = eval_parts(net, x, y, progress, cfg, bs=bs, **opts)
    pct = lambda bits: 100 * sum(bits) / len(bits) if bits else 0.0  # noqa: E731
    ra_pgd, ra_aa = pct(first["robust"]) if attack != "autoattack" else None, pct(aa["robust"]) if aa else None
    checks = {**checks, **aa_checks(ra_pgd, ra_aa, aa["flags"] if aa else [])}
    failed = [f"warning: gradient-masking check {k} failed: {c['detail']}" for k, c in checks.items()
              if c["ok"] is False]
    result = dict(
        file=out.name, checkpoint=str(ck_path.resolve()), epoch=ck["epoch"] if "epoch" in ck else ck["run"]["epoch"],
        key=key, method=METHOD[cfg.mode], mode=cfg.mode, dataset=cfg.dataset, arch=cfg.arch,
        width=architecture(cfg)["width"], sparsity=cfg.sparsity, density=density, nonzero_density=nonzero,
        masked_weights_zero=True, split=split, examples=len(y), device=str(dev), eps=eps, alpha=alpha, norm=cfg.norm,
        seed=seed, sa=pct(first["clean"]), loss=first["loss"],
        pgd=dict(steps=steps, restarts=restarts, ra=ra_pgd, adv_loss=first["adv_loss"]) if ra_pgd is not None else None,
        autoattack=dict(version=aa_version, iters=aa_iters or None, ra=ra_aa, flags=aa["flags"]) if aa else None,
        checks=checks, warnings=failed, wall_seconds=time.time() - t0)
    write_text_atomic(out, strict_json(result, indent=1))
    progress.path.unlink(missing_ok=True)
    for w in failed + [format_eval_table(result), f"wrote {out}"]:
        log(w)
    return result


def eval_parts(net, x, y, progress: EvalProgress, cfg: Config, *, bs, steps, restarts, attack, aa_version, aa_iters,
               check_subset, seed) -> tuple[dict, dict, dict | None]:
    """evaluate_checkpoint's parts, each saved when done: PGD (worst case over restarts), the checks, AutoAttack."""
    (eps, alpha), dev = cfg.eps(train=False), x.device

    def pgd_part():
        ex = evaluate_examples(net, Batches(x, y, batch_size=bs), eps=eps, alpha=alpha,
                               steps=steps if attack != "autoattack" else 0, norm=cfg.norm, restarts=restarts,
                               generator=torch.Generator(dev).manual_seed(seed))
        return dict(clean=ex["clean"].tolist(), robust=(ex["clean"] & ex["robust"]).tolist(),
                    loss=ex["loss"].mean().item(), adv_loss=ex["adv_loss"].mean().item())
    first = progress.part("pgd", pgd_part)
    n = check_subset or len(y)
    checks = progress.part("checks", lambda: masking_checks(
        net, Batches(x[:n], y[:n], batch_size=bs), eps=eps, alpha=alpha, steps=steps, norm=cfg.norm, seed=seed))
    if attack == "pgd":
        return first, checks, None
    return first, checks, progress.part("autoattack", lambda: autoattack_eval(
        net, x.float() / 255, y, eps=eps, norm=cfg.norm, version=aa_version, iters=aa_iters, batch_size=bs, seed=seed,
        done=progress.done.get("autoattack_partial"), on_batch=lambda r: progress.put("autoattack_partial", r)))


def format_eval_table(r: dict) -> str:  # an --eval result as a Markdown table (accuracies in %)
    pgd, aa, failed = r["pgd"], r["autoattack"], [k for k, c in r["checks"].items() if c["ok"] is False]
    aa_cell = f"{aa['ra']:.2f} ({aa['version']}" + (f", {aa['iters']} it" if aa["iters"] else "") + ")" if aa else "-"
    head = ["checkpoint", "split", "images", "density", "SA", "PGD RA", "AutoAttack RA", "gradient-masking checks"]
    return markdown_table(head, [[f"{Path(r['checkpoint']).name} (epoch {r['epoch']})", r["split"], r["examples"],
                                  f"{r['density']:.4f}", f"{r['sa']:.2f}",
                                  f"{pgd['ra']:.2f} (PGD-{pgd['steps']} x{pgd['restarts']})" if pgd else "-", aa_cell,
                                  "failed: " + ", ".join(failed) if failed else "passed"]])


def eval_options(cfg: Config) -> dict:  # evaluate_checkpoint's keyword arguments from the --eval flags
    return dict(split=cfg.split, subset=cfg.eval_subset, steps=cfg.eval_steps, restarts=cfg.restarts,
                attack=cfg.attack, aa_version=cfg.aa_version, aa_iters=cfg.aa_iters, check_subset=cfg.check_subset,
                seed=cfg.seed, device=cfg.device, force=cfg.force)


def final_eval(cfg: Config, run_dir: Path, log=print) -> dict:
    """--final-eval autoattack: --eval of best.pt and last.pt when training ends; the fields for summary.json."""
    if cfg.final_eval == "none":
        return {}
    out = {}
    for which, name in (("best", "best.pt"), ("final", "last.pt")):
        r = evaluate_checkpoint(run_dir / name, **{**eval_options(cfg), "force": False}, reuse=True, log=log)
        out.update({f"ra_aa_{which}": r["autoattack"]["ra"], f"eval_{which}": r["file"]})
    return out


# ----------------------------------------------------------------------------- benchmark

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def benchmark(cfg: Config, log=print) -> list[dict]:
    """AT images/s of Trainer.step (train()'s): fp32, then on CUDA bf16 + channels_last (+ compile); for dense, sparse
    (Flying Bird (+) at --sparsity: dense kernels) and thin (--sparsity of every channel group removed) models."""
    device, info = resolve_device(cfg.device), DATASETS[cfg.dataset]
    shape = (info["channels"], info["size"], info["size"])
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x = torch.randint(0, 256, (cfg.batch_size, *shape), dtype=torch.uint8, device=device, generator=gen)
    y = torch.randint(0, info["classes"], (cfg.batch_size,), device=device, generator=gen)
    peak = next((v for k, v in BF16_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    variants = [("fp32 eager", dict(amp=False, channels_last=False, compile=False))]
    if device.type == "cuda":
        variants.append(("bf16 channels_last" + (" compile" if cfg.compile else ""),
                         dict(amp=True, channels_last=True, compile=cfg.compile)))
    sparse = cfg.mode if cfg.mode in ("dynamic", "dynamic+") else "dynamic"
    rows = []
    for label, fast in variants:
        for model, mode in (("dense", "dense"), ("sparse", sparse), ("thin", "dense")):
            run_cfg = dataclasses.replace(cfg, mode=mode, ticket="unstructured", **fast)
            t = Trainer(run_cfg, method_for(run_cfg), device=device, dist=Dist(), input_shape=shape)
            t.batches = Batches(x, y, batch_size=cfg.batch_size)
            xb, yb = next(iter(t.batches))  # the batch as a step sees it: pixels in [0, 1], t.batches.rows set
            t.method.start(t.net, total_steps=cfg.epochs * len(t.batches), epochs=cfg.epochs)
            if model == "thin":
                t.adopt(slim(t.net, {n: max(1, round(cfg.density * g.numel())) for n, g in bn_gammas(t.net).items()}))
                t.optimizer, t.scheduler = sgd(run_cfg, t.net)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = seconds(lambda: t.step(xb, yb, 1, cfg.train_attack), device=device, reps=7)
            memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            with torch.no_grad(), autocast(device.type, t.amp):
                inference = seconds(lambda: t.core.eval()(xb), device=device)
            per_weight, unowned, dense = t.flops  # executed: the kernels that run, masked weights included
            executed = (2 * attack_cost(cfg.train_attack, cfg.train_steps) + 3) * forward_flops(
                per_weight, weight_counts(t.net), unowned)
            ips = cfg.batch_size / step
            rows.append(r := dict(variant=label, model=model, images_per_s=ips, inference_per_s=len(xb) / inference,
                                  flops_ratio=t.method.forward_flops(per_weight, unowned) / dense,
                                  epoch_s=45000 / ips, tflops=executed * ips / 1e12,
                                  peak_fraction=executed * ips / peak if peak else None, peak_memory=memory))
            log(f"{label:28s} {model:6s} AT {ips:9.1f} img/s  inference {r['inference_per_s']:9.1f} img/s  FLOPs "
                f"{r['flops_ratio']:.3f} x dense  epoch (45k) {r['epoch_s']:8.1f} s  {r['tflops']:7.2f} TFLOP/s"
                + (f"  {100 * r['peak_fraction']:.1f}% of bf16 peak" if peak else "")
                + (f"  peak mem {memory / 2**30:.2f} GiB" if memory else ""))
    return rows


# ----------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    """The CLI, generated from Config's fields; a flag that is not given is absent from the result."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2 (argparse prints the usage block otherwise), + did you mean
            bad = re.search(r"argument (--[\w-]+).*invalid choice: '([^']*)'|unrecognized arguments: (\S+)", message)
            names = bad and (self._option_string_actions if bad[3] else self._option_string_actions[bad[1]].choices)
            raise SparseWinError(message + (did_you_mean((bad[3] or bad[2]).split("=")[0], names) if bad else ""))
    def flag(name, v):  # a preset's value as the flags that set it
        f, v = "--" + name.replace("_", "-"), " ".join(map(str, v)) if isinstance(v, tuple) else v
        return (f if v else f"--no-{f[2:]}") if isinstance(v, bool) else f"{f} {v}"
    presets = "; ".join(f"{k}: " + " ".join(flag(*kv) for kv in p.items()) for k, p in PRESETS.items())
    parser = Parser(prog="sparse_win.py", description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                    epilog=f"presets: {presets}")
    for f in dataclasses.fields(Config):
        kw = {k: v for k, v in f.metadata.items() if k not in ("help", "switch", "valid", "negate")}
        switch = isinstance(f.default, bool) or "switch" in f.metadata  # --x / --no-x; a switch defaults by device
        kw = dict(action=argparse.BooleanOptionalAction) if switch else {"type": type(f.default), **kw}
        parser.add_argument("--" + f.name.replace("_", "-"), **kw,
                            help=f"{f.metadata['help']} (default: {f.metadata.get('switch', f.default)})")
        if "negate" in f.metadata:  # --no-resume
            parser.add_argument("--no-" + f.name, dest=f.name, action="store_const", const=f.metadata["negate"])
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the command line: preset values first, explicit flags over them."""
    args = vars(_parser().parse_args(argv))
    preset = args.get("preset", "")
    if preset:
        check_choice("preset", preset, PRESETS)
    values = {**PRESETS.get(preset, {}), **args}
    if "milestones" in values:
        values["milestones"] = tuple(values["milestones"])
    return validate(Config(**values))


def main(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg = parse_args(argv)
        if cfg.eval:  # flags given explicitly replace the checkpoint's own (eps, step size, norm, data dir)
            given = set(vars(_parser().parse_args(argv)))
            evaluate_checkpoint(cfg.eval, **eval_options(cfg), overrides={k: getattr(cfg, k) for k in given})
        elif cfg.benchmark:
            benchmark(cfg)
        else:
            init_distributed(cfg)  # under torchrun: join the job (WORLD_SIZE > 1)
            with StopRequest() as stop:
                train(cfg, stop=stop)
        return 0
    except Finished as e:
        print(e)
        return 0
    except SparseWinError as e:
        message, code = f"error: {e}", 2
    except RunError as e:
        message, code = f"{'error: ' if e.code in (DIVERGED, IO_ERROR) else ''}{e}", e.code
    except torch.cuda.OutOfMemoryError as e:
        kept = ("" if cfg is None or cfg.eval or cfg.benchmark else
                "; --resume continues from last.pt, if one was written")
        message, code = (f"error: CUDA out of memory ({(str(e).splitlines() or [''])[0][:100]}); try a smaller "
                         f"--batch-size (under torchrun the global batch) or --amp{kept}"), OUT_OF_MEMORY
    except KeyboardInterrupt:
        then = ("the same --eval continues from its .partial.json" if cfg is not None and cfg.eval
                else "last.pt holds the last checkpoint (--resume)")
        message, code = f"interrupted; {then}", INTERRUPTED
    finally:
        if (dist := Dist()).on:
            dist.td.destroy_process_group()
    print(f"sparse_win.py: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
