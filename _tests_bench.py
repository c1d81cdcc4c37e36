import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparse_win as sw


# ----------------------------------------------------------------------------- benchmarks
# `python -m pytest -p test_sparse_win test_sparse_win.py --benchmark-only`: pytest-benchmark groups
# put our code next to its baseline, measured in the same run; the table's "(x.xx)" columns
# are the ratios. The default suite skips these (--benchmark-skip) but runs the equality checks.

def sort_update(mask: sw.SparseMask, death_rate: float, growth: str, generator=None):
    """The straightforward topology update: sort every layer's full |w| and growth scores.

    The reference that SparseMask.update must match (on tie-free data) and beat (3x).
    """
    out = {}
    for i, name in enumerate(mask.names):
        p, m = mask.params[name], mask.masks[name].reshape(-1).clone()
        nnz, size = mask.counts[i], mask.sizes[i]
        k = min(math.ceil(death_rate * nnz), size - nnz)
        if k > 0:
            drop = p.detach().abs().reshape(-1).masked_fill(~m, math.inf).sort().indices[:k]
            score = p.grad.abs().reshape(-1) if growth == "gradient" else torch.rand(size, generator=generator)
            grow = score.masked_fill(m, -math.inf).sort(descending=True).indices[:k]
            m[drop], m[grow] = False, True
        out[name] = m.view(p.shape)
    return out


def _tie_free_model(width, seed, density=0.2):
    g = torch.Generator().manual_seed(seed)
    model = sw.build_model("resnet18", width=width)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # continuous draws: no ties
            p.grad = torch.randn(p.shape, generator=g)
    mask = sw.SparseMask(model, density=density, seed=seed)
    with torch.no_grad():  # masked weights are zero after apply(); make active values tie-free again
        for n, p in mask.params.items():
            p.add_(torch.rand(p.shape, generator=g) * 1e-3 * mask.masks[n])
    return model, mask


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_update_matches_sort_reference(growth):
    _, mask = _tie_free_model(0.125, seed=3)
    ref = sort_update(mask, 0.3, growth)
    before = {n: m.clone() for n, m in mask.masks.items()}
    mask.update(0.3, growth=growth)
    for n in mask.names:
        if growth == "gradient":  # deterministic: identical masks
            assert torch.equal(mask.masks[n], ref[n]), n
        else:  # random growth: the same pruned set, and the same counts
            assert torch.equal(before[n] & ~mask.masks[n], before[n] & ~ref[n]), n
            assert int(mask.masks[n].sum()) == int(ref[n].sum())


@pytest.fixture(scope="module")
def full_resnet():
    return _tie_free_model(1.0, seed=0)


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_bench_topology_update_ours(benchmark, full_resnet, growth):
    _, mask = full_resnet
    benchmark.group = f"topology update, ResNet-18 11.2M weights, d=0.2, {growth}"
    benchmark.pedantic(lambda: mask.update(0.3, growth=growth), rounds=3, iterations=1)


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_bench_topology_update_sort_baseline(benchmark, full_resnet, growth):
    _, mask = full_resnet
    benchmark.group = f"topology update, ResNet-18 11.2M weights, d=0.2, {growth}"
    benchmark.pedantic(lambda: sort_update(mask, 0.3, growth), rounds=3, iterations=1)


@pytest.fixture(scope="module")
def step_setup():
    """ResNet-18 at width 16, batch 128, 32x32: the CPU reference point of issue targets."""
    torch.manual_seed(0)
    model = sw.build_model("resnet18", width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    mask = sw.SparseMask(model, density=0.2)

    def sgd_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sgd_step()  # momentum buffers exist
    return model, opt, mask, x, y, sgd_step


def test_bench_sgd_step_baseline(benchmark, step_setup):
    benchmark.group = "mask upkeep vs standard SGD step (ResNet-18 w16, batch 128)"
    benchmark.pedantic(step_setup[-1], rounds=5, iterations=1, warmup_rounds=1)


def test_bench_mask_apply(benchmark, step_setup):
    _, opt, mask, *_ = step_setup
    benchmark.group = "mask upkeep vs standard SGD step (ResNet-18 w16, batch 128)"
    benchmark.pedantic(lambda: mask.apply(opt), rounds=50, iterations=1, warmup_rounds=2)


def test_bench_pgd_ours(benchmark, step_setup):
    model, _, _, x, y, _ = step_setup
    model.eval()
    benchmark.group = "PGD-10 L-inf, ResNet-18 w16, batch 128"
    benchmark.pedantic(lambda: sw.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10), rounds=3, iterations=1)


def test_bench_pgd_torchattacks(benchmark, step_setup):
    torchattacks = pytest.importorskip("torchattacks")
    model, _, _, x, y, _ = step_setup
    model.eval()
    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    benchmark.group = "PGD-10 L-inf, ResNet-18 w16, batch 128"
    benchmark.pedantic(lambda: atk(x, y), rounds=3, iterations=1)


PEAK_RSS = r"""
import sys, torch, torch.nn.functional as F, sparse_win as sw
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
torch.manual_seed(0)
base = status("VmRSS:")
model = sw.build_model("resnet18", width=0.25)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
mask = sw.SparseMask(model, density=0.2) if sys.argv[1] == "sparse" else None
x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    loss = F.cross_entropy(model(sw.pgd(model, x, y, eps=8/255, alpha=2/255, steps=2)), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if mask is not None: mask.step(opt)
step()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
step()
print(status("VmHWM:") - base)
"""


def test_bench_peak_memory(benchmark):
    """Peak resident memory of a PGD AT step, with masks vs dense (target: within 5%)."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    peak = {kind: int(subprocess.run([sys.executable, "-c", PEAK_RSS, kind], capture_output=True, text=True,
                                     check=True).stdout) for kind in ("dense", "sparse")}
    benchmark.extra_info.update(peak_dense_bytes=peak["dense"], peak_sparse_bytes=peak["sparse"],
                                ratio=peak["sparse"] / peak["dense"])
    print(f"\npeak step memory: dense {peak['dense'] / 2**20:.1f} MiB, with masks {peak['sparse'] / 2**20:.1f} MiB "
          f"(ratio {peak['sparse'] / peak['dense']:.3f})")
    benchmark.pedantic(lambda: None, rounds=1)
