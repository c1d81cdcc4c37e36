"""Tests of sparse_win.py, in the file's two parts and its order: first the library above the
'# === program' line (properties, fast paths against slow references, benchmarks against in-run
baselines), then the training program below it, end to end. The studies' report has its tests
beside it, in results/test_study_report.py.

    python -m pytest -q                   # default suite (CI)
    python -m pytest -m slow              # the longer runs
    python -m pytest -m cuda              # the CUDA tests (skipped without a GPU)
    python -m pytest --benchmark-only     # the benchmarks

pyproject.toml registers the markers, deselects slow tests and skips benchmarks unless asked.
Benchmark groups put our code beside its baseline, and the "(x.xx)" in the table is the ratio.
Hypothesis runs the "ci" profile (derandomized) when CI is set, and "mutants" (the same, without
shrinking) under .ci/mutants.py, the check that these tests catch realistic bugs in sparse_win.py.
"""
import ast
import contextlib
import copy
import dataclasses
import functools
import errno
import gzip
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import symtable
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sparse_win as sw

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
# .ci/mutants.py: as CI, without shrinking (that a mutant fails is all it needs to know)
settings.register_profile("mutants", parent=settings.get_profile("ci"), phases=[Phase.explicit, Phase.generate])
settings.load_profile("mutants" if os.environ.get("MUTANTS") else "ci" if os.environ.get("CI") else "dev")


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the tiny tensors of the tests (on 2 shared cores OpenMP's spinning
    threads made a 4-channel conv 100x slower). Session-wide: the thread count changes float
    reduction order, and resumed runs are compared with runs made by module fixtures."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(autouse=True)
def all_threads_for_benchmarks(request):
    """Benchmarks measure with torch's default thread count."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


# =============================================================================
# library: the tests of the part of sparse_win.py above '# === program', in its order
# =============================================================================

# Hypothesis draws shapes, densities and seeds; torch fills values from a seeded Generator.

SEEDS = st.integers(0, 2**31 - 1)
DENSITIES = st.floats(0.01, 1.0)  # sparsity 0 .. 0.99
ALLOCS = st.sampled_from(["igq", "erk", "uniform"])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers

@st.composite
def layer_shapes(draw, max_layers=5):
    """Weight shapes of conv (out, in, k, k) and linear (out, in) layers; no forward needed."""
    shapes = []
    for _ in range(draw(st.integers(1, max_layers))):
        if draw(st.booleans()):
            k = draw(st.sampled_from([1, 3]))
            shapes.append((draw(st.integers(1, 8)), draw(st.integers(1, 8)), k, k))
        else:
            shapes.append((draw(st.integers(1, 24)), draw(st.integers(1, 24))))
    return shapes


def fill_(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def model_from_shapes(shapes, gen):
    layers = [nn.Conv2d(s[1], s[0], s[2]) if len(s) == 4 else nn.Linear(s[1], s[0]) for s in shapes]
    return fill_(nn.Sequential(*layers), gen)


@st.composite
def chain_specs(draw):
    """A forward-able net on (B, c0, 6, 6): [conv-tanh]* flatten [linear-tanh]* linear."""
    c0 = draw(st.integers(1, 3))
    convs = draw(st.lists(st.tuples(st.integers(1, 5), st.sampled_from([1, 3])), max_size=2))
    linears = draw(st.lists(st.integers(1, 10), min_size=1, max_size=2))
    return c0, convs, linears


HW = 6


def chain_model(spec, gen):
    c0, convs, linears = spec
    layers, c = [], c0
    for cout, k in convs:
        layers += [nn.Conv2d(c, cout, k, padding=k // 2), nn.Tanh()]
        c = cout
    layers.append(nn.Flatten())
    f = c * HW * HW
    for i, h in enumerate(linears):
        layers.append(nn.Linear(f, h))
        f = h
        if i < len(linears) - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    with torch.no_grad():  # scaled so tanh does not saturate; values distinct (tie-free)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel())))
    return model


def sgd_step(model, opt, gen, c0):
    x = torch.randn(4, c0, HW, HW, generator=gen)
    out = model(x)
    r = torch.randn(out.shape, generator=gen)
    opt.zero_grad()
    (out * r).sum().backward()
    opt.step()


def smallest_ref(values, candidates, k, largest=False):
    """Slow reference: the k candidates of smallest (largest) |value|, by a Python sort.

    Returns (sorted magnitudes of the chosen k, set of indices or None if the boundary ties).
    """
    mags = sorted(((abs(values[i]), i) for i in candidates), reverse=largest)
    chosen = mags[:k]
    tie = 0 < k < len(mags) and mags[k - 1][0] == mags[k][0]
    return sorted(m for m, _ in chosen), None if tie else {i for _, i in chosen}


def assert_chosen(values, candidates, chosen, k, largest=False):
    """chosen (indices) are exactly the k smallest/largest |values| among candidates."""
    mags_ref, idx_ref = smallest_ref(values, candidates, k, largest)
    assert len(chosen) == k
    assert sorted(abs(values[i]) for i in chosen) == mags_ref
    if idx_ref is not None:
        assert set(chosen) == idx_ref


def momentum(opt, p):
    return opt.state[p]["momentum_buffer"] if "momentum_buffer" in opt.state.get(p, {}) else torch.zeros_like(p)


def tiny_cnn(gen, c=3, classes=3, bn=False):
    layers = [nn.Conv2d(c, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def linear_problem(d: int, k: int, b: int, seed: int):
    """A float64 linear classifier (d -> k) with random weights, and b inputs in [0, 1] with labels."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    return model, torch.rand(b, d, generator=gen, dtype=torch.float64), torch.randint(0, k, (b,), generator=gen)


def linear_ce_grad(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d cross-entropy / dx of a linear classifier in closed form, per example: (softmax(W x + b) - onehot(y)) W."""
    W, bias = model.weight.detach(), model.bias.detach()
    return (torch.softmax(x @ W.T + bias, dim=1) - F.one_hot(y, W.shape[0]).to(W.dtype)) @ W


# ----------------------------------------------------------------------------- 1. the library stands alone

def names_bound(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def names_used(node: ast.stmt, table) -> set[str]:
    """The module-level names a top-level statement reads: at import time (decorators, defaults, bases,
    annotations, the statement itself) and, through its symbol table, as globals of its body."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        a = getattr(node, "args", None)
        parts = [*node.decorator_list, *getattr(node, "bases", []), *getattr(node, "keywords", [])]
        if a is not None:
            parts += [*a.defaults, *filter(None, a.kw_defaults), *filter(None, [node.returns])]
            parts += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
                      if x is not None and x.annotation is not None]
    else:
        parts = [node]
    used = {n.id for part in parts for n in ast.walk(part) if isinstance(n, ast.Name)}

    def global_reads(tab):
        return {s.get_name() for s in tab.get_symbols() if s.is_referenced() and s.is_global()}.union(
            *(global_reads(c) for c in tab.get_children()))
    return used | (global_reads(table) if table is not None else set())


def test_library_above_the_banner_refers_to_nothing_below_it():
    """Copying sparse_win.py down to the '# === program' line gives the whole library: no top-level
    statement above it reads a name that only the program below defines (and the part runs alone)."""
    path = Path(sw.__file__)
    src = path.read_text()
    lines = src.splitlines()
    banner = [i for i, line in enumerate(lines, 1) if line.startswith("# === program")]
    assert len(banner) == 1 and "above this line is the library" in lines[banner[0] - 1]
    tree = ast.parse(src)
    tables = {tab.get_lineno(): tab for tab in symtable.symtable(src, str(path), "exec").get_children()}
    above = [n for n in tree.body if n.end_lineno < banner[0]]
    below = set().union(*(names_bound(n) for n in tree.body if n.lineno > banner[0]))
    assert {"Config", "train", "main", "json", "Path"} <= below  # the program's names are seen
    for node in above:
        wrong = names_used(node, tables.get(node.lineno)) & below
        assert not wrong, (getattr(node, "name", ast.unparse(node)[:60]), node.lineno, wrong)
    library = {}  # and the part above the banner, alone, defines the library that README documents
    exec(compile("\n".join(lines[:banner[0] - 1]), "library", "exec"), library)
    for name in ("SparseMask", "Dense", "RobustBird", "FlyingBird", "FlyingBirdPlus", "pgd", "fgsm_rs", "evaluate",
                 "model_flops", "forward_flops", "FlopLedger", "EarlyBird", "build_model", "fbplus_decision",
                 "adversarial_step", "save_model", "load_model"):
        assert name in library, name


COPIED = """
import sys
for name in ("torchvision", "tqdm", "matplotlib"):
    sys.modules[name] = None  # as if not installed: importing it fails
import torch
import mylib as sw

arch = dict(arch="resnet18", num_classes=10, in_channels=1, width=0.0625)
x, y = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
for loss, method in (("trades", sw.FlyingBirdPlus(start_epoch=0, window=1, threshold=0.0, density=0.3, interval=2,
                                                  interval_late=2)), ("ce", None)):
    torch.manual_seed(0)
    net = sw.build_model(**arch)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    if method is not None:
        method.start(net, total_steps=4, epochs=4)
    gen, updates = torch.Generator().manual_seed(1), []
    for epoch in range(4):  # one step per epoch; FB+ records a widening gap and a rising loss after each
        out = sw.adversarial_step(net, x, y, opt, method, eps=0.1, alpha=0.025, steps=2, loss=loss, epoch=epoch,
                                  generator=gen)
        updates += [out["update"]] if out["update"] else []
        if method is not None:
            method.end_epoch(50.0 + epoch, dict(ra=40.0, adv_loss=1.0 + epoch))
    sw.save_model(f"{loss}.pt", net, architecture=arch, mask=method.mask if method else None)
    back = sw.load_model(f"{loss}.pt")
    same = torch.equal(back(x), net.eval()(x))
    print(loss, same, [(u["step"], u["extra_prune"] > 0, u["density"]) for u in updates],
          method.mask.density if method else 1.0, round(out["loss"].item(), 4) > 0)
"""


def test_the_copied_library_trains_saves_and_loads_alone(tmp_path):
    """The file down to '# === program', copied into another project, trains with adversarial_step (Flying Bird+
    with TRADES, and plain PGD-AT), saves with save_model and loads with its own load_model to the same logits,
    in a process where torchvision, tqdm and matplotlib cannot be imported."""
    lines = Path(sw.__file__).read_text().splitlines(keepends=True)
    (tmp_path / "mylib.py").write_text("".join(lines[:next(i for i, s in enumerate(lines) if s.startswith("# ==="))]))
    (tmp_path / "copied.py").write_text(COPIED)
    p = subprocess.run([sys.executable, "copied.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path)))
    assert p.returncode == 0, p.stderr[-2000:]
    trades, ce = p.stdout.splitlines()
    # FB+ updates at steps 2 and 4; at step 4 the gap rose in the window: extra pruning (density below 0.3)
    assert trades.startswith("trades True [(2, False, 0.3") and ", (4, True, 0." in trades, trades
    assert float(trades.split("] ")[1].split()[0]) < 0.3
    assert ce == "ce True [] 1.0 True"


# ----------------------------------------------------------------------------- 2. models

def test_resnet18_parameter_count():
    assert sum(p.numel() for p in sw.build_model("resnet18", num_classes=10).parameters()) == 11_173_962


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16", "wrn"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "tiny-imagenet", "fashion-mnist"])
def test_output_shapes(arch, dataset):
    info = sw.DATASETS[dataset]
    model = sw.build_model(arch, num_classes=info["classes"], in_channels=info["channels"], width=0.0625,
                           mean=info["mean"], std=info["std"], wrn_depth=10, wrn_widen=1)
    x = torch.rand(2, info["channels"], info["size"], info["size"])
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, info["classes"])
    assert torch.isfinite(out).all()


def test_normalize_module():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    got = sw.Normalize(mean, std)(x)
    for c in range(3):
        torch.testing.assert_close(got[:, c], (x[:, c] - mean[c]) / std[c])


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16", "wrn"])
def test_normalization_happens_inside_the_model(arch):
    info = sw.DATASETS["cifar10"]
    model = sw.build_model(arch, width=0.0625, mean=info["mean"], std=info["std"], wrn_depth=10, wrn_widen=1)
    fill_(model, torch.Generator().manual_seed(0))
    model.eval()
    plain = copy.deepcopy(model)
    norms = [m for m in plain.modules() if isinstance(m, sw.Normalize)]
    assert len(norms) == 1
    norms[0].mean.zero_()
    norms[0].std.fill_(1.0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - mean) / std))
        assert not torch.allclose(model(x), plain(x))  # the normalization does change the output


# ----------------------------------------------------------------------------- 3. attack: pgd, fgsm_rs

ATTACK = dict(eps=st.sampled_from([2 / 255, 8 / 255, 16 / 255]), steps=st.integers(1, 4),
              norm=st.sampled_from(["linf", "l2"]), seed=SEEDS)


@settings(max_examples=12, deadline=None)
@given(**ATTACK, random_start=st.booleans(), training=st.booleans())
def test_pgd_ball_box_mode_grads_determinism(eps, steps, norm, seed, random_start, training):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_cnn(gen, bn=True).train(training)
    x = torch.rand(5, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    eps = eps if norm == "linf" else eps * 8  # L2 budgets are larger
    params = list(model.parameters())
    preset = {i: torch.randn(p.shape, generator=gen) for i, p in enumerate(params) if i % 2 == 0}
    for i, p in enumerate(params):
        p.grad = preset[i].clone() if i in preset else None
    kw = dict(eps=eps, alpha=eps / 2, steps=steps, norm=norm, random_start=random_start)
    state = copy.deepcopy(model.state_dict())
    adv = sw.pgd(model, x, y, generator=torch.Generator().manual_seed(seed), **kw)
    assert model.training == training
    for i, p in enumerate(params):
        assert (p.grad is None) if i not in preset else torch.equal(p.grad, preset[i])
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5)).all()
    assert not torch.equal(adv, x)
    model.load_state_dict(state)  # BN running stats move in train mode; restore before the rerun
    again = sw.pgd(model, x, y, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(adv, again)


def test_pgd_random_start_depends_on_seed():
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen).eval()
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0])
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=1)
    a = sw.pgd(model, x, y, generator=torch.Generator().manual_seed(1), **kw)
    b = sw.pgd(model, x, y, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(a, b)
    assert torch.equal(sw.pgd(model, x, y, steps=0, eps=0.1, alpha=0.1), x)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), k=st.integers(2, 6), b=st.integers(1, 5), seed=SEEDS, eps=st.floats(0.01, 0.3),
       attack=st.sampled_from(["pgd", "fgsm-rs"]))
def test_one_step_attacks_closed_form_linear(d, k, b, seed, eps, attack):
    """One signed-gradient step from a start, back into the eps-ball and [0, 1], as pgd projects:
    PGD-1 without a random start steps eps from x; FGSM-RS (Wong et al. 2020) starts at x + U(-eps, eps)
    clamped to [0, 1] and steps 1.25 eps."""
    model, x, y = linear_problem(d, k, b, seed)
    if attack == "pgd":
        adv = sw.pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False)
        start, alpha = x, eps
    else:
        adv = sw.fgsm_rs(model, x, y, eps=eps, generator=torch.Generator().manual_seed(seed))
        u = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed))
        start, alpha = torch.clamp(x + u, 0, 1), 1.25 * eps
    g = linear_ce_grad(model, start, y)
    want = torch.clamp(x + torch.clamp(start + alpha * g.sign() - x, -eps, eps), 0, 1)
    sure = g.abs() > 1e-12  # sign of a numerically zero gradient is not determined
    assert torch.equal(adv[sure], want[sure])


def test_pgd_increases_loss_on_trained_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=gen)
    y = (x[:, :, :, :4].mean((1, 2, 3)) > x[:, :, :, 4:].mean((1, 2, 3))).long()  # left vs right brighter
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    clean = F.cross_entropy(model(x), y, reduction="none").detach()
    assert (model(x).argmax(1) == y).float().mean() > 0.8  # it learned something
    adv = sw.pgd(model, x, y, eps=0.1, alpha=0.03, steps=5, generator=torch.Generator().manual_seed(0))
    robust = F.cross_entropy(model(adv), y, reduction="none").detach()
    assert robust.mean() > clean.mean() * 1.5
    assert (robust >= clean - 1e-6).float().mean() > 0.9


@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, steps=st.integers(1, 4), eps=st.sampled_from([4 / 255, 8 / 255]))
def test_pgd_matches_torchattacks_linf(seed, steps, eps):
    torchattacks = pytest.importorskip("torchattacks")
    gen = torch.Generator().manual_seed(seed)
    model = sw.build_model("preact_resnet18", width=0.0625, num_classes=3).eval()
    fill_(model, gen)
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    torch.manual_seed(seed)
    theirs = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)(x, y)
    torch.manual_seed(seed)
    ours = sw.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=steps, generator=None)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@settings(max_examples=6, deadline=None)
@given(seed=SEEDS, steps=st.integers(1, 4))
def test_pgd_matches_torchattacks_l2(seed, steps):
    torchattacks = pytest.importorskip("torchattacks")
    gen = torch.Generator().manual_seed(seed)
    model = tiny_cnn(gen).eval()
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    torch.manual_seed(seed)
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=steps, random_start=True)(x, y)
    torch.manual_seed(seed)
    ours = sw.pgd(model, x, y, eps=0.5, alpha=0.1, steps=steps, norm="l2", generator=None)
    # loosened: torchattacks adds 1e-10 to norms and multiplies in another order (float32 rounding)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 12), k=st.integers(2, 6), b=st.integers(1, 5), seed=SEEDS, eps=st.floats(0.05, 1.0),
       ratio=st.sampled_from([0.25, 0.5, 2.0]))
def test_pgd_l2_one_step_closed_form_linear(d, k, b, seed, eps, ratio):
    """One L2 step from x is x + alpha g / |g| projected onto the eps-*ball* (a step shorter than eps stays
    as it is, a longer one is cut to eps), then into [0, 1]. A projection onto the sphere fails here."""
    model, x, y = linear_problem(d, k, b, seed)
    alpha = ratio * eps
    adv = sw.pgd(model, x, y, eps=eps, alpha=alpha, steps=1, norm="l2", random_start=False)
    g = linear_ce_grad(model, x, y)
    want = torch.clamp(x + min(alpha, eps) * g / g.norm(dim=1, keepdim=True), 0, 1)
    # loosened from exact: pgd's gradient carries the mean's 1/b, which the normalization removes up to rounding
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(3, 7), world=st.integers(2, 3), seed=SEEDS, norm=st.sampled_from(["linf", "l2"]))
def test_pgd_on_a_shard_equals_the_slice_of_the_full_batch(b, world, seed, norm):
    """A rank's PGD on its rows lo:hi, started from the slice of the whole batch's random start (attack_start),
    gives what one process gives for those rows (a linear model: per-example gradients)."""
    model, x, y = linear_problem(6, 3, b, seed)
    eps = 0.1 if norm == "linf" else 0.5
    kw = dict(eps=eps, alpha=eps / 4, steps=2, norm=norm)
    full = sw.pgd(model, x, y, generator=torch.Generator().manual_seed(seed), **kw)
    q, r = divmod(b, world)
    for rank in range(world):
        lo = rank * q + min(rank, r)
        hi = lo + q + (rank < r)
        start = sw.attack_start(x.shape, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed),
                                dtype=x.dtype)
        part = sw.pgd(model, x[lo:hi], y[lo:hi], start=start[lo:hi], **kw)
        # loosened for L2 only: the mean loss scales gradients by 1/len(batch); sign() drops it exactly,
        # the L2 normalization up to rounding
        torch.testing.assert_close(part, full[lo:hi], rtol=0, atol=0 if norm == "linf" else 1e-12)


@settings(max_examples=12, deadline=None)
@given(seed=SEEDS, eps=st.sampled_from([2 / 255, 8 / 255, 0.1, 0.3]), training=st.booleans())
def test_fgsm_rs_stays_in_ball_and_box(seed, eps, training):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_cnn(gen, bn=True).train(training)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    x[0] = 0  # pixels at the edges of [0, 1], where the clamp to the box bites
    x[1] = 1
    y = torch.randint(0, 3, (6,), generator=gen)
    adv = sw.fgsm_rs(model, x, y, eps=eps, generator=torch.Generator().manual_seed(seed))
    assert adv.min() >= 0 and adv.max() <= 1 and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert not torch.equal(adv, x) and model.training == training


def test_attack_cost_and_perturb():
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen).eval()
    x, y = torch.rand(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0])
    assert [sw.attack_cost(k, 10) for k in ("none", "fgsm-rs", "pgd")] == [0, 1, 10]
    kw = dict(eps=0.1, alpha=0.02, steps=3)
    assert sw.perturb(model, x, y, kind="none", **kw) is x
    for kind, ref in (("pgd", lambda g: sw.pgd(model, x, y, generator=g, **kw)),
                      ("fgsm-rs", lambda g: sw.fgsm_rs(model, x, y, eps=0.1, generator=g))):
        got = sw.perturb(model, x, y, kind=kind, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(got, ref(torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- 4. evaluate

@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, steps=st.integers(0, 3), training=st.booleans())
def test_evaluate_matches_manual_and_takes_no_param_grads(seed, steps, training):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_cnn(gen, bn=True)
    with torch.no_grad():  # BN stats that differ from the batch stats, so eval mode matters
        model[1].running_mean.copy_(torch.randn(4, generator=gen))
        model[1].running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    model.train(training)
    batches = [(torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (5, 3)]
    fired = []
    hooks = [p.register_hook(lambda g, name=name: fired.append(name)) for name, p in model.named_parameters()]
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=steps)
    got = sw.evaluate(model, batches, generator=torch.Generator().manual_seed(seed), **kw)
    assert fired == [] and all(p.grad is None for p in model.parameters())
    assert model.training == training
    for h in hooks:
        h.remove()

    model.eval()  # manual: clean and PGD accuracy in %, mean losses, same generator draws
    g2 = torch.Generator().manual_seed(seed)
    ok = adv_ok = loss = adv_loss = 0.0
    for x, y in batches:
        adv = sw.pgd(model, x, y, generator=g2, **kw) if steps else x
        with torch.no_grad():
            lc, la = model(x), model(adv)
        ok += int((lc.argmax(1) == y).sum())
        adv_ok += int((la.argmax(1) == y).sum())
        loss += float(F.cross_entropy(lc, y, reduction="sum"))
        adv_loss += float(F.cross_entropy(la, y, reduction="sum"))
    n = 8
    assert got["sa"] == 100 * (ok / n) and got["ra"] == 100 * (adv_ok / n)
    torch.testing.assert_close([got["loss"], got["adv_loss"]], [loss / n, adv_loss / n])
    if steps == 0:
        assert got["ra"] == got["sa"]


def test_param_hooks_do_fire_on_backward():
    """Control for the hook check above: the hooks do see ordinary parameter gradients."""
    model = tiny_cnn(torch.Generator().manual_seed(0))
    fired = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: fired.append(name))
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    assert sorted(fired) == sorted(n for n, _ in model.named_parameters())


def test_evaluate_is_fp32_inside_an_autocast_region():
    """evaluate() turns autocast off: inside a caller's bf16 region it gives the fp32 numbers exactly."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen, c=1, classes=4, bn=True)
    x = torch.randint(256, (24, 1, 8, 8), generator=gen, dtype=torch.uint8)  # Batches holds uint8 images
    y = torch.randint(4, (24,), generator=gen)
    ev = lambda: sw.evaluate(model, sw.Batches(x, y, batch_size=8), eps=0.1, alpha=0.025, steps=3,  # noqa: E731
                             generator=torch.Generator().manual_seed(1))
    ref = ev()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ev() == ref


# ----------------------------------------------------------------------------- 5. masks: allocation

@FEW
@given(shapes=layer_shapes(), density=DENSITIES, alloc=ALLOCS)
def test_allocate_counts_exact_total_and_bounds(shapes, density, alloc):
    sizes = [math.prod(s) for s in shapes]
    counts = sw.allocate_counts(shapes, density, alloc)
    assert len(counts) == len(shapes)
    assert sum(counts) == min(sum(sizes), max(round(density * sum(sizes)), len(shapes)))
    assert all(1 <= c <= n for c, n in zip(counts, sizes))  # every layer density in (0, 1]


@settings(max_examples=40, deadline=None)
@given(shapes=layer_shapes(), density=st.floats(0.01, 0.99), alloc=ALLOCS)
def test_layer_densities_weighted_mean_and_closed_forms(shapes, density, alloc):
    sizes = [math.prod(s) for s in shapes]
    d = sw.layer_densities(shapes, density, alloc)
    assert all(0 < x <= 1 for x in d)
    torch.testing.assert_close(sum(x * n for x, n in zip(d, sizes)) / sum(sizes), density,
                               rtol=1e-9, atol=0)
    if alloc == "uniform":
        assert d == [density] * len(shapes)
    elif alloc == "igq":  # d_l = 1 / (1 + f n_l): (1/d_l - 1) / n_l is one f for all layers
        f = [(1 / x - 1) / n for x, n in zip(d, sizes)]
        torch.testing.assert_close(f, [f[0]] * len(f), rtol=1e-7, atol=0)  # 1/d - 1 loses digits near d=1
    else:  # ERK: d_l ~ sum(shape)/prod(shape) on uncapped layers, the rest exactly 1
        raw = [sum(s) / math.prod(s) for s in shapes]
        free = [i for i, x in enumerate(d) if x < 1]
        scale = [d[i] / raw[i] for i in free]
        if scale:
            torch.testing.assert_close(scale, [scale[0]] * len(scale), rtol=1e-9, atol=0)
        for i in range(len(d)):
            if d[i] == 1 and scale:  # capped layers would have exceeded 1 at the common scale
                assert scale[0] * raw[i] >= 1 - 1e-12


def test_erk_closed_form_on_a_small_cnn():
    """ERK (Evci et al. 2020): d_l = scale x (sum of the shape) / (prod of the shape), kernel dims included;
    a layer that would exceed 1 is dense and the rest share what is left. Worked by hand for d = 0.2:
    the linear layer caps (1072 / 121 x 42 / 320 > 1), then scale = (1072 - 320) / (25 + 54)."""
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)]  # 432 + 4608 + 320 = 5360 weights, 1072 at d = 0.2
    torch.testing.assert_close(sw.layer_densities(shapes, 0.2, "erk"),
                               [752 / 79 * 25 / 432, 752 / 79 * 54 / 4608, 1.0], rtol=1e-12, atol=0)


def test_layer_densities_density_one_is_dense():
    for alloc in ("igq", "erk", "uniform"):
        assert sw.layer_densities([(4, 3, 3, 3), (5, 7)], 1.0, alloc) == [1.0, 1.0]


@FEW
@given(shapes=layer_shapes(), density=DENSITIES, alloc=ALLOCS, seed=SEEDS, channels_last=st.booleans())
def test_sparse_mask_init(shapes, density, alloc, seed, channels_last):
    gen = torch.Generator().manual_seed(seed)
    model = model_from_shapes(shapes, gen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in sw.prunable(model).items()}
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    counts = sw.allocate_counts(shapes, density, alloc)
    assert mask.counts == counts
    assert [int(mask.masks[n].sum()) for n in mask.names] == counts
    for n, p in sw.prunable(model).items():
        m = mask.masks[n]
        assert m.dtype == torch.bool and m.shape == p.shape and m.device == p.device
        assert torch.equal(p[~m], torch.zeros_like(p[~m]))  # masked weights are zero
        assert torch.equal(p[m], before[n][m])  # active weights untouched
    assert mask.density == sum(counts) / sum(math.prod(s) for s in shapes)
    assert mask.itop_rate() == mask.density
    # same seed -> same masks, on another model of the same shapes (and memory format)
    other_model = model_from_shapes(shapes, torch.Generator().manual_seed(seed + 1))
    if channels_last:
        other_model = other_model.to(memory_format=torch.channels_last)
    other = sw.SparseMask(other_model, density=density, allocation=alloc, seed=seed)
    assert all(torch.equal(mask.masks[n], other.masks[n]) for n in mask.names)


def test_same_seed_same_masks_whatever_the_memory_format():
    shapes = [(8, 4, 3, 3), (6, 8, 3, 3), (10, 24)]
    a = sw.SparseMask(model_from_shapes(shapes, torch.Generator().manual_seed(0)), density=0.3, seed=0)
    cl = model_from_shapes(shapes, torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    b = sw.SparseMask(cl, density=0.3, seed=0)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.names)


def test_sparse_mask_seed_changes_masks():
    shapes = [(8, 8, 3, 3), (10, 20)]
    a = sw.SparseMask(model_from_shapes(shapes, torch.Generator().manual_seed(0)), density=0.3, seed=0)
    b = sw.SparseMask(model_from_shapes(shapes, torch.Generator().manual_seed(0)), density=0.3, seed=1)
    assert a.counts == b.counts
    assert not all(torch.equal(a.masks[n], b.masks[n]) for n in a.names)


def test_allocation_flops_match_spec_table():
    """PAPER_SPEC Sec. 6: ResNet-18 forward FLOPs kept by IGQ / ERK / uniform at d = 0.2, 0.1."""
    net = sw.build_model("resnet18")
    per_weight = sw.model_flops(net, (3, 32, 32))[0]
    params = sw.prunable(net)
    shapes = [tuple(p.shape) for p in params.values()]
    dense = sw.forward_flops(per_weight, {n: p.numel() for n, p in params.items()})
    expect = {0.2: dict(igq=0.516, erk=0.508, uniform=0.200), 0.1: dict(igq=0.357, erk=0.248, uniform=0.100)}
    for density, table in expect.items():
        for alloc, ratio in table.items():
            counts = dict(zip(params, sw.allocate_counts(shapes, density, alloc)))
            assert abs(sw.forward_flops(per_weight, counts) / dense - ratio) <= 0.0005, (density, alloc)


# ----------------------------------------------------------------------------- 6. masks: topology updates

def released_update_ref(b, w, g, p, extra_prune=0.0, extra_growth=0.0):
    """Slow reference of one layer's update, as released (a Python sort per layer).

    b: active flags before; w, g: |w| and |grad| sources, logical order. Returns (pruned set,
    regrowth pool after pruning, regrow count, the grown set by largest |grad| or None without g).
    """
    nnz, size = sum(b), len(b)
    k = math.ceil(p * nnz)
    if nnz == size or k <= 0:  # a full layer is left alone, even by FB+'s extra pruning
        return set(), set(), 0, set()
    k_drop = min(k + (math.ceil(p * extra_prune * nnz) if extra_prune else 0), nnz)
    first = lambda v: -math.inf if math.isnan(v) else v  # noqa: E731  NaN magnitudes first, then ties by position
    pruned = set(sorted((i for i in range(size) if b[i]), key=lambda i: (first(abs(w[i])), i))[:k_drop])
    pool = [i for i in range(size) if not b[i] or i in pruned]  # the just-pruned included
    k_grow = min(k + (math.ceil(extra_growth * k) if extra_growth else 0), len(pool))
    grown = None if g is None else set(sorted(pool, key=lambda i: (first(-abs(g[i])), i))[:k_grow])
    return pruned, set(pool), k_grow, grown


def check_update(mask, model, opt, death_rate, growth, extra_prune=0.0, extra_growth=0.0):
    """One update with every property checked against released_update_ref; returns nothing."""
    params = sw.prunable(model)
    before = {n: mask.masks[n].clone() for n in mask.names}
    w0 = {n: params[n].detach().clone() for n in mask.names}
    m0 = {n: momentum(opt, params[n]).clone() for n in mask.names}
    g0 = {n: params[n].grad.clone() for n in mask.names}
    ever0 = {n: mask.ever_active[n].clone() for n in mask.names}
    itop0, counts0, density0 = mask.itop_rate(), list(mask.counts), mask.density

    info = mask.update(death_rate, growth=growth, optimizer=opt, extra_prune=extra_prune, extra_growth=extra_growth)

    drops = grows = 0
    for i, n in enumerate(mask.names):
        b, a = before[n].reshape(-1), mask.masks[n].reshape(-1)  # logical order, any memory format
        pruned, pool, k_grow, grown_ref = released_update_ref(
            b.tolist(), w0[n].reshape(-1).tolist(), g0[n].reshape(-1).tolist() if growth == "gradient" else None,
            death_rate, extra_prune, extra_growth)
        grown = {j for j in pool if a[j]}
        kept = b.clone()
        kept[list(pruned)] = False
        assert torch.equal(a & kept, kept)  # every active weight not pruned stays; the pool is ~kept
        assert len(grown) == k_grow and (grown_ref is None or grown == grown_ref)
        assert mask.counts[i] == int(a.sum()) == counts0[i] - len(pruned) + k_grow
        touched = torch.zeros_like(b)
        touched[list(pruned | grown)] = True
        w, mom = params[n].detach().reshape(-1), momentum(opt, params[n]).reshape(-1)
        assert torch.equal(w[~touched], w0[n].reshape(-1)[~touched])  # never touched: same values
        assert torch.equal(mom[~touched], m0[n].reshape(-1)[~touched])
        assert torch.equal(w[touched], torch.zeros_like(w[touched]))  # pruned + regrown start at 0
        assert torch.equal(mom[touched], torch.zeros_like(mom[touched]))
        assert torch.equal(mask.ever_active[n], ever0[n] | mask.masks[n])
        drops, grows = drops + len(pruned), grows + k_grow
    assert info == dict(pruned=drops, grown=grows)
    if not (extra_prune or extra_growth):
        assert mask.density == density0 and drops == grows
    ever = sum(int(mask.ever_active[n].sum()) for n in mask.names)
    assert mask.itop_rate() == ever / sum(mask.sizes) and mask.itop_rate() >= itop0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=chain_specs(), density=DENSITIES, alloc=ALLOCS, seed=SEEDS,
       growth=st.sampled_from(["random", "gradient"]), channels_last=st.booleans())
def test_update_many_random_updates(spec, density, alloc, seed, growth, channels_last):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    model = chain_model(spec, gen)
    if channels_last:  # train() uses channels_last on CUDA: masks must follow any weight layout
        model = model.to(memory_format=torch.channels_last)
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    params = sw.prunable(model)
    steps = 0
    for _ in range(100):
        sgd_step(model, opt, gen, spec[0])
        if rng.random() < 0.8:
            mask.step(opt)
            steps += 1
            for n in mask.names:  # masked weights and momentum exactly zero after step()
                off = ~mask.masks[n]
                assert torch.equal(params[n].detach()[off], torch.zeros_like(params[n][off]))
                assert torch.equal(momentum(opt, params[n])[off], torch.zeros_like(params[n][off]))
        # else: inactive weights and momentum are stale (nonzero); update() itself must zero what it regrows
        check_update(mask, model, opt, rng.choice([0.0, rng.uniform(0.005, 0.95)]), growth)
    assert mask.steps == steps


def test_update_keeps_exact_counts_with_nan_weights():
    """A step that turned weights into NaN (the loss check stops the run one step later) must not
    break the exact counts: NaN magnitudes are pruned first."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen, c=3, classes=4)
    mask = sw.SparseMask(model, density=0.5, seed=0)
    before = list(mask.counts)
    with torch.no_grad():
        for p in sw.prunable(model).values():
            p.view(-1)[::3] = float("nan")
    mask.update(0.3)
    assert mask.counts == before == [int(m.sum()) for m in mask.masks.values()]


def test_gradient_growth_needs_grad():
    model = nn.Sequential(nn.Linear(6, 6))
    mask = sw.SparseMask(model, density=0.5)
    with pytest.raises(sw.SparseWinError):
        mask.update(0.3, growth="gradient")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=chain_specs(), density=DENSITIES, alloc=ALLOCS, seed=SEEDS, p=st.floats(0.005, 0.5),
       extra_prune=st.sampled_from([0.0, 0.4, 0.9]), extra_growth=st.sampled_from([0.0, 0.05, 0.5]),
       growth=st.sampled_from(["random", "gradient"]))
def test_fbplus_extra_prune_and_growth_counts(spec, density, alloc, seed, p, extra_prune, extra_growth, growth):
    """Flying Bird+'s counts, per layer, against the released rule: prune ceil(p nnz) + ceil(p r nnz) in
    layers that are not full, regrow k + ceil(g k) among all inactive positions, capped by what is free."""
    gen = torch.Generator().manual_seed(seed)
    model = chain_model(spec, gen)
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sgd_step(model, opt, gen, spec[0])
    mask.step(opt)
    check_update(mask, model, opt, p, growth, extra_prune, extra_growth)


def one_layer_mask(n_in, n_out, active, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(n_out, n_in, generator=gen))
    m = torch.zeros(n_out * n_in, dtype=torch.bool)
    m[torch.randperm(n_out * n_in, generator=gen)[:active]] = True
    return model, sw.SparseMask(model, masks={"0.weight": m.view(n_out, n_in)})


@pytest.mark.parametrize("extra_growth, grown", [(0.0, 225), (0.05, 237)])
def test_update_dense_enough_layer_prunes_and_grows_the_full_count(extra_growth, grown):
    """1,000 weights, 900 active, p = 0.25: prune ceil(0.25 * 900) = 225 and regrow 225 (FB+'s extra
    growth: 225 + ceil(0.05 * 225) = 237), although only 100 positions were free before the update."""
    _, mask = one_layer_mask(100, 10, 900)
    info = mask.update(0.25, extra_growth=extra_growth)
    assert info == dict(pruned=225, grown=grown) and mask.counts == [900 - 225 + grown]
    assert int(mask.masks["0.weight"].sum()) == mask.counts[0]


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_update_leaves_a_full_layer_alone(growth):
    """A dense layer (ERK makes the first conv and the linear dense) is never pruned, not even by FB+'s extra."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20, bias=False), nn.Tanh(), nn.Linear(20, 30, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
            p.grad = torch.randn(p.shape, generator=gen)
    half = torch.zeros(600, dtype=torch.bool)
    half[:300] = True
    mask = sw.SparseMask(model, masks={"0.weight": torch.ones(20, 10, dtype=torch.bool), "2.weight": half.view(30, 20)})
    w0 = model[0].weight.detach().clone()
    info = mask.update(0.5, extra_prune=0.4, extra_growth=0.05, growth=growth)
    assert mask.counts[0] == 200 and bool(mask.masks["0.weight"].all()) and torch.equal(model[0].weight, w0)
    assert info == dict(pruned=150 + 60, grown=150 + 8) and mask.counts[1] == 300 - 210 + 158


def test_extra_prune_never_raises_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20, bias=False))
    mask = sw.SparseMask(model, density=1 / 400, seed=0)  # one active weight
    with torch.no_grad():
        model[0].weight.add_(torch.randn(20, 20) * mask.masks["0.weight"])
    assert mask.counts == [1]
    mask.update(0.5, extra_prune=0.4)  # k = ceil(0.5 * 1) = 1 = nnz
    assert mask.counts == [1] and int(mask.masks["0.weight"].sum()) == 1


@settings(max_examples=10, deadline=None)
@given(spec=chain_specs(), density=st.floats(0.05, 0.95), seed=SEEDS)
def test_update_without_extras_keeps_density(spec, density, seed):
    gen = torch.Generator().manual_seed(seed)
    model = chain_model(spec, gen)
    mask = sw.SparseMask(model, density=density, seed=seed)
    counts, d = list(mask.counts), mask.density
    for step in range(20):
        mask.update(sw.cosine_death_rate(step, 20))
        assert mask.counts == counts and mask.density == d


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, density=st.floats(0.05, 0.9), growth=st.sampled_from(["random", "gradient"]))
def test_topology_updates_do_not_depend_on_memory_layout(seed, density, growth):
    """Same weights, same seed: channels_last and contiguous models get the same masks, update after update."""
    gen = torch.Generator().manual_seed(seed)
    a = tiny_cnn(gen, c=3, classes=4)
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in b.parameters())
    ma, mb = (sw.SparseMask(m, density=density, seed=seed) for m in (a, b))
    for step in range(10):
        with torch.no_grad():
            for pa, pb in zip(a.parameters(), b.parameters()):
                new = torch.randn(pa.shape, generator=gen).round(decimals=1)  # rounding: many ties
                pa.copy_(new)
                pb.copy_(new)
                pa.grad = torch.randn(pa.shape, generator=gen).round(decimals=1)
                pb.grad = torch.empty_like(pb).copy_(pa.grad)
        ma.update(0.3, growth=growth)
        mb.update(0.3, growth=growth)
        for n in ma.names:
            assert torch.equal(ma.masks[n], mb.masks[n]), (step, n)
            assert torch.equal(ma.ever_active[n], mb.ever_active[n])
        assert ma.counts == mb.counts


def sort_update(mask: sw.SparseMask, death_rate: float, growth: str, generator=None):
    """The straightforward topology update: sort every layer's full |w| and growth scores.

    The reference that SparseMask.update must match (on tie-free data); the benchmarks below time both
    and report the ratio (README), without asserting it: a timing on a shared machine is no test. Returns
    {name: (mask after, the active weights kept by pruning)}.
    """
    out = {}
    for i, name in enumerate(mask.names):
        p, m = mask.params[name], mask.masks[name].reshape(-1).clone()
        nnz, size = mask.counts[i], mask.sizes[i]
        k = math.ceil(death_rate * nnz)
        if nnz < size and k > 0:  # a full layer is left alone
            m[p.detach().abs().reshape(-1).masked_fill(~m, math.inf).sort().indices[:k]] = False
            kept = m.clone()
            score = p.grad.abs().reshape(-1) if growth == "gradient" else torch.rand(size, generator=generator)
            m[score.masked_fill(m, -math.inf).sort(descending=True).indices[:k]] = True  # the just-pruned too
        else:
            kept = m.clone()
        out[name] = m.view(p.shape), kept.view(p.shape)
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
        after, kept = ref[n]
        if growth == "gradient":  # deterministic: identical masks
            assert torch.equal(mask.masks[n], after), n
        else:  # random growth: the same weights kept, and the same counts
            assert torch.equal(mask.masks[n] & kept, kept) and torch.equal(before[n] & kept, kept), n
            assert not torch.equal(kept, before[n]) and int(mask.masks[n].sum()) == int(after.sum())


# ----------------------------------------------------------------------------- 7. masks: state round trip

def _roundtrip_setup(seed):
    gen = torch.Generator().manual_seed(seed)
    spec = (2, [(3, 3)], [5])
    model = chain_model(spec, gen)
    mask = sw.SparseMask(model, density=0.3, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for p in (0.5, 0.3):
        sgd_step(model, opt, gen, spec[0])
        mask.step(opt)
        mask.update(p)
    sgd_step(model, opt, gen, spec[0])
    mask.step(opt)
    model2 = chain_model(spec, torch.Generator().manual_seed(seed + 7))
    mask2 = sw.SparseMask(model2, density=0.3, seed=seed + 7)  # different masks and RNG state
    model2.load_state_dict(model.state_dict())  # resume order of train(): model, then mask
    return model, mask, model2, mask2


@settings(max_examples=8, deadline=None)
@given(seed=SEEDS)
def test_mask_state_dict_round_trip_through_bytes(seed):
    model, mask, model2, mask2 = _roundtrip_setup(seed)
    buf = io.BytesIO()
    torch.save(mask.state_dict(), buf)
    buf.seek(0)
    mask2.load_state_dict(torch.load(buf))
    assert mask2.counts == mask.counts and mask2.steps == mask.steps
    for _ in range(3):  # the same random regrowth follows: the RNG state was carried
        mask.update(0.4)
        mask2.update(0.4)
        assert all(torch.equal(mask.masks[n], mask2.masks[n]) for n in mask.names)
        assert all(torch.equal(mask.ever_active[n], mask2.ever_active[n]) for n in mask.names)
    assert mask2.itop_rate() == mask.itop_rate()


def test_mask_state_dict_round_trip_in_memory_is_independent():
    """A mask loaded from a live mask's state_dict() must not share storage with it."""
    model, mask, model2, mask2 = _roundtrip_setup(3)
    mask2.load_state_dict(mask.state_dict())
    mask.update(0.4)
    after = {n: m.clone() for n, m in mask.masks.items()}
    mask2.update(0.4)
    assert all(torch.equal(mask.masks[n], after[n]) for n in mask.names)  # mask2 left mask alone
    assert all(torch.equal(mask2.masks[n], after[n]) for n in mask.names)


def test_mask_load_state_dict_rejects_other_model():
    a = sw.SparseMask(nn.Sequential(nn.Linear(4, 4)), density=0.5)
    b = sw.SparseMask(nn.Sequential(nn.Linear(4, 5)), density=0.5)
    with pytest.raises(sw.SparseWinError):
        b.load_state_dict(a.state_dict())


def test_mask_from_given_masks_is_a_copy():
    model = nn.Sequential(nn.Linear(6, 6))
    given_mask = {"0.weight": torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5}
    keep = given_mask["0.weight"].clone()
    mask = sw.SparseMask(model, masks=given_mask)
    assert torch.equal(mask.masks["0.weight"], keep)
    assert mask.counts == [int(keep.sum())]
    with torch.no_grad():
        model[0].weight.add_(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    mask.update(0.5)
    assert torch.equal(given_mask["0.weight"], keep)


# ----------------------------------------------------------------------------- 8. methods: what every method answers

@pytest.mark.parametrize("make", [lambda: sw.Dense(), lambda: sw.RobustBird(density=0.3, max_epochs=1),
                                  lambda: sw.FlyingBird(density=0.3, seed=1),
                                  lambda: sw.FlyingBirdPlus(start_epoch=0, density=0.3, seed=1)],
                         ids=["dense", "robust-bird", "flying-bird", "flying-bird-plus"])
def test_every_method_answers_density_and_flops(make):
    """Density, ITOP rate, per-layer counts and forward FLOPs of the model as it is, asked of the method
    (never whether it has a mask): dense answers 1.0, every weight and the dense count."""
    model = tiny_cnn(torch.Generator().manual_seed(0))
    per_weight, constant = sw.model_flops(model, (3, 8, 8))
    sizes = {n: p.numel() for n, p in sw.prunable(model).items()}
    dense = sw.forward_flops(per_weight, sizes, constant)
    method = make()
    assert isinstance(method, sw.Method)
    method.start(model, total_steps=4, epochs=2)
    if method.pretraining:  # Robust Bird is dense until it adopts its ticket (max_epochs 1: after one epoch)
        assert (method.density, method.itop_rate(), method.layer_counts()) == (1.0, 1.0, sizes)
        assert method.forward_flops(per_weight, constant) == dense and method.pretrain_epochs == 0
        assert method.end_pretrain_epoch(model, 0.0, 0.0, log=lambda *a: None) and method.pretrain_epochs == 1
    if isinstance(method, sw.Dense):
        assert (method.density, method.itop_rate(), method.layer_counts()) == (1.0, 1.0, sizes)
        assert method.forward_flops(per_weight, constant) == dense and method.mask is None
    else:
        counts = method.mask.layer_counts()
        assert method.layer_counts() == counts and method.itop_rate() == method.mask.itop_rate()
        assert method.density == sum(counts.values()) / sum(sizes.values()) == pytest.approx(0.3, abs=0.01)
        assert method.forward_flops(per_weight, constant) == sw.forward_flops(per_weight, counts, constant) < dense


def test_names_are_checked_and_methods_used_before_start_say_so():
    """A misspelled name is a ValueError naming the choices (never a silent fallback); a method used before
    start() says to call it."""
    model, x, y = linear_problem(4, 3, 2, 0)
    for make, words in ((lambda: sw.FlyingBird(growth="gradiant"), "unknown growth 'gradiant'; choose from random, "
                         "gradient"), (lambda: sw.FlyingBirdPlus(start_epoch=0, allocation="igg"), "unknown allocation"),
                        (lambda: sw.EarlyBird(density=0.5, kind="chanel"), "unknown ticket 'chanel'"),
                        (lambda: sw.build_model("resnet19"), "unknown arch 'resnet19'"),
                        (lambda: sw.pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, norm="l3"), "unknown norm 'l3'"),
                        (lambda: sw.perturb(model, x, y, kind="fgsm", eps=0.1, alpha=0.1, steps=1), "unknown attack"),
                        (lambda: sw.layer_densities([(4, 4)], 0.5, "ERK"), "unknown allocation 'ERK'"),
                        (lambda: sw.adversarial_step(model, x, y, None, eps=0.1, alpha=0.1, steps=1, loss="mart"),
                         "unknown loss 'mart'; choose from ce, trades")):
        with pytest.raises(ValueError, match=words):
            make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for method in (sw.Dense(), sw.RobustBird(density=0.5), sw.FlyingBird(), sw.FlyingBirdPlus(start_epoch=0)):
        with pytest.raises(sw.SparseWinError, match=re.escape(f"{method.name}: call start(model, total_steps=, epochs=)")):
            method.after_step(opt, 0)


@pytest.mark.parametrize("interval, late, warns", [(20, 30, False), (21, 40, False), (21, 41, True),
                                                   (900, 1200, True)])
def test_flying_bird_warns_when_no_topology_update_would_happen(interval, late, warns):
    """40 steps in 2 epochs: T = interval for steps 1-20, T = late for 21-40 (as after_step switches); a run
    that no update would reach warns at start() and carries on (the mask stays as drawn)."""
    model = tiny_cnn(torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fb = sw.FlyingBird(interval=interval, interval_late=late)
        fb.start(model, total_steps=40, epochs=2)
    assert [str(w.message) for w in caught] == ([f"Flying Bird: no topology update in 40 steps (T = {interval}, "
                                                 f"then {late}): the mask stays as drawn; choose shorter intervals"]
                                                if warns else [])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    updates = [s for s in range(40) if fb.after_step(opt, s // 20) is not None]
    assert bool(updates) != warns


# ----------------------------------------------------------------------------- 9. Robust Bird: the early-bird ticket

@settings(max_examples=30, deadline=None)
@given(shapes=layer_shapes(3), seed=SEEDS, p=st.floats(0, 1))
def test_mask_distance(shapes, seed, p):
    gen = torch.Generator().manual_seed(seed)
    a = {str(i): torch.rand(s, generator=gen) < 0.5 for i, s in enumerate(shapes)}
    flip = {str(i): torch.rand(s, generator=gen) < p for i, s in enumerate(shapes)}
    b = {n: a[n] ^ flip[n] for n in a}
    total = sum(math.prod(s) for s in shapes)
    diff = sum(int(f.sum()) for f in flip.values())
    assert sw.mask_distance(a, b) == sw.mask_distance(b, a) == diff / total
    assert (sw.mask_distance(a, b) == 0) == all(torch.equal(a[n], b[n]) for n in a)
    assert sw.mask_distance(a, a) == 0


@settings(max_examples=30, deadline=None)
@given(shapes=layer_shapes(3), seed=SEEDS, density=DENSITIES)
def test_magnitude_mask_global_topk(shapes, seed, density):
    gen = torch.Generator().manual_seed(seed)
    w = {str(i): torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)}  # layers differ in scale
    m = sw.magnitude_mask(w, density)
    total = sum(math.prod(s) for s in shapes)
    assert list(m) == list(w)
    assert all(m[n].dtype == torch.bool and m[n].shape == w[n].shape for n in w)
    k = round(density * total)
    assert sum(int(x.sum()) for x in m.values()) == k
    flat = torch.cat([w[n].flatten() for n in w]).tolist()
    chosen = torch.cat([m[n].flatten() for n in w]).nonzero().view(-1).tolist()
    assert_chosen(flat, range(total), chosen, k, largest=True)


def test_ticket_masks_are_shaped_like_weights_and_adoptable():
    """Robust Bird adopts the ticket with SparseMask(net, masks=early.ticket(net))."""
    gen = torch.Generator().manual_seed(0)
    model = conv_net(gen)
    ticket = sw.EarlyBird(density=0.3).ticket(model)
    params = sw.prunable(model)
    assert all(ticket[n].shape == params[n].shape for n in params)
    mask = sw.SparseMask(model, masks=ticket)
    assert mask.counts == [int(ticket[n].sum()) for n in params]
    assert all(torch.equal(params[n].detach()[~ticket[n]], torch.zeros_like(params[n][~ticket[n]])) for n in params)


def conv_net(gen):
    return fill_(nn.Sequential(nn.Conv2d(2, 6, 3), nn.Conv2d(6, 8, 3), nn.Flatten(), nn.Linear(8, 3)), gen)


def test_early_bird_fires_when_masks_settle():
    gen = torch.Generator().manual_seed(0)
    model = conv_net(gen)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    eb = sw.EarlyBird(density=0.3, queue=5, threshold=0.08)
    fired = []
    for epoch in range(12):
        with torch.no_grad():
            for n, p in model.named_parameters():  # noise that shrinks each epoch: the mask settles
                p.copy_(base[n] + torch.randn(p.shape, generator=gen) * 0.5 ** epoch)
        fired.append(eb.record(model))
        # distance = max over the older queued masks, as computed by mask_distance
        assert eb.distances[-1] == (max(sw.mask_distance(eb.masks[-1], m) for m in eb.masks[:-1])
                                    if len(eb.masks) > 1 else 1.0)
    assert len(eb.masks) == 5 and set(eb.masks[-1]) == {"0.weight", "1.weight"}  # conv weights only
    # the rule itself: fires exactly when the queue is full and the newest mask is within 0.08 of every
    # older one; here the queue fills while the masks still move (no shortcut through an early full queue)
    assert fired == [i >= 4 and d <= 0.08 for i, d in enumerate(eb.distances)]
    assert fired[-1] and eb.emerged
    first = fired.index(True)
    assert first > 4 and eb.distances[4] > 0.08
    ticket = eb.ticket(model)
    assert set(ticket) == {"0.weight", "1.weight", "3.weight"}  # the ticket covers linear too
    total = sum(p.numel() for p in sw.prunable(model).values())
    assert sum(int(t.sum()) for t in ticket.values()) == round(0.3 * total)


def test_early_bird_needs_a_full_queue():
    model = conv_net(torch.Generator().manual_seed(3))
    eb = sw.EarlyBird(density=0.3, queue=5, threshold=0.08)
    fired = [eb.record(model) for _ in range(6)]  # identical masks every epoch: distance 0
    assert fired == [False] * 4 + [True] * 2
    assert eb.distances == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and len(eb.masks) == 5


def test_early_bird_does_not_fire_when_masks_keep_changing():
    gen = torch.Generator().manual_seed(1)
    model = conv_net(gen)
    eb = sw.EarlyBird(density=0.3, queue=5, threshold=0.08)
    for _ in range(12):
        fill_(model, gen)  # fresh random weights every epoch
        assert not eb.record(model)
    assert min(eb.distances) > 0.08


def test_early_bird_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    model = conv_net(gen)
    eb = sw.EarlyBird(density=0.5, queue=3, threshold=0.3)
    for _ in range(2):
        eb.record(model)
    eb2 = sw.EarlyBird(density=0.5, queue=3, threshold=0.3)
    buf = io.BytesIO()
    torch.save(eb.state_dict(), buf)
    buf.seek(0)
    eb2.load_state_dict(torch.load(buf))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    assert eb.record(model) == eb2.record(model)
    assert eb.distances == eb2.distances and eb.emerged == eb2.emerged
    assert all(torch.equal(a[n], b[n]) for a, b in zip(eb.masks, eb2.masks) for n in a)


def test_robust_bird_masks_weights_and_momentum():
    """Robust Bird adopts the global magnitude ticket, then every step re-masks the weights *and* their
    momentum (the same rule as Flying Bird; the CUDA test checks it on the GPU path)."""
    cfg = sw.parse_args(["--mode", "static", "--sparsity", "0.7", "--eb-queue", "2", "--eb-threshold", "1",
                         "--eb-max-epochs", "5"])
    rb = sw.method_for(cfg)
    assert isinstance(rb, sw.RobustBird) and rb.max_epochs == 5
    assert (rb.early.density, rb.early.queue, rb.early.threshold) == (cfg.density, 2, 1.0)
    gen = torch.Generator().manual_seed(0)
    model = conv_net(gen)
    rb.start(model, total_steps=6, epochs=2)
    quiet = lambda *a, **k: None  # noqa: E731
    assert rb.end_pretrain_epoch(model, 1.0, 50.0, log=quiet) is False and rb.pretraining  # queue not full
    assert rb.end_pretrain_epoch(model, 1.0, 50.0, log=quiet) is True and not rb.pretraining
    params = sw.prunable(model)
    assert sum(rb.mask.counts) == round(cfg.density * sum(p.numel() for p in params.values()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)  # AT: a fresh optimizer
    x = torch.randn(4, 2, 5, 5, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        (model(x) * torch.randn(4, 3, generator=gen)).sum().backward()
        opt.step()
        assert rb.after_step(opt, 0) is None  # a fixed ticket: no topology update
        for n, m in rb.mask.masks.items():
            assert not params[n].detach()[~m].any() and not momentum(opt, params[n])[~m].any(), n
            assert momentum(opt, params[n])[m].any()  # active weights do move
    assert rb.mask.steps == 3


def test_early_bird_records_every_conv_kind():
    """EarlyBird.record masks conv weights of any rank (Conv1d, transposed); linear and attention stay out
    (the models of the FLOPs tests below)."""
    for which, convs in [("signal", {"down.weight", "up.weight"}), ("vit", {"conv_proj.weight"}),
                         ("volume", {"conv.weight", "up.weight", "up2d.weight"})]:
        eb = sw.EarlyBird(density=0.3, queue=2)
        eb.record(FLOP_MODELS[which][0]())
        assert set(eb.masks[-1]) == convs
        assert set(eb.ticket(FLOP_MODELS[which][0]())) == set(FLOP_MODELS[which][2])  # the ticket covers all


# Robust Bird's channel ticket (Early-Bird's kind): BatchNorm channels, network slimming, a thinner network

CHANNEL_ARCHS = {  # small instances of every architecture with channel groups
    "resnet18": dict(width=0.0625), "preact_resnet18": dict(width=0.0625), "vgg16": dict(width=0.0625),
    "wrn": dict(width=0.5, wrn_depth=10, wrn_widen=1)}


def random_bn_net(arch, gen, channels=3):
    """An architecture in eval mode with random weights and random BatchNorm statistics."""
    net = fill_(sw.build_model(arch, in_channels=channels, **CHANNEL_ARCHS[arch]), gen).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def full_forward_flops(model, shape):
    per_weight, unowned = sw.model_flops(model, shape)
    return sw.forward_flops(per_weight, {n: p.numel() for n, p in sw.prunable(model).items()}, unowned)


def test_channel_groups_of_each_architecture():
    """The inner channels of every residual block, every conv of VGG-16; the residual stream stays whole."""
    groups = sw.channel_groups(sw.build_model("resnet18", width=0.0625))
    assert groups == {f"layers.{i}.bn1": (f"layers.{i}.conv1", f"layers.{i}.conv2") for i in range(8)}
    groups = sw.channel_groups(sw.build_model("preact_resnet18", width=0.0625))
    assert groups == {f"layers.{i}.bn2": (f"layers.{i}.conv1", f"layers.{i}.conv2") for i in range(8)}
    convs = [i for i, m in enumerate(sw.build_model("vgg16").features) if isinstance(m, nn.Conv2d)]
    groups = sw.channel_groups(sw.build_model("vgg16", width=0.0625))
    assert len(groups) == 13 and list(groups.values())[-1] == (f"features.{convs[-1]}", "linear")
    assert [groups[f"features.{i + 1}"][1] for i in convs[:-1]] == [f"features.{j}" for j in convs[1:]]


@pytest.mark.parametrize("net", [lambda gen: tiny_cnn(gen, bn=True), lambda gen: conv_net(gen)])
def test_a_model_without_channel_groups_is_refused(net):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(sw.SparseWinError, match="channel ticket"):
        sw.RobustBird(density=0.5, ticket="channel").start(net(gen), total_steps=1, epochs=1)
    with pytest.raises(sw.SparseWinError, match="unknown ticket"):
        sw.RobustBird(density=0.5, ticket="filters")


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(sorted(CHANNEL_ARCHS)), seed=st.integers(0, 2**16), frac=st.floats(0.0, 1.0))
def test_slim_computes_what_the_network_with_zeroed_channels_computes(arch, seed, frac):
    gen = torch.Generator().manual_seed(seed)
    net = random_bn_net(arch, gen)
    before = copy.deepcopy(net.state_dict())
    keep = {}
    for n, g in sw.bn_gammas(net).items():
        m = torch.rand(g.numel(), generator=gen) < frac
        m[torch.randint(g.numel(), (1,), generator=gen)] = True  # at least one channel per group
        keep[n] = m
    thin = sw.slim(net, keep)
    zeroed, mods = copy.deepcopy(net), dict(net.named_modules())
    with torch.no_grad():
        for n, m in keep.items():  # the pruned channels' BN scale and shift to zero: ReLU(0) feeds nothing on
            dict(zeroed.named_modules())[n].weight[~m] = 0
            dict(zeroed.named_modules())[n].bias[~m] = 0
    x = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():  # loosened: random BN statistics give VGG-16 logits near 3e7, where float32's summation
        ref = zeroed(x)  # order alone moved one by 2e-4 of its size (seed 10, frac 0.6875); a wrong channel moves it all
        torch.testing.assert_close(thin(x), ref, rtol=1e-3, atol=1e-5 * max(1.0, float(ref.abs().max())))
    groups, thin_mods = sw.channel_groups(net), dict(thin.named_modules())
    outputs, inputs = ({groups[n][i]: m for n, m in keep.items()} for i in (0, 1))
    for name in outputs.keys() | inputs.keys():  # the surviving weights, kept (a VGG conv loses both kinds)
        w = mods[name].weight
        w = w[outputs[name]] if name in outputs else w
        assert torch.equal(thin_mods[name].weight, w[:, inputs[name]] if name in inputs else w), name
    for n, m in keep.items():  # physically smaller: producer outputs, BN, consumer inputs
        k, (producer, consumer) = int(m.sum()), groups[n]
        assert thin_mods[producer].weight.shape[0] == thin_mods[n].weight.numel() == thin_mods[n].running_var.numel() == k
        assert thin_mods[consumer].weight.shape[1] == k
        assert torch.equal(thin_mods[n].running_mean, mods[n].running_mean[m])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model itself is untouched
    # a checkpoint's thin architecture (channel counts) takes the thin weights exactly
    rebuilt = sw.slim(random_bn_net(arch, gen), {n: int(m.sum()) for n, m in keep.items()})
    rebuilt.load_state_dict(thin.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), thin(x))


def test_slim_refuses_an_empty_group():
    net = sw.build_model("resnet18", width=0.0625)
    with pytest.raises(sw.SparseWinError, match="layers.0.bn1: keep 1 to 4 channels, got 0"):
        sw.slim(net, {"layers.0.bn1": torch.zeros(4, dtype=torch.bool)})


def channel_mask_ref(gammas, density):
    """Per element: each group's largest |gamma| first, then the largest of the rest, one by one."""
    items = [(abs(float(v)), n, i) for n, g in gammas.items() for i, v in enumerate(g)]
    kept = {(n, max(range(g.numel()), key=lambda i: abs(float(g[i])))) for n, g in gammas.items()}
    rest = sorted((x for x in items if (x[1], x[2]) not in kept), reverse=True)
    total = max(round(density * len(items)), len(gammas))
    return kept, {(n, i) for _, n, i in rest[:total - len(kept)]}


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_channel_mask_keeps_the_largest_and_one_per_group(sizes, density, seed):
    gen = torch.Generator().manual_seed(seed)
    gammas = {f"bn{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}  # distinct: no ties
    mask = sw.channel_mask(gammas, density)
    assert {n: m.shape for n, m in mask.items()} == {n: g.shape for n, g in gammas.items()}
    assert sum(int(m.sum()) for m in mask.values()) == max(round(density * sum(sizes)), len(sizes))  # exact
    assert all(m.any() for m in mask.values())
    reserved, rest = channel_mask_ref(gammas, density)
    assert {(n, int(i)) for n, m in mask.items() for i in m.nonzero().flatten()} == reserved | rest


def test_channel_early_bird_on_hand_made_gammas():
    """Channel masks of hand-set BatchNorm scales: the distance is the fraction of channels that differ,
    and the early bird emerges when the newest mask is within 0.1 of every older one in the queue."""
    net = sw.build_model("resnet18", width=0.0625)  # 8 groups: 4+4+8+8+16+16+32+32 = 120 channels
    gammas = sw.bn_gammas(net)
    n = sum(g.numel() for g in gammas.values())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()

    def set_(values):
        with torch.no_grad():
            for g, v in zip(gammas.values(), values.split([g.numel() for g in gammas.values()])):
                g.copy_(v)
    eb = sw.EarlyBird(density=0.5, queue=3, threshold=0.1, kind="channel")
    assert eb.threshold == 0.1 and sw.EB_THRESHOLD == {"unstructured": 0.08, "channel": 0.1}
    epochs = [order, order.flip(0), order.flip(0) * 2]  # the third ranks channels as the second does
    swapped = order.flip(0) * 2
    lo, hi = swapped.argsort(descending=True)[59:61].tolist()  # the 60th and 61st largest trade places
    swapped[[lo, hi]] = swapped[[hi, lo]]
    epochs.append(swapped)
    fired = []
    for values in epochs:
        set_(values)
        fired.append(eb.record(net))
    masks = [sw.channel_mask({k: v for k, v in zip(gammas, e.split([g.numel() for g in gammas.values()]))}, 0.5)
             for e in epochs]
    assert all(sum(int(m.sum()) for m in mk.values()) == 60 for mk in masks)
    d = lambda a, b: sw.mask_distance(masks[a], masks[b])  # noqa: E731
    assert d(1, 0) > 0.4 and d(2, 1) == 0 and d(3, 2) == 2 / 120
    assert eb.distances == [1.0, d(1, 0), max(d(2, 0), d(2, 1)), max(d(3, 1), d(3, 2))]
    assert fired == [False, False, False, True]  # epoch 3: the queue still holds epoch 1's far mask
    assert all(torch.equal(eb.ticket(net)[k], masks[3][k]) for k in gammas)


def test_bn_l1_subgradient_in_stage_one_only():
    """Network slimming: in stage 1 the channel groups' BN scales get bn_l1 * sign(gamma) added to their
    gradient; nothing else does, and nothing at all once the ticket is adopted."""
    gen = torch.Generator().manual_seed(0)
    net = random_bn_net("resnet18", gen).train()
    rb = sw.RobustBird(density=0.5, ticket="channel", bn_l1=0.01, queue=2, threshold=1.0)
    rb.start(net, total_steps=1, epochs=1)
    groups = sw.bn_gammas(net)
    with torch.no_grad():
        groups["layers.0.bn1"][0] = 0.0  # sign(0) = 0: no push
    net(torch.rand(4, 3, 16, 16, generator=gen)).sum().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    rb.before_update()
    for n, p in net.named_parameters():
        bn = n.removesuffix(".weight")
        extra = 0.01 * torch.sign(p.detach()) if bn in groups and n.endswith(".weight") else 0
        torch.testing.assert_close(p.grad, before[n] + extra, rtol=0, atol=0)
    assert groups["layers.0.bn1"].grad[0] == before["layers.0.bn1.weight"][0]
    quiet = lambda *a, **k: None  # noqa: E731
    assert not rb.end_pretrain_epoch(net, 1.0, 1.0, quiet) and rb.end_pretrain_epoch(net, 1.0, 1.0, quiet)
    rb.model.zero_grad()
    rb.model(torch.rand(4, 3, 16, 16, generator=gen)).sum().backward()
    grads = {n: p.grad.clone() for n, p in rb.model.named_parameters()}
    rb.before_update()  # AT: no penalty
    assert all(torch.equal(p.grad, grads[n]) for n, p in rb.model.named_parameters())


def test_robust_bird_channel_ticket_adopts_a_thinner_network():
    gen = torch.Generator().manual_seed(1)
    net = random_bn_net("vgg16", gen)
    full = sum(p.numel() for p in sw.prunable(net).values())
    rb = sw.RobustBird(density=0.25, ticket="channel", queue=2, threshold=1.0)
    assert rb.early.threshold == 1.0 and sw.RobustBird(density=0.25, ticket="channel").early.threshold == 0.1
    rb.start(net, total_steps=1, epochs=1)
    quiet = lambda *a, **k: None  # noqa: E731
    assert not rb.end_pretrain_epoch(net, 1.0, 1.0, quiet) and rb.end_pretrain_epoch(net, 1.0, 1.0, quiet)
    keep = sw.channel_mask(sw.bn_gammas(net), 0.25)
    assert rb.channels == {n: int(m.sum()) for n, m in keep.items()} and rb.mask is None
    assert sum(rb.channels.values()) == round(0.25 * sum(m.numel() for m in keep.values()))
    assert rb.model is not net and sum(p.numel() for p in sw.prunable(net).values()) == full  # net untouched
    thin = sum(p.numel() for p in sw.prunable(rb.model).values())
    assert rb.density == rb.itop_rate() == thin / full < 0.25  # VGG: inputs and outputs both thinned
    assert rb.layer_counts() == {n: p.numel() for n, p in sw.prunable(rb.model).items()}
    x = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(rb.model(x), sw.slim(net, keep)(x))
    assert rb.state_dict()["channels"] == rb.channels


def test_early_bird_rule_at_its_boundary():
    """As released: a mask distance exactly equal to the threshold counts as settled."""
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}  # distance 2 / 4
    for threshold, emerged in ((0.5, True), (0.49, False)):
        eb, masks = sw.EarlyBird(density=0.5, queue=2, threshold=threshold), [a, b]
        eb.current = lambda model: masks.pop(0)
        assert [eb.record(None), eb.record(None)] == [False, emerged] and eb.distances == [1.0, 0.5]


# ----------------------------------------------------------------------------- 10. Flying Bird: the cosine death rate

@settings(max_examples=30, deadline=None)
@given(total=st.integers(2, 5000))
def test_cosine_death_rate(total):
    vals = [sw.cosine_death_rate(s, total, 0.5, 0.005) for s in range(0, total + 1, max(1, total // 200))]
    assert sw.cosine_death_rate(0, total, 0.5, 0.005) == 0.5
    torch.testing.assert_close(sw.cosine_death_rate(total, total, 0.5, 0.005), 0.005, rtol=0, atol=1e-15)
    assert all(b <= a for a, b in zip(vals, vals[1:]))
    assert sw.cosine_death_rate(total + 10, total, 0.5, 0.005) == sw.cosine_death_rate(total, total, 0.5, 0.005)
    if total % 2 == 0:
        torch.testing.assert_close(sw.cosine_death_rate(total // 2, total, 0.5, 0.005), (0.5 + 0.005) / 2,
                                   rtol=0, atol=1e-15)
    # closed form at a quarter: final + (init - final)(1 + cos(pi/4))/2
    if total % 4 == 0:
        torch.testing.assert_close(sw.cosine_death_rate(total // 4, total, 0.5, 0.005),
                                   0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2, rtol=0, atol=1e-15)


def test_flying_bird_death_rate_and_intervals_from_the_config():
    """Flying Bird as the CLI builds it: T from --update-interval before half of training and from
    --update-interval-late after, p on the cosine from --death-rate to --death-rate-final, ceil(p * nnz)
    pruned and as many regrown per layer."""
    cfg = sw.parse_args(["--mode", "dynamic", "--epochs", "2", "--sparsity", "0.5", "--allocation", "uniform",
                         "--death-rate", "0.3", "--death-rate-final", "0.1", "--update-interval", "2",
                         "--update-interval-late", "3"])
    method = sw.method_for(cfg)
    gen = torch.Generator().manual_seed(1)
    model = chain_model((2, [(4, 3)], [6]), gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.start(model, total_steps=8, epochs=2)  # 4 steps per epoch
    records = []
    for step in range(8):
        sgd_step(model, opt, gen, 2)
        counts = list(method.mask.counts)
        if (r := method.after_step(opt, step // 4)) is not None:
            records.append((r, counts))
    assert [r["step"] for r, _ in records] == [2, 4, 6]  # T = 2 in epoch 0, T = 3 in epoch 1
    for r, counts in records:
        assert r["death_rate"] == sw.cosine_death_rate(r["step"], 8, 0.3, 0.1)
        assert r["pruned"] == r["grown"] == sum(math.ceil(r["death_rate"] * c) for c in counts)


# ----------------------------------------------------------------------------- 11. Flying Bird+: the adaptive rule

def test_fbplus_decision_hand_made():
    flat = [0.0] * 5
    assert sw.fbplus_decision([0, 1, 2, 1, 0], [5, 4, 3, 2, 1]) == (True, False)  # 2 rises of 4
    assert sw.fbplus_decision([0, 1, 1, 1, 0], [5, 4, 3, 2, 1]) == (False, False)  # ties are not rises
    assert sw.fbplus_decision([3, 2, 1, 0, -1], [5, 5, 5, 4, 3]) == (False, True)  # ties are non-decreases
    assert sw.fbplus_decision([3, 2, 1, 0, -1], [5, 4, 4, 3, 2]) == (False, False)  # 1 of 4
    assert sw.fbplus_decision(flat, flat) == (False, True)
    assert sw.fbplus_decision([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]) == (True, True)
    assert sw.fbplus_decision([0, 1, 2, 3], [1, 2, 3, 4]) == (False, False)  # too short
    assert sw.fbplus_decision([], []) == (False, False)
    # only the last 5 values count: the earlier rise (-100 -> 0) and stall are ignored
    assert sw.fbplus_decision([100, -100, 0, 1, 0, -1, -2], [0, 9, 9, 5, 4, 3, 2]) == (False, False)
    assert sw.fbplus_decision([0, 1, 0, 1, 0, -1, -2][:5], [0, 1, 2, 1, 0]) == (True, True)


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(-3, 3), max_size=9), losses=st.lists(st.integers(-3, 3), max_size=9))
def test_fbplus_decision_matches_reference(gaps, losses):
    def ref(h, rising):
        if len(h) < 5:
            return False
        t = h[-5:]
        return sum((t[j + 1] > t[j]) if rising else not (t[j + 1] < t[j]) for j in range(4)) >= 2
    got = sw.fbplus_decision([float(g) for g in gaps], [float(x) for x in losses], window=4, threshold=0.5)
    assert got == (ref(gaps, True), ref(losses, False))


def test_flying_bird_plus_decide_and_events():
    fb = sw.FlyingBirdPlus(start_epoch=5)
    for g, loss in zip([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]):
        fb.record(g, loss)
    assert fb.decide(epoch=4, step=10) == dict(extra_prune=0.0, extra_growth=0.0)  # before start
    assert fb.events == []
    assert fb.decide(epoch=5, step=20) == dict(extra_prune=0.4, extra_growth=0.05)
    assert fb.events == [dict(epoch=5, step=20, prune=True, grow=True)]
    fb.record(3, 4)
    fb.record(2, 3)  # gaps 2,3,4,3,2 -> 2 rises; losses 3,4,5,4,3 -> 2 non-decreases
    fb.record(1, 2)  # gaps 3,4,3,2,1 -> 1 rise; losses 4,5,4,3,2 -> 1 non-decrease
    assert fb.decide(epoch=6, step=30) == dict(extra_prune=0.0, extra_growth=0.0)
    assert len(fb.events) == 1
    fb2 = sw.FlyingBirdPlus(start_epoch=5)
    fb2.load_state_dict(fb.state_dict())
    assert (fb2.gaps, fb2.losses, fb2.events) == (fb.gaps, fb.losses, fb.events)


# Hand-made epochs (train RA, val RA, val clean loss, val adversarial loss) for which each half of the FB+
# rule decides differently from its plausible misreadings: the gap train RA - val RA widens in 3 of the
# last 4 differences (val RA - train RA in 1 of 4), and the clean loss moves against the adversarial one.
GAP_WIDENS = [(50, 40, 1.0, 2.0), (52, 37, 1.1, 1.9), (55, 35, 1.2, 1.8), (56, 38, 1.3, 1.7), (58, 33, 1.4, 1.6)]
GAP_NARROWS = [(50, 10, 2.0, 1.0), (50, 20, 1.9, 1.1), (51, 30, 1.8, 1.2), (52, 40, 1.7, 1.3), (53, 50, 1.6, 1.4)]


@pytest.mark.parametrize("history, prune, grow", [(GAP_WIDENS, True, False), (GAP_NARROWS, False, True)])
def test_fbplus_end_epoch_to_update_with_paper_defaults(history, prune, grow):
    """Flying Bird+ as the CLI builds it with the paper's constants (window 4, threshold 0.5, extra prune
    0.4, extra growth 0.05, adaptive from half of training), fed hand-made epochs through end_epoch: the
    next topology update prunes extra when gap = train RA - val RA widened and grows extra when the val
    *adversarial* loss stalled, and neither before the start epoch."""
    assert sw.fbplus_decision([t - v for t, v, _, _ in history], [a for *_, a in history]) == (prune, grow)
    assert sw.fbplus_decision([v - t for t, v, _, _ in history], [c for _, _, c, _ in history]) == (grow, prune)
    cfg = sw.parse_args(["--mode", "dynamic+", "--epochs", "10", "--sparsity", "0.5", "--allocation", "uniform",
                         "--update-interval", "1", "--update-interval-late", "1"])
    method = sw.method_for(cfg)
    assert isinstance(method, sw.FlyingBirdPlus)
    assert (method.start_epoch, method.window, method.threshold, method.prune_ratio, method.growth_ratio) == (
        5, 4, 0.5, 0.4, 0.05)
    assert sw.method_for(dataclasses.replace(cfg, fbplus_start=0)).start_epoch == 0  # 0 is a start, not "unset"
    gen = torch.Generator().manual_seed(0)
    model = chain_model((2, [(4, 3)], [6]), gen)  # a conv (72 weights) and a linear (864), half of each active
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.start(model, total_steps=10, epochs=10)
    for train_ra, val_ra, loss, adv_loss in history:  # epochs 0-4
        method.end_epoch(train_ra, dict(sa=90.0, ra=val_ra, loss=loss, adv_loss=adv_loss))
    assert method.gaps == [t - v for t, v, _, _ in history] and method.losses == [a for *_, a in history]
    records = []
    for epoch in (4, 5):  # one step (and topology update, T = 1) in epoch 4, before the start, and one in 5
        sgd_step(model, opt, gen, 2)
        records.append(method.after_step(opt, epoch))
    before, after = records
    assert (before["extra_prune"], before["extra_growth"]) == (0.0, 0.0) and before["pruned"] == before["grown"]
    assert (after["extra_prune"], after["extra_growth"]) == (0.4 if prune else 0.0, 0.05 if grow else 0.0)
    assert (after["pruned"] > after["grown"]) == prune and (after["grown"] > after["pruned"]) == grow
    assert (after["density"] < 0.5) == prune and (after["density"] > 0.5) == grow
    assert method.events == [dict(epoch=5, step=2, prune=prune, grow=grow)]


# ----------------------------------------------------------------------------- 11b. regularizers: TRADES, AWP, weight averaging

@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 8), k=st.integers(2, 5), b=st.integers(1, 6), seed=st.integers(0, 2**16),
       beta=st.floats(0.0, 10.0))
def test_trades_loss_closed_form_linear(d, k, b, seed, beta):
    """CE(f(x), y) + beta * (1/B) sum_i sum_c p_c (log p_c - log q_c), p = softmax f(x), q = softmax f(x')."""
    model, x, y = linear_problem(d, k, b, seed)
    x_adv = (x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)).clamp(0, 1)
    loss, adv_logits = sw.trades_loss(model, x, x_adv, y, beta=beta)
    W, c = model.weight.detach(), model.bias.detach()
    p, q = torch.softmax(x @ W.T + c, 1), torch.softmax(x_adv @ W.T + c, 1)
    ce = -torch.log(p[torch.arange(b), y]).mean()
    kl = (p * (p.log() - q.log())).sum() / b
    torch.testing.assert_close(loss.detach(), ce + beta * kl)
    torch.testing.assert_close(adv_logits.detach(), x_adv @ W.T + c)
    loss.backward()  # gradients reach the weights through both terms (the clean distribution is not detached)
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def trades_attack_ref(model, x, *, eps, alpha, steps, noise):
    """The reference code's loop, one step at a time: x' = x + 0.001 noise; step along sign(d KL / dx'),
    clip to the eps-ball and [0, 1]; KL of softmax f(x) (recomputed, constant in x') to softmax f(x')."""
    adv = x + 0.001 * noise
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(adv), 1), F.softmax(model(x), 1).detach(), reduction="sum")
        g, = torch.autograd.grad(kl, adv)
        adv = torch.min(torch.max(adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return adv


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 8), k=st.integers(2, 5), b=st.integers(1, 6), seed=st.integers(0, 2**16),
       steps=st.integers(0, 5), eps=st.sampled_from([0.03, 0.1, 0.3]))
def test_trades_attack_equals_the_reference_loop(d, k, b, seed, steps, eps):
    model, x, _ = linear_problem(d, k, b, seed)
    gen = torch.Generator().manual_seed(seed)
    adv = sw.trades_attack(model, x, eps=eps, alpha=eps / 4, steps=steps, generator=gen)
    noise = torch.empty(x.shape, dtype=x.dtype).normal_(generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(adv, trades_attack_ref(model, x, eps=eps, alpha=eps / 4, steps=steps, noise=noise),
                               rtol=0, atol=1e-12)  # float64: the same operations
    if steps:
        assert ((adv - x).abs().max() <= eps + 1e-12) and adv.min() >= 0 and adv.max() <= 1
        kl = lambda a: F.kl_div(F.log_softmax(model(a), 1), F.softmax(model(x), 1), reduction="sum")  # noqa: E731
        assert kl(adv) >= kl(x + 0.001 * noise) - 1e-12  # the attack raises the KL


def awp_ref(model, loss, gamma, masks):
    """AWP as the reference computes it: a proxy copy, one SGD step (lr 0.01) on -loss, the difference
    scaled per layer to gamma * ||w|| (masked: the gradient's pruned entries removed first)."""
    proxy = copy.deepcopy(model)
    params = dict(proxy.named_parameters())
    grads = torch.autograd.grad(-loss(proxy), [params[n] for n in sw.prunable(model)])
    v = {}
    for (n, w), g in zip(sw.prunable(model).items(), grads):
        diff = -0.01 * g * (masks[n] if masks else 1)
        v[n] = gamma * w.detach().norm() / (diff.norm() + 1e-20) * diff
    return v


@settings(max_examples=30, deadline=None)
@given(spec=chain_specs(), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
       gamma=st.sampled_from([0.001, 0.005, 0.05]), masked=st.booleans())
def test_awp_perturbation_masks_norms_and_exact_undo(spec, density, seed, gamma, masked):
    gen = torch.Generator().manual_seed(seed)
    model = chain_model(spec, gen)
    mask = sw.SparseMask(model, density=density, seed=seed) if masked else None
    if mask is not None:
        mask.apply()
    masks = mask.masks if mask is not None else None
    x = torch.randn(4, spec[0], HW, HW, generator=gen)
    r = torch.randn(model(x).shape, generator=gen)
    loss = lambda f: (f(x) * r).sum()  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = sw.awp_perturbation(model, loss, gamma=gamma, masks=masks)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and all(
        p.grad is None for p in model.parameters())  # computing v moves nothing, fills no .grad
    ref = awp_ref(model, loss, gamma, masks)
    weights = sw.prunable(model)
    for n, w in weights.items():
        torch.testing.assert_close(v[n], ref[n], rtol=1e-4, atol=1e-9)  # float32: the proxy's lr cancels
        if masks is not None:
            assert not v[n][~masks[n]].any()  # zero on pruned weights
        if v[n].any():
            torch.testing.assert_close(v[n].norm(), gamma * w.detach().norm(), rtol=1e-4, atol=0)
    with sw.perturbed(model, v):  # inside: w + v; pruned weights stay exactly zero
        for n, w in weights.items():
            torch.testing.assert_close(w.detach(), before[n] + v[n], rtol=0, atol=0)
            if masks is not None:
                assert not w.detach()[~masks[n]].any()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit for bit
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with sw.perturbed(model, v):  # a real step: the gradient at w + v, applied to w, then re-masked
        loss(model).backward()
    opt.step()
    if mask is not None:
        mask.step(opt)
        assert mask.counts == [int(m.sum()) for m in mask.masks.values()]
        assert all(not w.detach()[~masks[n]].any() for n, w in weights.items())


def test_awp_keeps_batchnorm_statistics_and_restores_after_an_error():
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen, bn=True).train()
    x, y = torch.rand(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    v = sw.awp_perturbation(model, lambda f: F.cross_entropy(f(x), y), gamma=0.01)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # the ascent ran on copies
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with sw.perturbed(model, v):
            raise RuntimeError("boom")
    assert all(torch.equal(v_, before[k]) for k, v_ in model.state_dict().items())
    twice = sw.awp_perturbation(model, lambda f: F.cross_entropy(f(x), y), gamma=0.01,
                                reduce=lambda t: t.mul_(2))  # a sum over 2 equal ranks: the same v
    assert all(torch.allclose(twice[n], v[n], rtol=1e-6, atol=0) for n in v)


def test_weight_average_closed_form_and_masks():
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen, bn=True)
    avg = sw.WeightAverage(model, decay=0.9)
    a0 = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    mask = {"0.weight": torch.rand(model[0].weight.shape, generator=gen) < 0.5}
    avg.update(model, mask)
    out = avg.model.state_dict()
    for n, t in model.state_dict().items():
        if n == "1.num_batches_tracked":
            assert out[n] == t  # integer buffers: copied
        elif t.is_floating_point():
            expect = 0.9 * a0[n] + 0.1 * t
            expect = expect * mask[n] if n in mask else expect
            torch.testing.assert_close(out[n], expect)
    assert not out["0.weight"][~mask["0.weight"]].any()  # exactly as sparse as the mask
    assert not any(p.requires_grad for p in avg.model.parameters())
    other = sw.WeightAverage(tiny_cnn(gen, bn=True), decay=0.9)
    other.load_state_dict(avg.state_dict())
    assert all(torch.equal(other.model.state_dict()[k], v) for k, v in out.items())


class NoTruth(nn.Module):
    """A wrapper without a truth value, as torch.compile's module: bool() calls len(), which raises."""

    def __init__(self, m: nn.Module, calls: list):
        super().__init__()
        self.m, self.calls = m, calls

    def forward(self, x):
        self.calls.append(len(x))
        return self.m(x)

    def __len__(self):
        raise TypeError("NoTruth does not support len()")


def test_adversarial_step_runs_the_given_attack_and_update_modules():
    """attack_model / update_model (the program's compiled or DDP forwards) run the attack's forwards and the
    update's; picked with `is None`, so a compiled module (no truth value) works (test_compile_on_cpu, slow)."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen)
    x, y = torch.rand(6, 3, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    attack, update = [], []
    sw.adversarial_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, alpha=0.025, steps=3,
                        generator=gen, attack_model=NoTruth(model, attack), update_model=NoTruth(model, update))
    assert attack == [6, 6, 6] and update == [6]


def test_adversarial_step_stops_a_bad_step_before_it_touches_the_weights():
    """before_backward(loss) runs before backward(): when it raises (the program's non-finite check), the weights,
    their gradients and the optimizer's momentum are as they were."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_cnn(gen, bn=True)
    x, y = torch.rand(6, 3, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = lambda check=None: sw.adversarial_step(model, x, y, opt, eps=0.1, alpha=0.025, steps=2,  # noqa: E731
                                                  generator=gen, before_backward=check)
    step()  # momentum exists
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    grads, seen = {n: p.grad.clone() for n, p in model.named_parameters()}, []

    def refuse(loss):
        seen.append(loss.item())
        raise FloatingPointError("not finite")
    with pytest.raises(FloatingPointError):
        step(refuse)
    assert len(seen) == 1 and all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, weights[n]) and torch.equal(opt.state[p]["momentum_buffer"], momentum[n])
               for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- 12. FLOPs

def flop_counter(model, input_shape):
    """FlopCounterMode over one forward pass. Grad on and the math attention kernel: otherwise eval
    MHA takes a fused path and CPU attention a flash kernel, and FlopCounterMode counts neither."""
    fc = FlopCounterMode(display=False)
    p = next(model.parameters())
    with fc, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, *input_shape, dtype=p.dtype))
    return fc


def check_flops_against_counter(model, input_shape):
    """Dense FLOPs of model_flops agree with FlopCounterMode in total and per layer (an MHA and the
    out_proj it runs itself: FlopCounterMode lumps them with attention; callers check those)."""
    training = model.training
    per_weight, constant = sw.model_flops(model, input_shape)
    assert model.training == training  # model_flops restores the mode
    assert sw.model_flops(model, input_shape)[0] == per_weight
    model.eval()
    params = sw.prunable(model)
    assert list(per_weight) == list(params)
    dense = sw.forward_flops(per_weight, {n: p.numel() for n, p in params.items()}, constant)
    fc = flop_counter(model, input_shape)
    total = fc.get_total_flops()
    assert abs(dense - total) <= 0.01 * total
    counts = fc.get_flop_counts()
    root = type(model).__name__
    mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for n, p in params.items():
        mod = n.rsplit(".", 1)[0]
        if mod not in mha and mod.removesuffix(".out_proj") not in mha:
            assert per_weight[n] * p.numel() == sum(counts[f"{root}.{mod}"].values()), n
    return per_weight, constant, dense


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16", "wrn"])
def test_dense_flops_match_flop_counter(arch):
    model = sw.build_model(arch, width=1.0, wrn_depth=10, wrn_widen=2)
    *_, dense = check_flops_against_counter(model.train(), (3, 32, 32))  # train mode: BN must not break it
    if arch == "resnet18":
        assert abs(dense - 1.1108e9) <= 0.001 * 1.1108e9


class UserNet(nn.Module):
    """Not a known architecture: grouped / strided / dilated convs, a Linear over tokens."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.tok = nn.Linear(6, 5)
        self.head = nn.Linear(5 * 16, 3)

    def forward(self, x):  # x: (B, 2, 8, 8)
        h = F.relu(self.b(F.relu(self.a(x))))  # (B, 6, 4, 4)
        t = self.tok(h.flatten(2).transpose(1, 2))  # (B, 16, 5)
        return self.head(t.flatten(1))


def test_user_model_flops_match_flop_counter():
    per_weight, constant, _ = check_flops_against_counter(UserNet(), (2, 8, 8))
    assert per_weight == {"a.weight": 2 * 16, "b.weight": 2 * 16, "tok.weight": 2 * 16, "head.weight": 2}
    assert constant == 0  # no attention: every FLOP has a weight


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        return self.l(torch.tanh(self.l(x)))  # one weight, used twice per image


def test_model_flops_counts_every_call_of_a_shared_layer():
    model = SharedNet()
    per_weight = sw.model_flops(model, (8,))[0]
    assert sw.forward_flops(per_weight, {"l.weight": 64}) == flop_counter(model, (8,)).get_total_flops()


CONV_KINDS = {False: [nn.Conv1d, nn.Conv2d, nn.Conv3d],
              True: [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]}


@settings(max_examples=30, deadline=None)
@given(dims=st.integers(1, 3), transposed=st.booleans(), cin=st.integers(1, 4), cout_g=st.integers(1, 3),
       groups=st.integers(1, 2), k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dil=st.integers(1, 2), out_pad=st.integers(0, 1), hw=st.integers(3, 7))
def test_conv_flops_closed_form(dims, transposed, cin, cout_g, groups, k, stride, pad, dil, out_pad, hw):
    """A conv weight is used once per output position, a transposed conv weight once per input position."""
    extra = dict(output_padding=out_pad) if transposed else {}
    assume(not transposed and out_pad == 0 or out_pad < max(stride, dil))  # torch's output_padding rule
    out = ((hw - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1 if transposed
           else (hw + 2 * pad - dil * (k - 1) - 1) // stride + 1)
    assume(out >= 1)
    conv = CONV_KINDS[transposed][dims - 1](cin * groups, cout_g * groups, k, stride=stride, padding=pad,
                                            dilation=dil, groups=groups, **extra)
    model, shape = nn.Sequential(conv), (cin * groups, *[hw] * dims)
    per_weight = sw.model_flops(model, shape)[0]
    assert per_weight == {"0.weight": 2 * (hw if transposed else out) ** dims}
    assert per_weight["0.weight"] * conv.weight.numel() == flop_counter(model, shape).get_total_flops()


@settings(max_examples=8, deadline=None)
@given(density=st.floats(0.02, 1.0), alloc=ALLOCS, seed=SEEDS)
def test_sparse_flops_per_layer(density, alloc, seed):
    model = sw.build_model("resnet18", width=0.125)
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    per_weight = sw.model_flops(model, (3, 16, 16))[0]
    counts = mask.layer_counts()
    sparse = sw.forward_flops(per_weight, counts)
    assert sparse == sum(per_weight[n] * int(mask.masks[n].sum()) for n in mask.names)
    dense_l = {n: per_weight[n] * mask.masks[n].numel() for n in mask.names}
    torch.testing.assert_close(float(sparse), sum(counts[n] / mask.masks[n].numel() * dense_l[n] for n in mask.names),
                               rtol=1e-12, atol=0)
    if density == 1.0:
        assert sparse == sum(dense_l.values())


def tiny_vit():
    """torchvision's ViT, tiny: 16 patches + class token, width 16, 2 heads, 2 blocks."""
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10)


class SignalNet(nn.Module):
    """1-D: a strided Conv1d, a grouped ConvTranspose1d back up, a Linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.down = nn.Conv1d(2, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1, groups=2)
        self.head = nn.Linear(4 * 12, classes)

    def forward(self, x):  # x: (B, 2, 12)
        h = torch.tanh(self.down(x))  # (B, 6, 6)
        return self.head(torch.tanh(self.up(h)).flatten(1))  # up: (B, 4, 12)


class VolumeNet(nn.Module):
    """3-D: Conv3d, ConvTranspose3d, ConvTranspose2d over a slice, Linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose3d(4, 2, 2, stride=2)
        self.up2d = nn.ConvTranspose2d(2, 3, 3)
        self.head = nn.Linear(3, classes)

    def forward(self, x):  # x: (B, 2, 4, 4, 4)
        h = torch.tanh(self.up(torch.tanh(self.conv(x))))  # conv: (B, 4, 4, 4, 4), up: (B, 2, 8, 8, 8)
        return self.head(self.up2d(h[:, :, 0]).mean((2, 3)))  # up2d: (B, 3, 10, 10) from an 8 x 8 slice


class TokenNet(nn.Module):
    """A one-block transformer on (B, 1, 28, 28), sequence first (batch_first=False)."""

    def __init__(self, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 7, stride=7)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).permute(2, 0, 1)  # (T=16, B, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(0))


# model, input shape, closed-form per-weight FLOPs (uses x 2), attention FLOPs (no weight owns them)
VIT_T = 4 * 4 + 1  # ViT tokens: patches + class token
VIT_BLOCKS = [f"encoder.layers.encoder_layer_{i}." for i in range(2)]
FLOP_MODELS = {
    "vit": (tiny_vit, (3, 16, 16),
            {"conv_proj.weight": 2 * 16,
             **{b + w: 2 * VIT_T for b in VIT_BLOCKS for w in ("self_attention.in_proj_weight",
                                                              "self_attention.out_proj.weight",
                                                              "mlp.0.weight", "mlp.3.weight")},
             "heads.head.weight": 2},  # the head sees the class token only
            2 * 2 * 2 * 2 * VIT_T * VIT_T * 8),  # 2 blocks x (Q K^T, A V) x 2 FLOPs x 2 heads x T^2 x head_dim 8
    "signal": (SignalNet, (2, 12), {"down.weight": 2 * 6, "up.weight": 2 * 6, "head.weight": 2}, 0),
    "volume": (VolumeNet, (2, 4, 4, 4), {"conv.weight": 2 * 64, "up.weight": 2 * 64, "up2d.weight": 2 * 64,
                                         "head.weight": 2}, 0),
    "token": (TokenNet, (1, 28, 28), {"patch.weight": 2 * 16, "attn.in_proj_weight": 2 * 16,
                                      "attn.out_proj.weight": 2 * 16, "head.weight": 2}, 2 * 2 * 16 * 16 * 8),
}


@pytest.mark.parametrize("which", FLOP_MODELS)
def test_flops_beyond_cnns_match_closed_form_and_flop_counter(which):
    """Every matmul counted, exactly: convs 1-3d and transposed, MHA in_proj, the out_proj MHA runs
    itself, and the attention matmuls as a constant (ViT: 201,152 FLOPs; the old count saw 94,528)."""
    build, shape, expect, attention = FLOP_MODELS[which]
    model = build()
    per_weight, constant, dense = check_flops_against_counter(model, shape)
    assert list(per_weight) == list(expect) and per_weight == expect  # prunable() order: module order
    assert constant == attention
    fc = flop_counter(model, shape)
    assert dense == fc.get_total_flops()  # exact, not just within 1%
    root = type(model).__name__
    for name, m in model.named_modules():  # attention part, per MHA: the closed form, FlopCounterMode's bmm
        if isinstance(m, nn.MultiheadAttention):
            t = {"vit": VIT_T, "token": 16}[which]
            assert fc.get_flop_counts()[f"{root}.{name}"][torch.ops.aten.bmm] == 2 * 2 * t * t * m.embed_dim


class CrossNet(nn.Module):
    """lq query tokens attend to lk key tokens, both made from the input by linears."""

    def __init__(self, e, heads, lq, lk, kdim, batch_first, bias_kv, zero_attn):
        super().__init__()
        self.lq, self.batch_first = lq, batch_first
        self.q, self.k = nn.Linear(1, e), nn.Linear(1, kdim)
        self.attn = nn.MultiheadAttention(e, heads, kdim=kdim, vdim=kdim, batch_first=batch_first,
                                          add_bias_kv=bias_kv, add_zero_attn=zero_attn)

    def forward(self, x):  # x: (B, lq + lk)
        q, k = self.q(x[:, :self.lq, None]), self.k(x[:, self.lq:, None])  # (B, lq, e), (B, lk, kdim)
        if not self.batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # (L, B, E)
        return self.attn(q, key=k, value=k, need_weights=False)[0]  # key by keyword: the hook reads kwargs


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), head_dim=st.integers(1, 4), lq=st.integers(1, 5), lk=st.integers(1, 5),
       separate=st.booleans(), batch_first=st.booleans(), bias_kv=st.booleans(), zero_attn=st.booleans())
def test_attention_flops_closed_form(heads, head_dim, lq, lk, separate, batch_first, bias_kv, zero_attn):
    """Both layouts, packed or separate q/k/v weights (kdim != embed_dim), extra keys from add_bias_kv
    and add_zero_attn: per-weight uses and 2 x 2 x lq x keys x E attention FLOPs, as FlopCounterMode."""
    e = heads * head_dim
    model = CrossNet(e, heads, lq, lk, e + 1 if separate else e, batch_first, bias_kv, zero_attn)
    if not separate and lq != lk:  # packed rows serve queries and keys unevenly: no exact per-weight value
        with pytest.raises(sw.SparseWinError, match="attn.in_proj_weight"):
            sw.model_flops(model, (lq + lk,))
        return
    proj = ({"attn.q_proj_weight": 2 * lq, "attn.k_proj_weight": 2 * lk, "attn.v_proj_weight": 2 * lk} if separate
            else {"attn.in_proj_weight": 2 * lq})
    expect = {"q.weight": 2 * lq, "k.weight": 2 * lk, **proj, "attn.out_proj.weight": 2 * lq}
    per_weight, constant, dense = check_flops_against_counter(model, (lq + lk,))
    assert list(per_weight) == list(expect) and per_weight == expect
    assert constant == 2 * 2 * lq * (lk + bias_kv + zero_attn) * e
    assert dense == flop_counter(model, (lq + lk,)).get_total_flops()


@settings(max_examples=12, deadline=None)
@given(which=st.sampled_from(list(FLOP_MODELS)), density=DENSITIES, alloc=ALLOCS, seed=SEEDS)
def test_sparse_flops_are_weight_part_plus_constant(which, density, alloc, seed):
    """Sparse forward FLOPs = sum of per-weight FLOPs x active weights, + the dense attention constant."""
    build, shape, expect, attention = FLOP_MODELS[which]
    torch.manual_seed(seed)
    model = build()
    dense = sw.model_flops(copy.deepcopy(model), shape)
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    per_weight, constant = sw.model_flops(model, shape)
    assert (per_weight, constant) == dense == (expect, attention)  # masking changes no use count
    sparse = sw.forward_flops(per_weight, mask.layer_counts(), constant)
    assert sparse - constant == sum(per_weight[n] * int(mask.masks[n].sum()) for n in mask.names)
    assert sw.forward_flops(per_weight, mask.layer_counts()) == sparse - constant  # constant defaults to 0


@pytest.mark.parametrize("which", ["vit", "signal", "volume"])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(density=st.floats(0.05, 0.95), alloc=ALLOCS, seed=SEEDS, growth=st.sampled_from(["random", "gradient"]))
def test_sparse_mask_exact_counts_beyond_cnns(which, density, alloc, seed, growth):
    """100 random updates between SGD steps: per-layer counts exact, masked weights zero, MHA included."""
    build, shape, *_ = FLOP_MODELS[which]
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    torch.manual_seed(seed)
    model = build()
    if which == "volume":  # 5-D weights in channels_last_3d: masks must follow any layout
        for m in (model.conv, model.up):  # Module.to(memory_format=) would reject the 4-D weight
            m.to(memory_format=torch.channels_last_3d)
        assert not model.conv.weight.is_contiguous() and not model.up.weight.is_contiguous()
    params = sw.prunable(model)
    assert list(params) == list(FLOP_MODELS[which][2])  # in_proj_weight included for the ViT
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    counts0, ever0 = list(mask.counts), {n: int(m.sum()) for n, m in mask.ever_active.items()}
    x, y = torch.rand(2, *shape, generator=gen), torch.randint(3, (2,), generator=gen)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # bounded: weights stay finite
        opt.step()
        mask.step(opt)
        p = rng.uniform(0.005, 0.95)
        info = mask.update(p, growth=growth, optimizer=opt)
        assert mask.counts == counts0 == [int(mask.masks[n].sum()) for n in mask.names]
        assert info["pruned"] == info["grown"] == sum(math.ceil(p * c) for n, c in zip(mask.names, counts0)
                                                      if c < params[n].numel())  # full layers left alone
        for n in mask.names:
            assert not params[n].detach()[~mask.masks[n]].any() and not momentum(opt, params[n])[~mask.masks[n]].any()
    for n, c in zip(mask.names, counts0):  # every layer that is not dense changed its topology
        assert (int(mask.ever_active[n].sum()) > ever0[n]) == (c < params[n].numel())


@settings(max_examples=20, deadline=None)
@given(schedule=st.lists(st.tuples(st.integers(1, 256), st.integers(1, 10**9), st.integers(0, 20)),
                         min_size=1, max_size=30))
def test_flop_ledger(schedule):
    ledger = sw.FlopLedger()
    paper = actual = 0
    for images, fwd, k in schedule:  # density (hence forward cost) changes from step to step
        ledger.charge(images, fwd, k)
        paper += 3 * (k + 1) * fwd * images
        actual += (2 * k + 3) * fwd * images
    assert (ledger.paper, ledger.actual) == (paper, actual)
    assert ledger.images == sum(s[0] for s in schedule) and ledger.steps == len(schedule)
    other = sw.FlopLedger()
    other.load_state_dict(ledger.state_dict())
    assert other.state_dict() == ledger.state_dict()


def test_flop_ledger_conventions():
    pgd10, std = sw.FlopLedger(), sw.FlopLedger()
    pgd10.charge(1, 1000, 10)
    std.charge(1, 1000, 0)
    assert (pgd10.paper, pgd10.actual) == (33_000, 23_000)  # paper 33x, actual 23x forward
    assert (std.paper, std.actual) == (3_000, 3_000)
    # the paper's dense CIFAR-10 row: 33 x fwd x 45,000 images x 200 epochs = 772.41e17 at 260.07e9
    ledger = sw.FlopLedger()
    ledger.charge(45_000 * 200, 260_070_000_000, 10)
    assert abs(ledger.paper / 772.41e17 - 1) < 1e-4


# ----------------------------------------------------------------------------- 13. data on the device: augment

def crop_candidates(x: torch.Tensor, pad: int, flip: bool):
    """Slow reference: every crop of the zero-padded sample, unflipped and flipped."""
    C, H, W = x.shape
    p = torch.zeros(C, H + 2 * pad, W + 2 * pad)
    p[:, pad:pad + H, pad:pad + W] = x
    out = []
    for src in ([p, p.flip(2)] if flip else [p]):
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                out.append(src[:, oy:oy + H, ox:ox + W])
    return out


@pytest.mark.parametrize("pad, flip, shape", [(4, True, (32, 2, 8, 8)), (2, False, (16, 1, 5, 7)),
                                              (1, True, (16, 3, 6, 4))])
def test_augment_is_crop_and_flip(pad, flip, shape):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(shape, generator=g) * 0.9 + 0.1  # no zeros inside: crops are unambiguous
    out = sw.augment(x, pad=pad, flip=flip, rotate=0, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = set()
    for i in range(len(x)):
        hits = [j for j, c in enumerate(crop_candidates(x[i], pad, flip)) if torch.equal(c, out[i])]
        assert len(hits) >= 1, i
        seen.add(hits[0])
    assert len(seen) > 3  # offsets (and flips) really vary over the batch
    if flip:
        n = (2 * pad + 1) ** 2
        assert any(h < n for h in seen) and any(h >= n for h in seen)
    again = sw.augment(x, pad=pad, flip=flip, rotate=0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    other = sw.augment(x, pad=pad, flip=flip, rotate=0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(out, other)


def test_augment_no_pad_no_flip_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(sw.augment(x, pad=0, flip=False, rotate=0), x)


def test_augment_rotation():
    g = torch.Generator().manual_seed(9)
    x = torch.rand(8, 3, 16, 16, generator=g)
    out = sw.augment(x, pad=4, flip=True, rotate=15, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    plain = sw.augment(x, pad=4, flip=True, rotate=0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, plain)
    again = sw.augment(x, pad=4, flip=True, rotate=15, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # rotation alone of a constant image keeps the centre pixel's value (small angle, no padding)
    ones = torch.ones(2, 1, 15, 15)
    rot = sw.augment(ones, pad=0, flip=False, rotate=15, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rot[:, :, 7, 7], torch.ones(2, 1))


@pytest.mark.parametrize("world", [2, 3])
def test_batches_start_is_each_ranks_slice_of_the_global_batchs_start(world):
    """Batches.start (the program's shard): rank r's rows of the random start drawn for the whole batch, so the
    ranks' starts side by side are one process's (7 rows: the remainder goes to the first ranks)."""
    x, y, kw = torch.zeros(7, 1, 4, 4, dtype=torch.uint8), torch.arange(7), dict(eps=0.1, norm="linf")
    full = sw.attack_start((7, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float32, **kw)
    parts = []
    for rank in range(world):
        batches = sw.Batches(x, y, batch_size=7, rank=rank, world=world)
        xb, _ = next(iter(batches))
        parts.append(batches.start(xb, generator=torch.Generator().manual_seed(0), **kw))
    assert [len(p) for p in parts] == [len(r) for r in torch.arange(7).tensor_split(world)]
    assert torch.equal(torch.cat(parts), full)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 12), world=st.integers(2, 4), seed=SEEDS, shuffle=st.booleans())
def test_batches_shards_are_the_rows_of_one_process(n, batch, world, seed, shuffle):
    """Under torchrun each rank keeps rows lo:hi of the global batch: the ranks' shards, in rank order, are
    one process's batch exactly (no row twice, none left out, sizes within one), whatever the remainder."""
    x = torch.zeros(n, 1, 1, 1, dtype=torch.uint8)
    y = torch.arange(n)  # the labels name the rows

    def epoch(rank, w):
        b = sw.Batches(x, y, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      rank=rank, world=w)
        return [(yb.clone(), b.rows) for _, yb in b]
    one, shards = epoch(0, 1), [epoch(r, world) for r in range(world)]
    assert all(len(s) == len(one) for s in shards)
    for i, (rows, full) in enumerate(one):
        assert full == (0, len(rows), len(rows))
        assert torch.equal(torch.cat([s[i][0] for s in shards]), rows)
        bounds = [s[i][1] for s in shards]
        assert [lo for lo, _, _ in bounds] == [0] + [hi for _, hi, _ in bounds[:-1]] and bounds[-1][1] == len(rows)
        sizes = [hi - lo for lo, hi, _ in bounds]
        assert max(sizes) - min(sizes) <= 1 and all(m == len(rows) for *_, m in bounds)


# ----------------------------------------------------------------------------- 14. robust evaluation
# On a tiny CNN adversarially trained on real Fashion-MNIST; AutoAttack through pyautoattack, with
# small iteration counts.

@pytest.fixture(scope="module")
def tiny_fmnist():
    """A 2-conv CNN trained for 3 epochs with FGSM-RS (eps 0.1) on 4,000 real Fashion-MNIST images (~3 s),
    and 200 test images: SA ~75%, PGD-20 RA ~50%."""
    data = sw.load_fashion_mnist("/nonexistent")
    x, y = data["train"][0][:4000].float() / 255, data["train"][1][:4000]
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 5, 2, 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 49, 10))
    fill_(model, gen)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 / math.sqrt(p[0].numel()))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            xb, yb = x[order[i:i + 64]], y[order[i:i + 64]]
            loss = F.cross_entropy(model(sw.fgsm_rs(model, xb, yb, eps=0.1, generator=gen)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = data["test"][0][:200].float() / 255, data["test"][1][:200]
    return model.eval(), xt, yt


def halves(x, y):
    return [(x[:100], y[:100]), (x[100:], y[100:])]


def pgd_ra(model, x, y, steps=20, eps=0.1):
    """PGD-20 RA in %, an example robust when clean and attacked are both right (as AutoAttack counts)."""
    ex = sw.evaluate_examples(model, halves(x, y), eps=eps, alpha=eps / 4, steps=steps,
                              generator=torch.Generator().manual_seed(0))
    return 100 * (ex["clean"] & ex["robust"]).double().mean().item()


def test_pgd_restarts_worst_case_per_example(tiny_fmnist):
    model, x, y = tiny_fmnist
    kw = dict(eps=0.1, alpha=0.05, steps=1)  # a weak attack, so that other random starts matter
    # one batch: the first restart draws what the single run draws, so the comparison is per example
    one = sw.evaluate_examples(model, [(x, y)], generator=torch.Generator().manual_seed(0), **kw)
    four = sw.evaluate_examples(model, [(x, y)], restarts=4, generator=torch.Generator().manual_seed(0), **kw)
    assert not (four["robust"] & ~one["robust"]).any()  # restarts never make an example robust
    assert four["robust"].sum() < one["robust"].sum()  # and here they break some more
    assert (four["adv_loss"] >= one["adv_loss"]).all() and torch.equal(four["clean"], one["clean"])
    four = sw.evaluate_examples(model, halves(x, y), restarts=4, generator=torch.Generator().manual_seed(0), **kw)
    gen, robust, worst = torch.Generator().manual_seed(0), [], []  # reference: 4 runs per batch, and-ed
    for xb, yb in halves(x, y):
        runs = [model(sw.pgd(model, xb, yb, generator=gen, **kw)).detach() for _ in range(4)]
        robust.append(torch.stack([r.argmax(1) == yb for r in runs]).all(0))
        worst.append(torch.stack([F.cross_entropy(r, yb, reduction="none") for r in runs]).amax(0))
    assert torch.equal(four["robust"], torch.cat(robust))
    torch.testing.assert_close(four["adv_loss"], torch.cat(worst))


def test_autoattack_not_above_pgd20(tiny_fmnist):
    model, x, y = tiny_fmnist
    aa = sw.autoattack_eval(model, x, y, eps=0.1, version="custom", attacks=["apgd-ce", "apgd-t"], iters=20,
                            batch_size=100)
    ra_aa, ra_pgd = 100 * sum(aa["robust"]) / len(y), pgd_ra(model, x, y)
    assert ra_pgd > 30  # the model is robust enough for the comparison to mean something
    assert ra_aa <= ra_pgd and aa["flags"] == []
    clean = model(x).argmax(1) == y
    assert not (torch.tensor(aa["robust"]) & ~clean).any()  # robust implies clean-correct
    assert sw.aa_checks(ra_pgd, ra_aa, aa["flags"])["aa_not_above_pgd"]["ok"] is True


@pytest.mark.slow
def test_autoattack_standard_100_images(tiny_fmnist):
    model, x, y = tiny_fmnist
    aa = sw.autoattack_eval(model, x[:100], y[:100], eps=0.1, batch_size=100)
    ra_aa = sum(aa["robust"])
    ex = sw.evaluate_examples(model, [(x[:100], y[:100])], eps=0.1, alpha=0.025, steps=20,
                              generator=torch.Generator().manual_seed(0))
    assert ra_aa <= int((ex["clean"] & ex["robust"]).sum()) and aa["flags"] == []


def test_autoattack_resumes_after_its_last_batch(tiny_fmnist):
    model, x, y = tiny_fmnist
    kw = dict(eps=0.1, version="custom", attacks=["apgd-ce"], iters=5, batch_size=50)
    full = sw.autoattack_eval(model, x, y, **kw)
    saved = []
    half = sw.autoattack_eval(model, x[:100], y[:100], on_batch=lambda r: saved.append(copy.deepcopy(r)), **kw)
    assert [len(r["robust"]) for r in saved] == [50, 100] and saved[-1] == half
    assert sw.autoattack_eval(model, x, y, done=half, **kw) == full


class Reverse(torch.autograd.Function):
    """Identity forward, negated gradient: an obfuscated gradient that leads PGD towards the right class."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class Masked(nn.Module):
    """A model built to mask gradients: `model(f(x))` with f noisy, gradient-reversing or rounding."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        f = {"random": lambda x: x + 0.2 * torch.randn_like(x), "reversed": Reverse.apply,
             "rounded": lambda x: torch.round(x * 4) / 4}[self.kind]  # round: zero gradient everywhere
        return self.model(f(x))


def failed(checks):
    return {k for k, c in checks.items() if c["ok"] is False}


@pytest.mark.parametrize("kind, fires", [(None, set()), ("random", {"eps0_equals_clean"}),
                                         ("reversed", {"ra_falls_with_steps", "ra_falls_with_eps",
                                                       "unbounded_ra_zero"}),
                                         ("rounded", {"unbounded_ra_zero"})])
def test_masking_checks_fire_on_masked_models_only(tiny_fmnist, kind, fires):
    model, x, y = tiny_fmnist
    torch.manual_seed(0)  # the noise of the random model
    checks = sw.masking_checks(model if kind is None else Masked(model, kind), halves(x, y), eps=0.1, alpha=0.025,
                               steps=20)
    assert set(checks) == CHECKS - {"aa_not_above_pgd", "autoattack_flags"}
    detail = {k: c["detail"] for k, c in checks.items()}
    assert failed(checks) >= fires if kind else failed(checks) == set(), detail  # a masked model may fail more


def test_autoattack_checks_fire(tiny_fmnist):
    model, x, y = tiny_fmnist
    ra_pgd = pgd_ra(model, x, y)
    # a randomized model: AutoAttack's own check says so
    torch.manual_seed(0)
    noisy = sw.autoattack_eval(Masked(model, "random"), x[:100], y[:100], eps=0.1, version="custom",
                               attacks=["apgd-ce"], iters=2, batch_size=100)
    assert any("randomized" in f for f in noisy["flags"])
    assert failed(sw.aa_checks(ra_pgd, 0.0, noisy["flags"])) == {"autoattack_flags"}
    # an AutoAttack far weaker than PGD-20 (Square, one query) reports more robustness than PGD: flagged
    weak = sw.autoattack_eval(model, x, y, eps=0.1, version="custom", attacks=["square"], iters=1, batch_size=100)
    ra_weak = 100 * sum(weak["robust"]) / len(y)
    assert ra_weak > ra_pgd + 1 and weak["flags"] == []
    assert failed(sw.aa_checks(ra_pgd, ra_weak, weak["flags"])) == {"aa_not_above_pgd"}


# ----------------------------------------------------------------------------- 15. benchmarks
# `python -m pytest -p test_sparse_win test_sparse_win.py --benchmark-only`: pytest-benchmark groups
# put our code next to its baseline, measured in the same run; the table's "(x.xx)" columns
# are the ratios. The default suite skips these (--benchmark-skip) but runs the equality checks.

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
    benchmark.pedantic(lambda: sw.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10), rounds=5, iterations=1,
                       warmup_rounds=1)


def test_bench_pgd_torchattacks(benchmark, step_setup):
    torchattacks = pytest.importorskip("torchattacks")
    model, _, _, x, y, _ = step_setup
    model.eval()
    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    benchmark.group = "PGD-10 L-inf, ResNet-18 w16, batch 128"
    benchmark.pedantic(lambda: atk(x, y), rounds=5, iterations=1, warmup_rounds=1)


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
    """Peak resident memory of a PGD AT step with masks is within 5% of dense (measured: +0.7%). Memory,
    unlike time, does not depend on the load of the machine, so the ratio is asserted."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    # glibc: one arena, big blocks mmapped and returned at once, so RSS follows live memory (without
    # these the dense/sparse peaks scatter by +-15% from run to run; with them by < 0.1%)
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    peak = {kind: int(subprocess.run([sys.executable, "-c", PEAK_RSS, kind], capture_output=True, text=True,
                                     env=env, check=True).stdout) for kind in ("dense", "sparse")}
    benchmark.extra_info.update(peak_dense_bytes=peak["dense"], peak_sparse_bytes=peak["sparse"],
                                ratio=peak["sparse"] / peak["dense"])
    print(f"\npeak step memory: dense {peak['dense'] / 2**20:.1f} MiB, with masks {peak['sparse'] / 2**20:.1f} MiB "
          f"(ratio {peak['sparse'] / peak['dense']:.3f})")
    benchmark.pedantic(lambda: None, rounds=1)
    assert peak["sparse"] <= 1.05 * peak["dense"], peak


# =============================================================================
# program: the tests of the part of sparse_win.py below '# === program', in its order
# =============================================================================

# End-to-end tests of the training program (config, data, train, report, main). Every run uses the
# `smoke` preset (Fashion-MNIST from Debian's dataset-fashion-mnist, 4-channel ResNet-18, PGD-2)
# with its run directory and data dir under tmp_path.

HERE = Path(sw.__file__).resolve().parent
K = sw.PRESETS["smoke"]["train_steps"]  # training PGD steps of the smoke preset
N_TRAIN = sw.PRESETS["smoke"]["train_subset"]
REC_KEYS = {"epoch", "lr", "train_loss", "train_ra", "val_sa", "val_ra", "val_adv_loss", "test_sa", "test_ra",
            "test_adv_loss", "density", "train_flops", "train_flops_paper", "itop", "time"}
WALL = {"time", "wall_seconds",  # wall-clock fields: the only ones allowed to differ after a resume
        "at_step_s", "at_step_dense_s", "at_speedup", "inference_s", "inference_dense_s", "inference_speedup"}
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")  # for sparse_win.py in a subprocess beside the tests


# ----------------------------------------------------------------------------- helpers

# The smoke preset as these tests were written for it, before it ran Flying Bird+ with its rule forced: dense AT,
# 2 epochs, FB+'s defaults; a test's own flags come after these and override them.
SMOKE_BEFORE = ["--mode", "dense", "--epochs", 2, "--milestones", 1, "--fbplus-start", -1, "--fbplus-window", 4,
                "--fbplus-threshold", 0.5]


def smoke(out, data_dir, *extra) -> list[str]:
    return ["--preset", "smoke", *map(str, SMOKE_BEFORE), "--out", str(out), "--data-dir", str(data_dir),
            "--no-download", *map(str, extra)]


def run_ok(args) -> Path:
    args = [str(a) for a in args]
    assert sw.main(args) == 0
    return Path(args[args.index("--out") + 1])


def read_run(d: Path):
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return recs, json.loads((d / "summary.json").read_text())


def load_ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def smoke_model(dataset="fashion-mnist", width=None):
    info = sw.DATASETS[dataset]
    return sw.build_model("resnet18", num_classes=info["classes"], in_channels=info["channels"],
                          width=width or sw.PRESETS["smoke"]["width"], mean=info["mean"], std=info["std"])


def update_steps(epochs, steps_per_epoch, early, late):
    """Steps at which a topology update fires: T = early before epochs // 2, late from then on."""
    return [s for s in range(1, epochs * steps_per_epoch + 1)
            if s % (late if (s - 1) // steps_per_epoch >= epochs // 2 else early) == 0]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def eval_json(d: Path, pattern="eval-*.json") -> dict:
    files = [f for f in d.glob(pattern) if not f.name.endswith(".partial.json")]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def eval_reference(model, data_dir, *, n=64, steps=2, restarts=2, seed=0) -> dict:
    """--eval's per-example results recomputed (QUICK's options): the first n test images in batches of
    256, PGD (eps 0.1, step 0.025) with restarts from a generator seeded with --seed."""
    x, y = (t[:n] for t in sw.load_fashion_mnist(str(data_dir))["test"])
    return sw.evaluate_examples(model, sw.Batches(x, y, batch_size=256), eps=0.1, alpha=0.025, steps=steps,
                                restarts=restarts, generator=torch.Generator().manual_seed(seed))


def pct(bits: torch.Tensor) -> float:
    return 100 * int(bits.sum()) / len(bits)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in WALL}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as jq, JavaScript and pyarrow do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def assert_cli_error(capsys, args, *words) -> str:
    capsys.readouterr()
    assert sw.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse_win.py: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    """Every file of a run directory but its lock (which holds the pid of the last process that took it)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != ".lock"}


def wait_for(path: Path, proc, timeout=300):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout, f"no {path} after {timeout} s"  # a hang guard, not a speed target
        time.sleep(0.2)


# ----------------------------------------------------------------------------- 1. config and the command line

def test_presets_apply_and_flags_override():
    for name, values in sw.PRESETS.items():
        cfg = sw.parse_args(["--preset", name])
        for k, v in values.items():
            assert getattr(cfg, k) == (tuple(v) if isinstance(v, (list, tuple)) else v), (name, k)
    cfg = sw.parse_args(["--preset", "smoke", "--epochs", "5", "--milestones", "3", "4", "--no-download"])
    assert cfg.epochs == 5 and cfg.milestones == (3, 4) and cfg.download is False
    assert cfg.width == sw.PRESETS["smoke"]["width"] and cfg.dataset == "fashion-mnist"
    assert sw.parse_args(["--epochs", "7", "--preset", "cpu-demo"]).epochs == 7  # order does not matter
    assert sw.parse_args(["--preset", "smoke", "--progress"]).progress is True


def test_validate_takes_the_number_of_processes_from_its_caller(monkeypatch):
    """validate() reads no environment: torchrun's WORLD_SIZE reaches it as an argument (train() passes the
    processes of the job it joined)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = sw.parse_args(["--preset", "smoke", "--batch-size", "64"])
    assert sw.validate(cfg, world=2) is cfg
    with pytest.raises(sw.SparseWinError, match="--batch-size 64 .* divisible by the number of processes, 3"):
        sw.validate(cfg, world=3)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        sw.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(sw.Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if isinstance(f.default, bool):
            assert "--no-" + f.name.replace("_", "-") in text
    assert "--train_steps" not in text


def test_paper_defaults():
    cfg = sw.parse_args(["--dataset", "cifar100", "--mode", "dynamic", "--sparsity", "0.9"])
    assert (cfg.dataset, cfg.mode, cfg.sparsity) == ("cifar100", "dynamic", 0.9)
    assert cfg.density == pytest.approx(0.1)
    assert cfg.epochs == 200 and cfg.lr == 0.1 and cfg.milestones == () and cfg.batch_size == 128
    assert cfg.momentum == 0.9 and cfg.weight_decay == 5e-4 and cfg.arch == "resnet18"
    assert cfg.train_steps == 10 and cfg.test_steps == 20 and cfg.norm == "linf"
    assert cfg.eps(train=True) == (8 / 255, 2 / 255) and cfg.eps(train=False) == (8 / 255, 2 / 255)
    assert cfg.update_interval == 900 and cfg.update_interval_late == 1200 and cfg.allocation == "igq"
    assert cfg.growth == "random" and cfg.death_rate == 0.5 and cfg.death_rate_final == 0.005
    assert (cfg.fbplus_window, cfg.fbplus_prune, cfg.fbplus_grow, cfg.fbplus_threshold) == (4, 0.4, 0.05, 0.5)
    used = sw.resolved(cfg)  # the values config.json records
    assert used.fbplus_start == 100 and (used.eb_threshold, used.eb_queue) == (0.08, 5) and used.milestones == (100, 150)
    assert (used.train_eps, used.train_alpha, used.test_eps, used.test_alpha) == (8, 2, 8, 2)
    assert used.amp is False and used.channels_last is False and sw.resolved(cfg, cuda=True).amp is True
    assert cfg.ticket == "unstructured" and cfg.bn_l1 == 1e-4  # Early-Bird's channel ticket: 1e-4, threshold 0.1
    assert sw.resolved(dataclasses.replace(cfg, ticket="channel")).eb_threshold == 0.1
    assert sw.resolved(dataclasses.replace(cfg, mode="static")).milestones == (50, 150)
    assert sw.DATASETS["cifar100"]["rotate"] == 15
    assert sw.parse_args(["--dataset", "fashion-mnist"]).eps(train=True) == pytest.approx((0.1, 0.025))


@pytest.mark.parametrize("args, words", [
    (["--sparsity", "1.0"], ["--sparsity", "[0, 1)"]),
    (["--sparsity", "-0.1"], ["--sparsity"]),
    (["--sparsity", "abc"], ["--sparsity"]),
    (["--dataset", "imagenet"], ["imagenet", "cifar10"]),
    (["--mode", "sparse"], ["sparse", "dynamic+"]),
    (["--preset", "nope"], ["nope", "smoke"]),
    (["--bogus-flag"], ["--bogus-flag"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--fbplus-window", "0"], ["--fbplus-window"]),
    (["--gap-subset", "-1"], ["subset"]),
    (["--ticket", "channel", "--mode", "dynamic"], ["--ticket channel", "--mode static", "dynamic"]),
    (["--ticket", "filters", "--mode", "static"], ["filters", "'unstructured', 'channel'"]),
    (["--mode", "static", "--bn-l1", "-1"], ["--bn-l1"]),
    (["--eb-threshold", "-0.5"], ["--eb-threshold"]),
    (["--loss", "mart"], ["mart", "'ce', 'trades'"]),
    (["--loss", "trades", "--train-attack", "fgsm-rs"], ["--loss trades", "--train-attack"]),
    (["--trades-beta", "-1"], ["--trades-beta", ">= 0"]),
    (["--awp-gamma", "-0.005"], ["--awp-gamma"]),
    (["--ema-decay", "1"], ["--ema-decay", "[0, 1)"]),
    (["--ema-decay", "-0.1"], ["--ema-decay"]),
    # a mistyped name: did you mean the nearest ones
    (["--sparsty", "0.9"], ["unrecognized arguments: --sparsty 0.9; did you mean --sparsity?"]),
    (["--mode", "dynmic"], ["invalid choice: 'dynmic'", "did you mean dynamic or dynamic+?"]),
    (["--growth=gradiant"], ["did you mean gradient?"]),
    (["--preset", "smok"], ["unknown preset 'smok'; choose from cpu-demo, smoke; did you mean smoke?"]),
])
def test_cli_bad_options(capsys, tmp_path, args, words):
    assert_cli_error(capsys, ["--preset", "smoke", "--out", tmp_path / "run", *args], *words)
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_cli_subprocess_one_line():
    p = subprocess.run([sys.executable, "sparse_win.py", "--sparsity", "2"], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["sparse_win.py: error: --sparsity must be in [0, 1), got 2.0"]
    assert p.stdout == ""


# ----------------------------------------------------------------------------- 2. data loaders

def py2_pickle(d: dict) -> bytes:
    """A pickle as Python 2 wrote CIFAR's files: keys are Python 2 str (SHORT_BINSTRING), so that
    pickle.load(encoding='bytes') gives b'data' and encoding='latin1' (torchvision) gives 'data'."""
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for k, v in d.items():
        kb = k.encode("latin1")
        out += b"U" + bytes([len(kb)]) + kb
        out += pickle.dumps(v, protocol=2)[2:-1]  # the value, without its PROTO and STOP
    return bytes(out + b"u.")  # SETITEMS, STOP


@pytest.fixture
def no_md5(monkeypatch):
    # our small files cannot match the real MD5 sums: check that they exist, nothing more
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_cifar(root: Path, name: str, rng: np.random.Generator, n_per_batch=4, n_test=5):
    """Official python-version layout with random images; returns (train rows, labels, test rows, labels)."""
    classes = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    batches = ["data_batch_%d" % i for i in range(1, 6)] if name == "cifar10" else ["train"]
    n_train = n_per_batch * 5
    x = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    y = rng.integers(0, classes, n_train).tolist()
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, classes, n_test).tolist()
    per = n_train // len(batches)
    for i, b in enumerate(batches):
        rec = {"batch_label": b, key: y[i * per:(i + 1) * per], "data": x[i * per:(i + 1) * per],
               "filenames": ["img_%d.png" % j for j in range(per)]}
        if name == "cifar100":
            rec["coarse_labels"] = [c // 5 for c in rec[key]]
        (folder / b).write_bytes(py2_pickle(rec))
    test = {"batch_label": "test", key: yt, "data": xt, "filenames": ["t_%d.png" % j for j in range(n_test)]}
    if name == "cifar100":
        test["coarse_labels"] = [c // 5 for c in yt]
    (folder / ("test_batch" if name == "cifar10" else "test")).write_bytes(py2_pickle(test))
    if name == "cifar10":
        meta = {"num_cases_per_batch": per, "label_names": ["c%d" % i for i in range(10)], "num_vis": 3072}
        (folder / "batches.meta").write_bytes(py2_pickle(meta))
    else:
        meta = {"fine_label_names": ["f%d" % i for i in range(100)],
                "coarse_label_names": ["c%d" % i for i in range(20)]}
        (folder / "meta").write_bytes(py2_pickle(meta))
    with open(folder / batches[0], "rb") as f:  # the fixture has the real format's bytes keys
        assert b"data" in pickle.load(f, encoding="bytes")
    return x, y, xt, yt


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar(tmp_path, no_md5, name):
    x, y, xt, yt = write_cifar(tmp_path, name, np.random.default_rng(1))
    data = sw.load_cifar(name, str(tmp_path), download=False)
    (xtr, ytr), (xv, yv), (xte, yte) = data["train"], data["val"], data["test"]
    for t in (xtr, xv, xte):
        assert t.dtype == torch.uint8 and t.shape[1:] == (3, 32, 32) and t.is_contiguous()
    for t in (ytr, yv, yte):
        assert t.dtype == torch.int64
    assert len(xtr) == 18 and len(xv) == 2 and len(xte) == 5  # last N // 10 of train are val, in order
    assert torch.cat([ytr, yv]).tolist() == y and yte.tolist() == yt
    allx = torch.cat([xtr, xv])
    for i in range(len(x)):  # pickle row: 1024 R, then 1024 G, then 1024 B, each row-major 32 x 32
        for c in range(3):
            for r in (0, 5, 31):
                assert allx[i, c, r].tolist() == x[i, c * 1024 + r * 32: c * 1024 + r * 32 + 32].tolist()
    assert torch.equal(allx, torch.from_numpy(x).view(-1, 3, 32, 32))
    assert torch.equal(xte, torch.from_numpy(xt).view(-1, 3, 32, 32))
    cfg = sw.parse_args(["--dataset", name, "--data-dir", str(tmp_path), "--no-download"])
    assert torch.equal(sw.load_data(cfg)["val"][0], xv)


def test_load_cifar_bad_files_is_error(tmp_path, no_md5):
    write_cifar(tmp_path, "cifar10", np.random.default_rng(2))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(sw.SparseWinError, match="cifar10 not found"):
        sw.load_cifar("cifar10", str(tmp_path), download=False)


def colour(cls: int, i: int) -> tuple:
    return (30 + 40 * cls, 20 + 35 * i, 220 - 25 * cls)


def write_tiny_imagenet(base: Path, wnids=("n02", "n01", "n03"), per_class=4, n_val=4):
    from PIL import Image
    order = sorted(wnids)
    (base / "train").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")  # unsorted, as in the real file
    expected = []  # (wnid label, colour) in the loader's order: sorted wnid, sorted file name
    for w in wnids:
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n"
                                                                   for i in range(per_class)))
        for i in range(per_class):
            Image.new("RGB", (64, 64), colour(order.index(w), i)).save(
                base / "train" / w / "images" / f"{w}_{i}.JPEG", quality=100, subsampling=0)
    for w in order:
        expected += [(order.index(w), colour(order.index(w), i)) for i in range(per_class)]
    (base / "val" / "images").mkdir(parents=True)
    ann, test = [], []
    for j in range(n_val):
        w = wnids[j % len(wnids)]
        if j == 0:  # a greyscale JPEG (Tiny-ImageNet has some): the loader makes it RGB
            Image.new("L", (64, 64), 77).save(base / "val" / "images" / f"val_{j}.JPEG", quality=100)
            test.append((order.index(w), (77, 77, 77)))
        else:
            Image.new("RGB", (64, 64), colour(order.index(w), j)).save(
                base / "val" / "images" / f"val_{j}.JPEG", quality=100, subsampling=0)
            test.append((order.index(w), colour(order.index(w), j)))
        ann.append(f"val_{j}.JPEG\t{w}\t0\t10\t62\t56")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return expected, test


def test_load_tiny_imagenet(tmp_path):
    expected, test = write_tiny_imagenet(tmp_path / "a" / "tiny-imagenet-200")
    write_tiny_imagenet(tmp_path / "b")  # the same files directly under root
    data = sw.load_tiny_imagenet(str(tmp_path / "a"))
    again = sw.load_tiny_imagenet(str(tmp_path / "b"))
    (xtr, ytr), (xv, yv), (xte, yte) = data["train"], data["val"], data["test"]
    assert xtr.dtype == torch.uint8 and xtr.shape == (11, 3, 64, 64) and xv.shape == (1, 3, 64, 64)
    assert xte.shape == (4, 3, 64, 64) and ytr.dtype == yte.dtype == torch.int64
    for s in ("train", "val", "test"):  # the 90/10 split is a fixed permutation: same on every call
        assert torch.equal(data[s][0], again[s][0]) and torch.equal(data[s][1], again[s][1])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    want = [expected[i] for i in perm]
    got_x, got_y = torch.cat([xtr, xv]), torch.cat([ytr, yv])
    assert got_y.tolist() == [c for c, _ in want]  # labels by sorted wnid
    assert sorted(got_y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    means = got_x.float().mean((2, 3))
    # JPEG at quality 100 without chroma subsampling: solid colours come back within a few levels
    torch.testing.assert_close(means, torch.tensor([c for _, c in want], dtype=torch.float), atol=3, rtol=0)
    assert yte.tolist() == [c for c, _ in test]
    torch.testing.assert_close(xte.float().mean((2, 3)), torch.tensor([c for _, c in test], dtype=torch.float),
                               atol=3, rtol=0)
    assert torch.equal(xte[0, 0], xte[0, 1]) and torch.equal(xte[0, 0], xte[0, 2])  # greyscale -> RGB


def write_idx(path: Path, t: torch.Tensor):
    magic = struct.pack(">I", 0x800 + t.dim()) + b"".join(struct.pack(">I", n) for n in t.shape)
    body = magic + t.numpy().tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)


def test_read_idx_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    for shape in [(5,), (3, 4, 7), (2, 28, 28)]:
        t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        for name in ("a.idx", "a.idx.gz"):
            write_idx(tmp_path / name, t)
            r = sw._read_idx(tmp_path / name)
            assert r.dtype == torch.uint8 and torch.equal(r, t)
    assert (tmp_path / "a.idx").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_load_fashion_mnist_from_idx(tmp_path):
    g = torch.Generator().manual_seed(4)
    deb = tmp_path / "debian"
    deb.mkdir()
    x = torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (20,), generator=g, dtype=torch.uint8)
    xt = torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8)
    yt = torch.randint(0, 10, (7,), generator=g, dtype=torch.uint8)
    for stem, t in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                    ("t10k-images-idx3-ubyte", xt), ("t10k-labels-idx1-ubyte", yt)):
        write_idx(deb / f"{stem}.gz", t)
    assert (deb / "train-labels-idx1-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress((deb / "train-labels-idx1-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x01"
    data = sw.load_fashion_mnist(str(tmp_path / "root"), debian_dir=str(deb))
    (xtr, ytr), (xv, yv), (xte, yte) = data["train"], data["val"], data["test"]
    assert xtr.shape == (18, 1, 28, 28) and xv.shape == (2, 1, 28, 28) and xte.shape == (7, 1, 28, 28)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert torch.equal(torch.cat([xtr, xv])[:, 0], x) and torch.equal(xte[:, 0], xt)
    assert torch.cat([ytr, yv]).tolist() == y.tolist() and yte.tolist() == yt.tolist()
    # the torchvision layout under root (unpacked files) comes first
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, t in (("train-images-idx3-ubyte", x[:10]), ("train-labels-idx1-ubyte", y[:10]),
                    ("t10k-images-idx3-ubyte", xt[:3]), ("t10k-labels-idx1-ubyte", yt[:3])):
        write_idx(raw / stem, t)
    data = sw.load_fashion_mnist(str(tmp_path / "root"), debian_dir=str(deb))
    assert len(data["train"][0]) == 9 and len(data["val"][0]) == 1 and torch.equal(data["test"][0][:, 0], xt[:3])


def test_cli_missing_cifar(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = assert_cli_error(capsys, ["--preset", "smoke", "--dataset", "cifar10", "--no-download", "--data-dir",
                                     tmp_path / "empty", "--out", tmp_path / "run"], "cifar10", "data_batch_1")
    assert "cifar-10-batches-py" in line


def test_cli_missing_torchvision_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    assert_cli_error(capsys, ["--dataset", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "run"],
                     "reading cifar10 needs torchvision", "pip install torchvision")


def test_cuda_out_of_memory_is_one_line(capsys, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139 GiB total)")
    monkeypatch.setattr(sw, "train", oom)
    assert sw.main(["--preset", "smoke", "--out", str(tmp_path / "run")]) == sw.OUT_OF_MEMORY == 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sparse_win.py: error: CUDA out of memory (CUDA out of memory. Tried")
    assert "--batch-size" in err[0] and "--resume" in err[0]


def test_cli_missing_tiny_imagenet(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_cli_error(capsys, ["--preset", "smoke", "--dataset", "tiny-imagenet", "--data-dir",
                              tmp_path / "empty", "--out", tmp_path / "run"], "tiny-imagenet", "val_annotations.txt")


def test_cli_missing_fashion_mnist(capsys, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    # no Debian fallback either (the constant is bound as load_fashion_mnist's default argument)
    monkeypatch.setattr(sw, "DEBIAN_FASHION_MNIST", str(tmp_path / "empty"))
    monkeypatch.setattr(sw.load_fashion_mnist, "__defaults__", (False, str(tmp_path / "empty")))
    assert_cli_error(capsys, ["--preset", "smoke", "--no-download", "--data-dir", tmp_path / "empty",
                              "--out", tmp_path / "run"], "fashion-mnist")


# ----------------------------------------------------------------------------- 3. shared runs

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not Path(sw.DEBIAN_FASHION_MNIST).is_dir() and (HERE / ".device" / "data").is_dir():
        return HERE / ".device" / "data"  # the GPU check's copy (shared/gpu-check.sh), on a machine without Debian's
    return tmp_path_factory.mktemp("data")  # empty: Fashion-MNIST comes from the Debian package


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_dir):
    # PGD-10 so that the paper's 33x / our 23x forward-cost accounting is checked as is.
    return run_ok(smoke(tmp_path_factory.mktemp("dense") / "run", data_dir, "--mode", "dense",
                        "--train-steps", 10, "--train-subset", 64))


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory, data_dir):
    return run_ok(smoke(tmp_path_factory.mktemp("dyn") / "run", data_dir, "--mode", "dynamic"))


# FB+ from epoch 0 with a 1-difference window and threshold 0: from the third epoch on, both
# extra pruning and extra growth fire at every topology update (deterministically).
FBPLUS = ["--mode", "dynamic+", "--epochs", 3, "--fbplus-start", 0, "--fbplus-window", 1, "--fbplus-threshold", 0]


@pytest.fixture(scope="module")
def fbplus_run(tmp_path_factory, data_dir):
    """The FB+ run; beside it, updates.json: the step and per-layer counts after every topology update."""
    base = tmp_path_factory.mktemp("fbp")
    after, real = [], sw.SparseMask.update

    def update(self, *a, **kw):
        changed = real(self, *a, **kw)
        after.append(dict(step=self.steps, counts=list(self.counts)))
        return changed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sw.SparseMask, "update", update)
        d = run_ok(smoke(base / "run", data_dir, *FBPLUS))
    (base / "updates.json").write_text(json.dumps(after))
    return d


@pytest.fixture(scope="module")
def static_run(tmp_path_factory, data_dir):
    return run_ok(smoke(tmp_path_factory.mktemp("static") / "run", data_dir, "--mode", "static"))


CHANNEL = ["--mode", "static", "--ticket", "channel", "--sparsity", 0.5]


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory, data_dir):
    with pytest.MonkeyPatch.context() as m:  # the thin network's speed measured once per step kind, not 5 times
        m.setattr(sw, "seconds", functools.partial(sw.seconds, reps=1))
        return run_ok(smoke(tmp_path_factory.mktemp("channel") / "run", data_dir, *CHANNEL))


# ----------------------------------------------------------------------------- 4. train, end to end

def test_the_smoke_preset_runs_flying_bird_plus_and_records_the_values_used(tmp_path, data_dir, capsys):
    """--preset smoke as README shows it: Flying Bird+ with topology updates and its adaptive rule fired; config.json
    holds the values used (eps and steps in 1/255, FB+'s start, milestones, amp and channels_last as booleans), and
    the run prints and records where its data came from."""
    d = run_ok(["--preset", "smoke", "--out", tmp_path / "run", "--data-dir", data_dir, "--no-download"])
    out = capsys.readouterr().out
    recs, s = read_run(d)
    assert s["method"] == "Flying Bird+" and s["topology_updates"] > 0 and len(recs) == 3
    assert [(e["epoch"], e["prune"], e["grow"]) for e in s["fbplus_events"]][:1] == [(2, True, True)]
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["train_eps"], cfg["train_alpha"], cfg["test_eps"], cfg["test_alpha"]) == (25.5, 6.375, 25.5, 6.375)
    assert cfg["fbplus_start"] == 0 and cfg["milestones"] == [2] and cfg["amp"] is False and cfg["channels_last"] is False
    source = str(data_dir / "FashionMNIST" / "raw") if (data_dir / "FashionMNIST").is_dir() else sw.DEBIAN_FASHION_MNIST
    assert f"data: fashion-mnist from {source}\n" in out and s["data"] == source



def check_common(d: Path, mode: str, epochs: int):
    """Files of a finished run and the invariants every mode shares."""
    for name in ("metrics.jsonl", "summary.json", "last.pt", "best.pt", "curves.png", "config.json"):
        assert (d / name).is_file(), name
    assert not list(d.glob("*.tmp")) and not list(d.glob("*.tmp.png"))
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["mode"] == mode and cfg["epochs"] == epochs and cfg["out"] == str(d)
    assert set(cfg) == {f.name for f in dataclasses.fields(sw.Config)}
    recs, summary = read_run(d)
    assert [r["epoch"] for r in recs] == list(range(1, epochs + 1))
    for r in recs:
        assert REC_KEYS <= set(r)
        for k in ("val_sa", "val_ra", "test_sa", "test_ra"):  # eval_subset 64: multiples of 100/64
            assert 0 <= r[k] <= 100 and r[k] * 64 / 100 == pytest.approx(round(r[k] * 64 / 100), abs=1e-9)
        assert 0 <= r["train_ra"] <= 100 and math.isfinite(r["train_loss"]) and r["val_adv_loss"] > 0
    # lr: 0.1 until the smoke milestone (epoch 1), then x0.1 (the lr in force during the epoch)
    assert [r["lr"] for r in recs] == pytest.approx([0.1 if e < 1 else 0.01 for e in range(epochs)])
    flops = [r["train_flops"] for r in recs]
    assert all(b > a for a, b in zip(flops, flops[1:])) and flops[0] > 0
    assert summary["train_flops"] == flops[-1] and summary["train_flops_paper"] == recs[-1]["train_flops_paper"]
    assert summary["mode"] == mode and summary["method"] == sw.METHOD[mode] and summary["epochs"] == epochs
    assert summary["final_density"] == recs[-1]["density"]
    # FLOPs of the model as built: dense forward cost per image
    net = smoke_model()
    per_weight = sw.model_flops(net, (1, 28, 28))[0]
    assert summary["inference_flops_dense"] == sw.forward_flops(per_weight, {n: p.numel() for n, p in
                                                                              sw.prunable(net).items()})
    last = load_ck(d / "last.pt")
    assert last["run"]["epoch"] == epochs and last["run"]["history"] == recs
    best = load_ck(d / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["val_ra"] == recs[best["epoch"] - 1]["val_ra"]
    if last["mask"] is not None:  # inference FLOPs = the final mask's per-layer counts
        counts = {n: int(m.sum()) for n, m in last["mask"]["masks"].items()}
        assert summary["inference_flops"] == sw.forward_flops(per_weight, counts)
        assert summary["final_density"] == sum(counts.values()) / sum(p.numel() for p in sw.prunable(net).values())
        state = last["optimizer"]["state"]  # indexed like net.parameters()
        index = {n: i for i, (n, _) in enumerate(net.named_parameters())}
        for n, m in last["mask"]["masks"].items():  # masked weights and their momentum are zero
            assert m.shape == last["model"][n].shape and not last["model"][n][~m].any()
            assert not state[index[n]]["momentum_buffer"][~m].any(), n
    return recs, summary, last, per_weight


def test_dense_end_to_end(dense_run):
    recs, s, last, _ = check_common(dense_run, "dense", 2)
    assert all(r["density"] == 1.0 and r["itop"] == 1.0 for r in recs)
    assert s["inference_ratio"] == 1 and s["inference_flops"] == s["inference_flops_dense"]
    assert s["final_density"] == 1.0 and s["ticket_epochs"] == 0 and s["ticket_flops"] == 0
    assert s["topology_updates"] == 0 and s["fbplus_events"] == [] and last["mask"] is None
    # PGD-10 AT: paper counts 33x forward per image, we count 23x (attack step 2x, update 3x)
    assert s["train_flops_paper"] * 23 == s["train_flops"] * 33
    for e, r in enumerate(recs, 1):  # exact integer ledger: 64 images per epoch, dense all along
        assert r["train_flops"] == 23 * s["inference_flops_dense"] * 64 * e
    assert s["train_flops_dense_ratio"] == 1.0


def smoke_igq(density=0.2):
    """The smoke model, its prunable shapes, the IGQ counts at `density` and their exact density."""
    net = smoke_model()
    shapes = [tuple(p.shape) for p in sw.prunable(net).values()]
    counts = sw.allocate_counts(shapes, density, "igq")
    return net, shapes, counts, sum(counts) / sum(math.prod(sh) for sh in shapes)


def test_dynamic_end_to_end(dynamic_run):
    recs, s, last, per_weight = check_common(dynamic_run, "dynamic", 2)
    net, shapes, counts, target = smoke_igq()
    assert sum(counts) == round(0.2 * sum(math.prod(sh) for sh in shapes))
    assert all(r["density"] == target for r in recs) and s["final_density"] == target
    # Flying Bird keeps every layer's count (IGQ allocation) through all prune/regrow updates
    assert [int(m.sum()) for m in last["mask"]["masks"].values()] == counts
    steps = update_steps(2, N_TRAIN // 64, 2, 3)
    ups = last["run"]["updates"]
    assert [u["step"] for u in ups] == steps == [2, 4, 6] and s["topology_updates"] == len(steps)
    for u in ups:
        assert u["death_rate"] == sw.cosine_death_rate(u["step"], 2 * N_TRAIN // 64, 0.5, 0.005)
        assert u["pruned"] == u["grown"] > 0 and u["density"] == target
    # ITOP: fraction ever active, grows with regrowth, never below the density
    itops = [r["itop"] for r in recs]
    assert target < itops[0] <= itops[1] == s["itop_rate"] <= 1
    # FLOPs: constant per-layer counts, so every step costs (2K+3) x the mask's forward
    fwd = sw.forward_flops(per_weight, dict(zip(sw.prunable(net), counts)))
    assert s["inference_flops"] == fwd and s["inference_ratio"] == fwd / s["inference_flops_dense"] < 1
    for e, r in enumerate(recs, 1):
        assert r["train_flops"] == (2 * K + 3) * fwd * N_TRAIN * e
        assert r["train_flops_paper"] == 3 * (K + 1) * fwd * N_TRAIN * e


def test_train_charges_the_attention_constant(tmp_path, data_dir, monkeypatch):
    """Flying Bird on an attention model: ledger and summary add the dense attention FLOPs."""
    monkeypatch.setattr(sw, "model_for", lambda cfg: TokenNet())
    recs, s = read_run(run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--train-subset", 64)))
    net = TokenNet()
    per_weight, constant = sw.model_flops(net, (1, 28, 28))
    assert constant == FLOP_MODELS["token"][3] > 0
    params = sw.prunable(net)
    assert s["inference_flops_dense"] == sw.forward_flops(per_weight, {n: p.numel() for n, p in params.items()},
                                                          constant)
    counts = dict(zip(params, sw.allocate_counts([tuple(p.shape) for p in params.values()], 0.2, "igq")))
    fwd = sw.forward_flops(per_weight, counts, constant)  # Flying Bird keeps every layer's count
    assert s["inference_flops"] == fwd
    for e, r in enumerate(recs, 1):
        assert r["train_flops"] == (2 * K + 3) * fwd * 64 * e


def test_fbplus_end_to_end(fbplus_run):
    recs, s, last, per_weight = check_common(fbplus_run, "dynamic+", 3)
    net, shapes, counts, target = smoke_igq()
    ups = last["run"]["updates"]
    assert s["updates"] == ups  # the summary carries every update's counts
    steps = update_steps(3, N_TRAIN // 64, 2, 3)
    assert [u["step"] for u in ups] == steps == [2, 4, 6, 9, 12]
    # FB+ needs window + 1 = 2 epochs of history: events only in the third epoch, both kinds
    events = s["fbplus_events"]
    assert events == [dict(epoch=2, step=st, prune=True, grow=True) for st in (9, 12)]
    prev = target
    for u in ups:
        fired = u["step"] in (9, 12)
        assert (u["extra_prune"], u["extra_growth"]) == ((0.4, 0.05) if fired else (0.0, 0.0))
        if fired:  # extra pruning (0.4 p nnz) outweighs extra growth (0.05 k): density falls
            assert u["pruned"] > u["grown"] and u["density"] < prev
        else:
            assert u["pruned"] == u["grown"] and u["density"] == prev
        prev = u["density"]
    dens = [r["density"] for r in recs]
    assert dens[0] == dens[1] == target and dens[2] == ups[-1]["density"] < target
    assert s["final_density"] == dens[2] and all(b <= a for a, b in zip(dens, dens[1:]))
    # the history FB+ decides on: gap = train RA - val RA and the val adversarial loss of every epoch
    assert last["method"]["gaps"] == [r["train_ra"] - r["val_ra"] for r in recs]
    assert last["method"]["losses"] == [r["val_adv_loss"] for r in recs]
    check_fbplus_decisions(recs, ups, events, start=0, window=1, threshold=0)
    # FLOPs, exactly: each step is charged with the counts in force while it ran, those left by the
    # last topology update before it (an update after a step changes the cost of the next steps only)
    names = list(sw.prunable(net))
    after = {u["step"]: dict(zip(names, u["counts"])) for u in
             json.loads((fbplus_run.parent / "updates.json").read_text())}
    assert list(after) == steps
    before = dict(zip(names, counts))  # each update's counts follow the released rule, layer by layer
    for u in ups:
        p, drops, grows = u["death_rate"], 0, 0
        for n, shape in zip(names, shapes):
            c, size = before[n], math.prod(shape)
            k = math.ceil(p * c) if c < size else 0  # a full layer is left alone
            drop = min(k + math.ceil(p * u["extra_prune"] * c), c) if k else 0
            grow = min(k + math.ceil(u["extra_growth"] * k), size - c + drop) if k else 0
            assert after[u["step"]][n] == c - drop + grow, (u, n)
            drops, grows = drops + drop, grows + grow
        assert (u["pruned"], u["grown"]) == (drops, grows)
        before = after[u["step"]]
    in_force, actual, paper, per_epoch = dict(zip(names, counts)), 0, 0, []
    for step in range(1, 3 * N_TRAIN // 64 + 1):
        fwd = sw.forward_flops(per_weight, in_force)
        actual, paper = actual + (2 * K + 3) * fwd * 64, paper + 3 * (K + 1) * fwd * 64
        in_force = after.get(step, in_force)
        if step % (N_TRAIN // 64) == 0:
            per_epoch.append((actual, paper))
    assert [(r["train_flops"], r["train_flops_paper"]) for r in recs] == per_epoch
    fwd0 = sw.forward_flops(per_weight, dict(zip(names, counts)))
    assert recs[0]["train_flops"] == (2 * K + 3) * fwd0 * N_TRAIN  # IGQ's counts until the first event
    assert s["inference_flops"] == sw.forward_flops(per_weight, after[steps[-1]]) < fwd0


def check_fbplus_decisions(recs, updates, events, *, start, window, threshold):
    """Every topology update of an FB+ run pruned / grew extra exactly when the rule says so for the
    history recorded before its epoch (gap = train RA - val RA, val adversarial loss), and the events
    are those updates."""
    gaps = [r["train_ra"] - r["val_ra"] for r in recs]
    losses = [r["val_adv_loss"] for r in recs]
    fired = []
    for u in updates:
        e = u["epoch"]
        want = sw.fbplus_decision(gaps[:e], losses[:e], window=window, threshold=threshold) if e >= start else (
            False, False)
        assert (u["extra_prune"] > 0, u["extra_growth"] > 0) == want, u
        if any(want):
            fired.append(dict(epoch=e, step=u["step"], prune=want[0], grow=want[1]))
    assert events == fired


@pytest.mark.parametrize("arch", [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow) for a in sw.ARCHS])
def test_small_dense_width_is_the_nearest_weight_count(arch):
    """small_dense_width: no width gives a weight count nearer to the sparse model's active weights (a grid of
    widths that reaches every channel step, as a brute-force reference), for every architecture."""
    kw = dict(num_classes=10, in_channels=3, wrn_depth=10, wrn_widen=2)
    count = lambda w: sum(sw.weight_counts(sw.build_model(arch, width=w, **kw)).values())  # noqa: E731
    total = count(0.25)
    grid = {count(k / 2048): k / 2048 for k in range(1, 513)}  # steps of 1/2048 < 1/(2 x 512 channels)
    for sparsity in (0.3, 0.8, 0.95):
        target = round((1 - sparsity) * total)
        w = sw.small_dense_width(arch, sparsity, width=0.25, **kw)
        assert 0 < w <= 0.25 and abs(count(w) - target) == min(abs(c - target) for c in grid), (arch, sparsity, w)
    assert sw.small_dense_width("resnet18", 0.8, width=0.125, num_classes=10, in_channels=1) == 0.056  # the study's


def test_small_dense_end_to_end(capsys, tmp_path, data_dir):
    """--mode small-dense trains the dense network narrowed to a --sparsity model's weights: config.json keeps the
    base width and sparsity, summary.json the width chosen and both weight counts, FLOPs its own (and x full
    width); best.pt loads as that network (load_model and --eval, density 1)."""
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "small-dense", "--sparsity", 0.75))
    cfg, (recs, s) = json.loads((d / "config.json").read_text()), read_run(d)
    width = sw.small_dense_width("resnet18", 0.75, width=0.0625, num_classes=10, in_channels=1)
    net, full = smoke_model(width=width), smoke_model()
    own, base = (sum(sw.weight_counts(m).values()) for m in (net, full))
    assert (cfg["mode"], cfg["sparsity"], cfg["width"]) == ("small-dense", 0.75, 0.0625) and width < 0.0625
    assert s["method"] == "small dense AT" and s["width"] == width and s["active_weights"] == own
    assert s["matched_weights"] == round(0.25 * base) and abs(own - s["matched_weights"]) < 0.1 * own
    assert s["final_density"] == 1.0 and s["inference_ratio"] == 1.0 and all(r["density"] == 1.0 for r in recs)
    per_weight, full_weight = (sw.model_flops(m, (1, 28, 28))[0] for m in (net, full))
    assert s["inference_flops"] == sw.forward_flops(per_weight, sw.weight_counts(net))
    assert s["inference_ratio_full_width"] == s["inference_flops"] / sw.forward_flops(full_weight,
                                                                                      sw.weight_counts(full))
    loaded = sw.load_model(d)
    assert sum(sw.weight_counts(loaded).values()) == own and load_ck(d / "best.pt")["architecture"]["width"] == width
    assert sw.main(["--eval", str(d), "--attack", "pgd", *map(str, QUICK)]) == 0
    assert eval_json(d)["density"] == 1.0 and eval_json(d)["width"] == width


def test_static_end_to_end(static_run):
    recs, s, last, per_weight = check_common(static_run, "static", 2)
    net = smoke_model()
    total = sum(p.numel() for p in sw.prunable(net).values())
    # no early bird in 2 epochs (queue of 5): stage 1 stops at --eb-max-epochs 2
    assert s["ticket_epochs"] == 2 and len(s["early_bird_distances"]) == 2
    # each epoch's conv mask keeps exactly round(d x conv weights); the distance is theirs, and they moved
    convs = sum(p.numel() for p in sw.prunable(net).values() if p.dim() >= 3)
    early = last["method"]["early"]
    assert len(early["masks"]) == 2 and all(sum(int(m.sum()) for m in e.values()) == round(0.2 * convs)
                                             for e in early["masks"])
    assert s["early_bird_distances"] == early["distances"] == [1.0, sw.mask_distance(*early["masks"][::-1])]
    assert s["early_bird_distances"][1] > 0
    # global magnitude ticket: exactly round(d * total) weights over conv + linear
    target = round(0.2 * total) / total
    assert s["final_density"] == target and all(r["density"] == target for r in recs)
    assert s["topology_updates"] == 0 and s["fbplus_events"] == []
    # stage 1 is standard training (3x forward per image per step) at full density
    assert s["ticket_flops"] == 3 * s["inference_flops_dense"] * N_TRAIN * 2 > 0
    fwd = s["inference_flops"]
    for e, r in enumerate(recs, 1):
        assert r["train_flops"] == s["ticket_flops"] + (2 * K + 3) * fwd * N_TRAIN * e
    # the ratio to dense AT: all FLOPs (stage 1 too) over dense AT of the AT images only (paper convention)
    assert s["train_flops_dense_ratio"] == s["train_flops_paper"] / (3 * (K + 1) * s["inference_flops_dense"]
                                                                     * N_TRAIN * 2)
    assert s["inference_ratio"] == fwd / s["inference_flops_dense"] < 1
    # the ticket mask stays fixed: never-active weights stay out, ITOP = density
    assert all(r["itop"] == target for r in recs)


def test_channel_ticket_end_to_end(channel_run, capsys):
    """--ticket channel: stage 1 with the BN L1 penalty, a channel ticket, then AT of the physically thinner
    network, whose size, FLOPs and measured speed the run reports and whose checkpoints rebuild it."""
    recs, s, last, per_weight = check_common(channel_run, "static", 2)
    config = json.loads((channel_run / "config.json").read_text())
    assert (config["ticket"], config["bn_l1"], config["eb_threshold"]) == ("channel", 1e-4, 0.1)  # as used
    net = smoke_model()
    full_weights = sum(p.numel() for p in sw.prunable(net).values())
    thin_net = sw.slim(net, last["channels"])
    assert sw.load_model(channel_run).state_dict().keys() == thin_net.state_dict().keys()
    for ck in (last, load_ck(channel_run / "best.pt")):  # both checkpoints hold the thin weights and counts
        assert ck["channels"] == s["thin"]["channels"] and ck["mask"] is None
        assert all(v.shape == thin_net.state_dict()[k].shape for k, v in ck["model"].items())
    t = s["thin"]
    assert s["ticket"] == "channel" and sum(t["channels"].values()) == 60 and t["channel_sparsity"] == 0.5  # of 120
    weights = sum(p.numel() for p in sw.prunable(thin_net).values()) / full_weights
    assert s["final_density"] == t["weight_density"] == weights < 0.6 and all(r["density"] == weights for r in recs)
    assert t["params_ratio"] == sum(p.numel() for p in thin_net.parameters()) / sum(p.numel() for p in net.parameters())
    *_, thin_fwd = check_flops_against_counter(sw.load_model(channel_run), (1, 28, 28))  # FlopCounterMode agrees
    assert s["inference_flops"] == thin_fwd and t["flops_ratio"] == s["inference_ratio"] == thin_fwd / full_forward_flops(
        net, (1, 28, 28)) < 0.6
    # stage 1 at the full network (standard training), AT at the thin network's forward cost
    assert s["ticket_flops"] == 3 * s["inference_flops_dense"] * N_TRAIN * 2
    for e, r in enumerate(recs, 1):
        assert r["train_flops"] == s["ticket_flops"] + (2 * K + 3) * thin_fwd * N_TRAIN * e
    assert t["batch"] == 64 and all(t[k] > 0 for k in ("at_step_s", "at_step_dense_s", "inference_s", "inference_dense_s"))
    assert t["at_speedup"] == t["at_step_dense_s"] / t["at_step_s"]
    table = sw.format_table([s]).splitlines()  # the run's printed table says what the thin network measured
    assert len(table) == 4 and table[3] == f"Robust Bird: {sw.thin_line(t)}"


def test_channel_ticket_l1_penalty_reaches_stage_one_only(tmp_path, data_dir, monkeypatch):
    """The run calls before_update between backward and the optimizer step: the penalty moves the BN scales
    in stage 1 (--bn-l1 0 gives other scales), and AT steps call it too (a no-op there)."""
    monkeypatch.setattr(sw, "step_seconds", lambda *a, **k: (1.0, 1.0))  # timed in test_channel_ticket_end_to_end
    calls = []
    real = sw.RobustBird.before_update
    monkeypatch.setattr(sw.RobustBird, "before_update", lambda self: calls.append(self.pretraining) or real(self))
    a = run_ok(smoke(tmp_path / "a", data_dir, *CHANNEL, "--epochs", 1, "--eb-max-epochs", 1, "--bn-l1", 0.01))
    assert calls == [True] * 4 + [False] * 4  # 256 images in batches of 64: 4 steps per epoch
    b = run_ok(smoke(tmp_path / "b", data_dir, *CHANNEL, "--epochs", 1, "--eb-max-epochs", 1, "--bn-l1", 0))
    ga, gb = (load_ck(d / "last.pt")["run"]["thin"]["channels"] for d in (a, b))
    sa, sb = (load_ck(d / "last.pt")["model"]["layers.0.bn1.weight"] for d in (a, b))
    assert sum(ga.values()) == sum(gb.values()) == 60 and not torch.equal(sa, sb)


REGULARIZED = ["--loss", "trades", "--awp-gamma", 0.005, "--awp-warmup", 2, "--ema-decay", 0.9]  # AWP in epoch 2


@pytest.fixture(scope="module")
def regularized_run(tmp_path_factory, data_dir):
    """Flying Bird+ (adaptive rule firing) with TRADES, AWP from the second epoch and weight averaging; beside it,
    zeros.json: per weight-average update, whether its zeros contained the current mask's zeros."""
    base, seen = tmp_path_factory.mktemp("reg"), []
    real = sw.WeightAverage.update

    def update(self, model, masks=None):
        real(self, model, masks)
        weights = sw.prunable(self.model)
        seen.append(all(not weights[n][~m].any() for n, m in masks.items()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sw.WeightAverage, "update", update)
        d = run_ok(smoke(base / "run", data_dir, *FBPLUS, *REGULARIZED))
    (base / "zeros.json").write_text(json.dumps(seen))
    return d


def test_regularizers_end_to_end(regularized_run, data_dir):
    """TRADES + AWP + weight averaging on Flying Bird+: the average is as sparse as the mask at every step,
    it is what is evaluated, saved and loaded, and the FLOP ledger charges each part."""
    d = regularized_run
    recs, s, last, per_weight = check_common(d, "dynamic+", 3)
    seen = json.loads((d.parent / "zeros.json").read_text())
    # every AT step (4 per epoch) but the first, whose weights the average starts from: the mask's zeros are its zeros
    assert len(seen) == 3 * 4 - 1 and all(seen)
    assert s["objective"] == "TRADES (beta 6) + AWP (gamma 0.005 from epoch 2) + EMA (0.9)"
    assert s["topology_updates"] > 0 and s["fbplus_events"]  # the mask moved under the average
    best = load_ck(d / "best.pt")
    assert last["raw"] is not None and any(not torch.equal(last["raw"][k], last["model"][k]) for k in last["model"])
    for n, m in last["mask"]["masks"].items():  # the trained weights and their average, both masked
        assert not last["raw"][n][~m].any() and not last["model"][n][~m].any()
    net = sw.load_model(d)  # best.pt's average
    assert all(torch.equal(net.state_dict()[k], best["model"][k]) for k in best["model"])
    x, y = (t[:64] for t in sw.load_fashion_mnist(str(data_dir))["test"])  # the recorded SA is the average's
    assert 100 * (net(x.float() / 255).argmax(1) == y).float().mean().item() == recs[best["epoch"] - 1]["test_sa"]


def test_regularizers_charge_their_flops(tmp_path, data_dir):
    """Dense: epoch 1 TRADES without AWP (2K + 2 x 3 + 1 forward-equivalents), epoch 2 with AWP (2K + 4 x 3 + 1)."""
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--train-subset", 64, *REGULARIZED))
    recs, s = read_run(d)
    fwd = s["inference_flops_dense"]
    assert recs[0]["train_flops"] == (2 * K + 7) * fwd * 64
    assert recs[1]["train_flops"] - recs[0]["train_flops"] == (2 * K + 13) * fwd * 64
    assert recs[1]["train_flops_paper"] == (3 * (K + 2) + 1 + 3 * (K + 4) + 1) * fwd * 64
    plain = run_ok(smoke(tmp_path / "plain", data_dir, "--mode", "dense", "--train-subset", 64, "--ema-decay", 0.9))
    assert read_run(plain)[0][1]["train_flops"] == 2 * (2 * K + 3) * fwd * 64  # averaging: not charged


def test_training_loss_falls(tmp_path, data_dir):
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--epochs", 3, "--train-steps", 1,
                     "--lr", 0.05, "--width", 0.125, "--train-subset", 256, "--milestones", 10))
    recs, s = read_run(d)
    losses = [r["train_loss"] for r in recs]
    assert losses[-1] < losses[0] - 0.1, losses
    assert s["train_flops_paper"] * 5 == s["train_flops"] * 6  # PGD-1: 3 x 2 vs 2 + 3


def test_train_reads_the_right_split_for_each_use(tmp_path, data_dir, monkeypatch):
    """train() with evaluate() scripted per split: every record holds what its split returned, best.pt is
    the first epoch of highest *validation* RA, RA best / final are that epoch's and the last epoch's test
    RA, the robust gap is measured on training images, and FB+ records gap = train RA - val RA and the val
    adversarial loss (not the clean one)."""
    data = sw.load_fashion_mnist(str(data_dir))
    images = {"val": data["val"][0][:32], "test": data["test"][0][:32], "gap": data["train"][0][:48]}
    ra = {"val": [10.0, 30.0, 30.0], "test": [50.0, 20.0, 40.0], "gap": [77.0]}
    calls = []

    def scripted(model, batches, **kw):
        split = next(k for k, x in images.items() if torch.equal(batches.x.cpu(), x))
        i = calls.count(split)
        calls.append(split)
        return dict(sa=ra[split][i] + 1, ra=ra[split][i], loss=1.0 + i, adv_loss=2.0 - i / 4)
    monkeypatch.setattr(sw, "evaluate", scripted)
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic+", "--epochs", 3, "--train-subset", 64,
                     "--train-steps", 1, "--eval-subset", 32, "--gap-subset", 48))
    recs, s = read_run(d)
    assert calls == ["val", "test"] * 3 + ["gap"]
    assert [(r["val_ra"], r["val_sa"], r["val_adv_loss"]) for r in recs] == [(v, v + 1, 2.0 - i / 4) for i, v in
                                                                             enumerate(ra["val"])]
    assert [(r["test_ra"], r["test_sa"]) for r in recs] == [(t, t + 1) for t in ra["test"]]
    assert s["best_epoch"] == 2 and load_ck(d / "best.pt")["epoch"] == 2 and load_ck(d / "best.pt")["val_ra"] == 30
    assert (s["ra_best"], s["sa_best"], s["ra_final"]) == (20.0, 21.0, 40.0)
    assert (s["train_ra_final"], s["robust_gap"]) == (77.0, 37.0)
    method = load_ck(d / "last.pt")["method"]
    assert method["gaps"] == [r["train_ra"] - v for r, v in zip(recs, ra["val"])]
    assert method["losses"] == [2.0, 1.75, 1.5]


def test_train_and_eval_attacks_use_their_own_budgets(tmp_path, data_dir, monkeypatch):
    """--train-eps / --train-alpha / --train-steps reach the training attack (model in train mode) and
    --test-eps / --test-steps the evaluation attack (eval mode, step eps / 4), each and only each."""
    seen, real = set(), sw.pgd

    def spy(model, x, y, *, eps, alpha, steps, **kw):
        seen.add((model.training, round(eps * 255, 9), round(alpha * 255, 9), steps))
        return real(model, x, y, eps=eps, alpha=alpha, steps=steps, **kw)
    monkeypatch.setattr(sw, "pgd", spy)
    run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--epochs", 1, "--train-subset", 64,
                 "--eval-subset", 32, "--gap-subset", 32, "--train-eps", 16, "--train-alpha", 5, "--train-steps", 1,
                 "--test-eps", 4, "--test-steps", 3))
    assert seen == {(True, 16.0, 5.0, 1), (False, 4.0, 1.0, 3)}


def test_dynamic_sparse_standard_training_updates_topology(tmp_path, data_dir):
    """Flying Bird without an attack (--train-steps 0) still prunes and regrows on schedule."""
    run = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--train-steps", 0, "--epochs", 1))
    _, summary = read_run(run)
    steps = update_steps(1, N_TRAIN // 64, 2, 3)  # one epoch: all of it is the "late" half, T = 3
    assert summary["topology_updates"] == len(steps) == 1 and summary["itop_rate"] > summary["final_density"]


def test_robust_bird_default_milestones_are_the_released_50_150(tmp_path, data_dir):
    """RB's AT stage reuses stage 1's schedule in the released code (x0.1 at 50 and 150): its default;
    the others keep the paper's 100 and 150; an explicit --milestones wins; config and summary record them."""
    assert sw.parse_args([]).milestones == ()  # "the method's default"
    assert (sw.Dense.milestones, sw.FlyingBird.milestones, sw.FlyingBirdPlus.milestones) == ((100, 150),) * 3
    assert sw.RobustBird.milestones == (50, 150)
    cfg = dataclasses.replace(sw.parse_args(smoke(tmp_path / "rb", data_dir, "--mode", "static", "--epochs", 1,
                                                  "--eb-max-epochs", 1, "--train-subset", 64)), milestones=())
    s = sw.train(cfg, log=lambda *a: None)
    assert s["milestones"] == [50, 150] == json.loads((tmp_path / "rb" / "config.json").read_text())["milestones"]
    assert list(load_ck(tmp_path / "rb" / "last.pt")["scheduler"]["milestones"]) == [50, 150]
    s = sw.train(dataclasses.replace(cfg, out=str(tmp_path / "rb2"), milestones=(7,)), log=lambda *a: None)
    assert s["milestones"] == [7]


def test_fbplus_with_erk_keeps_its_dense_layers_dense(tmp_path, data_dir):
    """ERK makes small layers dense; FB+'s extra pruning (fired here at every late update) leaves them full."""
    d = run_ok(smoke(tmp_path / "run", data_dir, *FBPLUS, "--allocation", "erk"))
    net = smoke_model()
    shapes = [tuple(p.shape) for p in sw.prunable(net).values()]
    counts = sw.allocate_counts(shapes, 0.2, "erk")
    full = [n for n, k, s in zip(sw.prunable(net), counts, shapes) if k == math.prod(s)]
    assert len(full) >= 2  # the stem conv and the linear among them
    masks = load_ck(d / "last.pt")["mask"]["masks"]
    assert all(bool(masks[n].all()) for n in full)
    _, s = read_run(d)
    assert s["fbplus_events"] and s["final_density"] < 0.2  # extra pruning did fire, elsewhere


def test_evaluation_attacks_run_in_fp32_under_amp(tmp_path, data_dir, monkeypatch):
    """--amp trains under bf16 autocast; every evaluation attack (val, test, the gap) runs in fp32."""
    seen, real = [], sw.pgd

    def spy(model, x, y, **kw):
        seen.append((model.training, torch.is_autocast_enabled("cpu")))
        return real(model, x, y, **kw)
    monkeypatch.setattr(sw, "pgd", spy)
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--epochs", 1, "--train-subset", 64, "--amp"))
    train_calls = [amp for training, amp in seen if training]
    eval_calls = [amp for training, amp in seen if not training]
    assert train_calls and all(train_calls)  # the training attack did run under bf16
    assert len(eval_calls) == 3 and not any(eval_calls)  # val, test, gap: fp32
    # and the recorded evaluation equals an fp32 one of the same weights (clean accuracy: no random start)
    recs, s = read_run(d)
    net = sw.load_model(d / "last.pt")
    x, y = sw.subsets(sw.parse_args(smoke(d, data_dir)), sw.load_data(sw.parse_args(smoke(d, data_dir))))["test"]
    ev = sw.evaluate(net, sw.Batches(x, y, batch_size=256), eps=0.1, alpha=0.025, steps=0)
    assert ev["sa"] == recs[-1]["test_sa"]


def test_fgsm_rs_training_charges_one_attack_step(tmp_path, data_dir):
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--train-attack", "fgsm-rs", "--epochs", 1))
    recs, s = read_run(d)
    fwd = s["inference_flops_dense"]
    assert s["train_flops"] == 5 * fwd * N_TRAIN  # one attack step (2x) + update (3x)
    assert s["train_flops_paper"] == 6 * fwd * N_TRAIN and s["train_flops_dense_ratio"] == 1.0
    assert json.loads((d / "config.json").read_text())["train_attack"] == "fgsm-rs"


@pytest.mark.parametrize("ticket_attack, per_image", [("fgsm-rs", 5), pytest.param("pgd", 2 * K + 3,
                                                                                  marks=pytest.mark.slow)])
def test_ticket_attack_of_robust_bird_stage_one(tmp_path, data_dir, static_run, ticket_attack, per_image):
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "static", "--epochs", 1, "--ticket-attack", ticket_attack))
    s = read_run(d)[1]
    assert s["ticket_epochs"] == 2  # --eb-max-epochs 2 of the smoke preset
    assert s["ticket_flops"] == per_image * s["inference_flops_dense"] * N_TRAIN * 2
    assert read_run(static_run)[1]["ticket_flops"] == 3 * s["inference_flops_dense"] * N_TRAIN * 2  # default: none


def test_no_augment_trains_on_the_images_as_they_are(tmp_path, data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(sw, "augment", lambda x, **kw: calls.append(len(x)) or x)
    run_ok(smoke(tmp_path / "a", data_dir, "--mode", "dense", "--epochs", 1, "--train-subset", 64))
    assert sum(calls) == 64  # the default augments every training image
    calls.clear()
    seen, real = [], sw.pgd
    monkeypatch.setattr(sw, "pgd", lambda model, x, y, **kw: (seen.append(x.clone()) if model.training else None)
                        or real(model, x, y, **kw))
    run_ok(smoke(tmp_path / "b", data_dir, "--mode", "dense", "--epochs", 1, "--train-subset", 64, "--no-augment"))
    assert calls == [] and json.loads((tmp_path / "b" / "config.json").read_text())["augment"] is False
    cfg = sw.parse_args(smoke(tmp_path / "b", data_dir, "--train-subset", 64))
    x = sw.subsets(cfg, sw.load_data(cfg))["train"][0].float() / 255
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert all(tuple(r.flatten().tolist()) in rows for b in seen for r in b)  # every attacked batch: raw images


def test_eval_every_evaluates_every_n_epochs_and_the_last(tmp_path, data_dir, monkeypatch):
    ends = []
    real = sw.FlyingBirdPlus.end_epoch
    monkeypatch.setattr(sw.FlyingBirdPlus, "end_epoch",
                        lambda self, ra, val: ends.append(val["ra"]) or real(self, ra, val))
    d = run_ok(smoke(tmp_path / "run", data_dir, *FBPLUS[:4], "--epochs", 5, "--eval-every", 2, "--train-subset", 64))
    recs, s = read_run(d)
    evaluated = [r["epoch"] for r in recs if r["val_ra"] is not None]
    assert evaluated == [2, 4, 5]  # every 2nd epoch and the last
    assert all(r["test_ra"] is None and r["val_sa"] is None for r in recs if r["epoch"] not in evaluated)
    assert s["best_epoch"] in evaluated and ends == [recs[e - 1]["val_ra"] for e in evaluated]
    best = max(evaluated, key=lambda e: (recs[e - 1]["val_ra"], -e))
    assert s["best_epoch"] == best and load_ck(d / "best.pt")["epoch"] == best
    assert "not evaluated" in sw.epoch_line(recs[0], 5)


def test_cli_says_in_one_line_when_no_topology_update_would_happen(capsys, tmp_path, data_dir):
    run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--epochs", 1, "--update-interval-late", 5))
    lines = [line for line in capsys.readouterr().out.splitlines() if "topology update" in line]
    assert lines == ["warning: Flying Bird: no topology update in 4 steps (T = 2, then 5): the mask stays as "
                     "drawn; choose shorter intervals"]  # one epoch: all of it is the late half


# ----------------------------------------------------------------------------- 5. resume

def assert_same_run(a: Path, b: Path):
    ra, sa = read_run(a)
    rb, sb = read_run(b)
    assert strip(ra) == strip(rb)
    assert strip(sa) == strip(sb)
    ma, mb = load_ck(a / "last.pt"), load_ck(b / "last.pt")
    for k in ma["model"]:
        assert torch.equal(ma["model"][k], mb["model"][k]), k
    if ma["mask"] is not None:
        for k in ma["mask"]["masks"]:
            assert torch.equal(ma["mask"]["masks"][k], mb["mask"]["masks"][k])
            assert torch.equal(ma["mask"]["ever_active"][k], mb["mask"]["ever_active"][k])
    assert strip(ma["run"]["updates"]) == strip(mb["run"]["updates"])


def test_resume_fbplus_equivalent(tmp_path, data_dir, fbplus_run):
    args = smoke(tmp_path / "run", data_dir, *FBPLUS)
    d = run_ok(args + ["--stop-after-epoch", 1])
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1] and not (d / "summary.json").exists()
    assert load_ck(d / "last.pt")["run"]["epoch"] == 1
    run_ok(args + ["--resume"])
    assert_same_run(fbplus_run, d)


def test_resume_static_equivalent(tmp_path, data_dir, static_run, monkeypatch, capsys):
    # interrupt during stage 1 (Ctrl-C in the 2nd ticket epoch): last.pt holds ticket epoch 1
    args = smoke(tmp_path / "run", data_dir, "--mode", "static")
    record = sw.EarlyBird.record

    def interrupt(self, model):
        if len(self.distances) == 1:
            raise KeyboardInterrupt
        return record(self, model)
    with monkeypatch.context() as m:
        m.setattr(sw.EarlyBird, "record", interrupt)
        assert sw.main(args) == 130
    assert "--resume" in capsys.readouterr().err
    ck = load_ck(tmp_path / "run" / "last.pt")
    assert ck["method"]["pretraining"] and ck["method"]["ticket_epochs"] == 1
    # resume, stop after the first adversarial epoch, resume again
    assert sw.main(args + ["--resume", "--stop-after-epoch", "1"]) == 0
    assert not load_ck(tmp_path / "run" / "last.pt")["method"]["pretraining"]
    run_ok(args + ["--resume"])
    assert_same_run(static_run, tmp_path / "run")


def test_resume_channel_ticket_equivalent(tmp_path, data_dir, channel_run, capsys, monkeypatch):
    """Stopped after the first AT epoch, the thin network is rebuilt from last.pt and trains on identically."""
    monkeypatch.setattr(sw, "step_seconds", lambda *a, **k: (1.0, 1.0))  # timed in test_channel_ticket_end_to_end
    args = smoke(tmp_path / "run", data_dir, *CHANNEL)
    assert sw.main(args + ["--stop-after-epoch", "1"]) == 0
    out = capsys.readouterr().out
    thin = load_ck(tmp_path / "run" / "last.pt")["run"]["thin"]
    assert sw.thin_line(thin) in out and "channel ticket: 0.500 of the prunable channels removed" in out
    run_ok(args + ["--resume"])
    assert_same_run(channel_run, tmp_path / "run")
    assert load_ck(tmp_path / "run" / "last.pt")["run"]["thin"] == thin  # measured once, at adoption


def test_resume_regularized_equivalent(tmp_path, data_dir, regularized_run):
    """TRADES + AWP + weight averaging, stopped after epoch 1 (AWP not yet on) and after epoch 2: the raw
    weights and the average come back from last.pt, and the run ends identical."""
    args = smoke(tmp_path / "run", data_dir, *FBPLUS, *REGULARIZED)
    run_ok(args + ["--stop-after-epoch", 1])
    run_ok(args + ["--resume", "--stop-after-epoch", 2])
    run_ok(args + ["--resume"])
    assert_same_run(regularized_run, tmp_path / "run")
    ra, rb = load_ck(regularized_run / "last.pt")["raw"], load_ck(tmp_path / "run" / "last.pt")["raw"]
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_resume_a_checkpoint_older_than_an_option(tmp_path, data_dir):
    """A key missing from an old checkpoint's config means that option's default: the run resumes."""
    args = smoke(tmp_path / "run", data_dir, "--mode", "dense", "--train-subset", 64)
    run_ok(args + ["--stop-after-epoch", 1])
    ck = load_ck(tmp_path / "run" / "last.pt")
    for k in ("augment", "eval_every"):
        del ck["config"][k]
    torch.save(ck, tmp_path / "run" / "last.pt")
    run_ok(args + ["--resume"])
    assert len(read_run(tmp_path / "run")[0]) == 2


def test_cli_resume_without_checkpoint(capsys, tmp_path):
    assert_cli_error(capsys, ["--preset", "smoke", "--resume", "--out", tmp_path / "run"], "--resume", "last.pt")


def test_cli_resume_unreadable_checkpoint(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert_cli_error(capsys, smoke(run, data_dir, "--resume"), "last.pt", "not a sparse_win checkpoint")
    assert (run / "last.pt").read_bytes() == b"not a checkpoint"


def test_cli_resume_other_config(capsys, tmp_path, data_dir, dense_run):
    # dense_run was written with --sparsity 0.8 (the default); resuming it with 0.5 must refuse
    d = tmp_path / "run"
    shutil.copytree(dense_run, d)
    before = snapshot(d)
    args = smoke(d, data_dir, "--mode", "dense", "--train-steps", 10, "--train-subset", 64)
    assert_cli_error(capsys, args + ["--resume", "--sparsity", "0.5"], "sparsity", "0.8", "0.5")
    assert snapshot(d) == before


def test_cli_existing_run_without_resume(capsys, tmp_path, data_dir, dense_run):
    d = tmp_path / "run"
    shutil.copytree(dense_run, d)
    before = snapshot(d)
    args = smoke(d, data_dir, "--mode", "dense", "--train-steps", 10, "--train-subset", 64)
    assert_cli_error(capsys, args, "already holds a run", "--resume")
    assert snapshot(d) == before
    # a run stopped early (no summary yet) is protected the same way
    (d / "summary.json").unlink()
    before = snapshot(d)
    assert_cli_error(capsys, args, "already holds a run")
    assert snapshot(d) == before


def test_run_killed_before_first_checkpoint_can_start_again(tmp_path, data_dir):
    """metrics.jsonl without last.pt (killed in epoch 1): nothing to resume, so a new run may start."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    run_ok(smoke(run, data_dir, "--epochs", 1, "--train-subset", 64))
    assert len(read_run(run)[0]) == 1


# ----------------------------------------------------------------------------- 6. never lose a run

def test_strict_json_writes_null_for_non_finite():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": 2, "e": "nan", "f": (True, None),
           1: "x"}
    assert strict_loads(sw.strict_json(obj)) == {"a": None, "b": [1.5, None, {"c": None}], "d": 2, "e": "nan",
                                                 "f": [True, None], "1": "x"}
    with pytest.raises(ValueError):
        strict_loads(json.dumps(obj))  # the plain json module writes NaN: the bug this guards against


def poison_after(monkeypatch, step: int):
    """Make the weights infinite after optimizer step `step`, so the loss of the next step is not finite."""
    real = torch.optim.SGD.step
    calls = []

    def step_then_poison(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.SGD, "step", step_then_poison)


def test_divergence_stops_the_run_and_keeps_the_last_good_epoch(capsys, tmp_path, data_dir, monkeypatch):
    steps = N_TRAIN // 64  # 4 steps per epoch
    poison_after(monkeypatch, steps + 1)  # the loss of epoch 2, step 2 is nan
    args = smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--epochs", 3)
    capsys.readouterr()
    assert sw.main(args) == sw.DIVERGED == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "diverged" in err[0] and f"epoch 2, step 2/{steps}" in err[0] and "--lr" in err[0], err
    d = tmp_path / "run"
    assert not list(d.glob("*.tmp")) and not (d / "summary.json").exists()
    recs = [strict_loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1]
    last, best = load_ck(d / "last.pt"), load_ck(d / "best.pt")
    assert last["run"]["epoch"] == best["epoch"] == 1 and last["run"]["partial"] is None
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert last["ledger"]["steps"] == steps


def test_divergence_with_a_huge_lr_is_one_line_and_strict_json(tmp_path, data_dir, capsys):
    """The reported case: `--lr 1e8` used to train on with loss nan and write NaN into metrics.jsonl."""
    assert sw.main(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--lr", "1e8", "--epochs", 2)) == sw.DIVERGED
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse_win.py: error: training diverged") and "1e+08" in lines[0]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)


# Every kind of file a run writes, and when it is written: a failed write gives one line and exit 74,
# removes its .tmp, keeps the previous version, and the run continues identically once there is space.
WRITES = ["config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png"]
IO_ARGS = ["--mode", "dynamic", "--epochs", 2, "--train-steps", 1, "--test-steps", 1]


class FullDisk(io.RawIOBase):
    """A file opened for writing on a full disk: every write raises ENOSPC."""

    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_for(name: str):
    real = open

    def fake_open(path, mode="r", *a, **kw):
        if Path(path).name == name + ".tmp" and "w" in mode:
            real(path, mode, *a, **kw).close()  # the .tmp is created, then the disk is full
            return FullDisk()
        return real(path, mode, *a, **kw)
    return fake_open


@pytest.fixture(scope="module")
def io_runs(tmp_path_factory, data_dir):
    """An uninterrupted run, and one stopped after epoch 1 (the previous versions of every file)."""
    base = tmp_path_factory.mktemp("io")
    full = run_ok(smoke(base / "full", data_dir, *IO_ARGS))
    run_ok(smoke(base / "half", data_dir, *IO_ARGS, "--stop-after-epoch", 1))
    return full, base / "half"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("metrics.jsonl", "curves.png")
                                  else n for n in WRITES + ["torch.save"]])
def test_io_error_is_one_line_and_loses_nothing(capsys, tmp_path, data_dir, monkeypatch, io_runs, name):
    import errno as errno_mod
    full, half = io_runs
    d = tmp_path / "run"
    shutil.copytree(half, d)
    if name == "best.pt":  # make the resumed epoch 2 write best.pt for sure
        ck = load_ck(d / "last.pt")
        ck["run"]["best_val_ra"] = -1.0
        torch.save(ck, d / "last.pt")
    before = snapshot(d)
    with monkeypatch.context() as m:
        if name == "torch.save":
            def no_space(*a, **kw):
                raise OSError(errno_mod.ENOSPC, "No space left on device")
            m.setattr(torch, "save", no_space)
        else:
            m.setattr(sw, "open", full_disk_for(name), raising=False)
        capsys.readouterr()
        assert sw.main(smoke(d, data_dir, *IO_ARGS, "--resume")) == sw.IO_ERROR == 74
    err = capsys.readouterr().err.splitlines()
    target = "last.pt" if name == "torch.save" else name
    assert len(err) == 1 and f"cannot write {d / target}: No space left on device [ENOSPC]" in err[0], err
    assert "Traceback" not in err[0] and "--resume" in err[0]
    assert not list(d.glob("*.tmp"))
    after = snapshot(d)
    for f, data in before.items():  # the failed file and everything written before it: intact or newer
        if f == target or f in ("config.json", "metrics.jsonl") and WRITES.index(target) <= 1:
            assert after[f] == data, f
    assert target not in after or target in before
    # once there is space, --resume finishes the run as if nothing had happened
    run_ok(smoke(d, data_dir, *IO_ARGS, "--resume"))
    if name == "best.pt":  # its best epoch was moved on purpose; the training itself is the same
        assert strip(read_run(full)[0]) == strip(read_run(d)[0])
    else:
        assert_same_run(full, d)


def sigterm_at_pgd_call(monkeypatch, k: int, sig=signal.SIGTERM):
    """Send this process SIGTERM (or sig) from inside the k-th training PGD call (mid-step, as a scheduler would)."""
    real, calls = sw.pgd, []

    def pgd(model, *a, **kw):
        if model.training:
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), sig)
        return real(model, *a, **kw)
    monkeypatch.setattr(sw, "pgd", pgd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_mid_epoch_then_the_same_command_is_identical(capsys, tmp_path, data_dir, monkeypatch, fbplus_run,
                                                                  sig):
    """SIGTERM (torchrun, Kubernetes) or SIGUSR1 (Slurm's --signal): stop after the step in flight with last.pt
    written, exit 143; the same command (--resume auto) continues to the records of an uninterrupted run."""
    args = smoke(tmp_path / "run", data_dir, *FBPLUS, "--resume", "auto")
    steps = N_TRAIN // 64
    with monkeypatch.context() as m:
        sigterm_at_pgd_call(m, steps + 3, sig)  # epoch 2, step 3
        capsys.readouterr()
        assert sw.main(args) == sw.TERMINATED == 143
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and sig.name in err[0] and f"epoch 2, step 3/{steps}" in err[0] and "--resume" in err[0]
    assert signal.getsignal(sig) is signal.SIG_DFL  # the handler is removed again
    ck = load_ck(tmp_path / "run" / "last.pt")
    assert ck["run"]["epoch"] == 1 and ck["run"]["partial"]["step"] == 3 and ck["ledger"]["steps"] == steps + 3
    run_ok(args)
    assert f"continuing {tmp_path / 'run'} at epoch 1, step 3" in capsys.readouterr().out
    assert_same_run(fbplus_run, tmp_path / "run")


def test_resume_of_a_last_pt_that_recorded_defaults_unresolved(capsys, tmp_path, data_dir):
    """A last.pt written before config.json held the values used (eps -1, amp None, FB+'s start -1) resumes: both
    sides are resolved before they are compared; an option that differs in value is still refused."""
    args = smoke(tmp_path / "run", data_dir, "--mode", "dynamic+")
    assert sw.main(args + ["--stop-after-epoch", "1"]) == 0
    ck = load_ck(tmp_path / "run" / "last.pt")
    assert (ck["config"]["train_eps"], ck["config"]["fbplus_start"], ck["config"]["amp"]) == (25.5, 1, False)
    ck["config"].update(train_eps=-1.0, train_alpha=-1.0, test_eps=-1.0, test_alpha=-1.0, fbplus_start=-1,
                        eb_threshold=-1.0, amp=None, channels_last=None)
    torch.save(ck, tmp_path / "run" / "last.pt")
    assert_cli_error(capsys, args + ["--resume", "--train-eps", "20"], "another config (train_eps: 25.5, now 20.0)")
    assert_cli_error(capsys, args + ["--resume", "--fbplus-start", "0"], "another config (fbplus_start: 1, now 0)")
    run_ok(args + ["--resume"])
    assert len(read_run(tmp_path / "run")[0]) == 2


def test_resume_auto_starts_continues_finishes_and_refuses(capsys, tmp_path, data_dir, dynamic_run):
    """--resume auto: an empty folder starts; a stopped run continues (to the uninterrupted run's records); a
    finished one says so and exits 0 writing nothing; another configuration's run or an unreadable last.pt is
    refused in one line, as --resume refuses them."""
    d, out = tmp_path / "run", lambda: capsys.readouterr().out  # noqa: E731
    args = smoke(d, data_dir, "--mode", "dynamic", "--resume", "auto")
    run_ok(args + ["--stop-after-epoch", 1])
    assert f"starting {d}" in out()
    run_ok(args)
    assert f"continuing {d} at epoch 1" in out()
    assert_same_run(dynamic_run, d)
    before = snapshot(d)
    assert sw.main(args) == 0 and out() == f"finished: {d / 'summary.json'} is there; nothing to do\n"
    assert snapshot(d) == before
    assert_cli_error(capsys, smoke(d, data_dir, "--mode", "dense", "--resume", "auto"), "another config",
                     "mode: 'dynamic', now 'dense'")
    (d / "summary.json").unlink()
    (d / "last.pt").write_bytes(b"torn")
    assert_cli_error(capsys, args, "last.pt is not a sparse_win checkpoint")
    assert (d / "last.pt").read_bytes() == b"torn"


def test_checkpoint_every_bounds_the_loss_of_a_kill(capsys, tmp_path, data_dir, monkeypatch, fbplus_run):
    """A kill (here: an exception in step 7, no handler runs) loses only the steps since the last
    --checkpoint-every checkpoint, and the resumed run is identical to an uninterrupted one."""
    args = smoke(tmp_path / "run", data_dir, *FBPLUS, "--checkpoint-every", 3)
    real, calls = sw.pgd, []

    def killed(model, *a, **kw):
        if model.training:
            calls.append(1)
            if len(calls) == 7:
                raise KeyboardInterrupt
        return real(model, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(sw, "pgd", killed)
        assert sw.main(args) == sw.INTERRUPTED
    ck = load_ck(tmp_path / "run" / "last.pt")
    assert ck["ledger"]["steps"] == 6 and ck["run"]["partial"]["step"] == 6 - N_TRAIN // 64
    run_ok(args + ["--resume"])
    assert_same_run(fbplus_run, tmp_path / "run")


@pytest.mark.slow  # test_stop_signal_mid_epoch_then_the_same_command_is_identical raises the signal in-process
def test_sigterm_from_outside_stops_the_cli_with_143(tmp_path, data_dir):
    # unbuffered: a pipe makes the child's stdout block-buffered, and the "epoch 1" line would arrive
    # (and the signal be sent) only when some 50 epochs had filled the buffer
    proc = subprocess.Popen([sys.executable, "-u", "sparse_win.py", *smoke(tmp_path / "run", data_dir, "--mode",
                                                                           "dense", "--epochs", 200,
                                                                           "--train-subset", 64)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(ONE_THREAD, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:  # wait for the first finished epoch
        if line.startswith("epoch   1/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert len(err.splitlines()) == 1 and "stopped by SIGTERM" in err and "--resume" in err
    ck = load_ck(tmp_path / "run" / "last.pt")
    assert 1 <= ck["run"]["epoch"] < 200
    assert not list((tmp_path / "run").glob("*.tmp"))


# ----------------------------------------------------------------------------- 7. run directories and checkpoints

def test_cli_unwritable_out(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_cli_error(capsys, ["--preset", "smoke", "--out", tmp_path / "file" / "sub"], "cannot write", "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_one_training_process_per_run_directory_and_no_stale_lock_after_a_kill(tmp_path, data_dir, capsys):
    """One writer per run directory: a resume typed while the run still trains exits 2, naming its pid;
    after a SIGKILL (no handler runs, the kernel drops the lock) the same resume continues the run."""
    args = smoke(tmp_path / "run", data_dir, "--mode", "dense", "--epochs", 500, "--train-subset", 64)
    first = subprocess.Popen([sys.executable, "sparse_win.py", *args], cwd=HERE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        wait_for(tmp_path / "run" / "last.pt", first)
        second = subprocess.run([sys.executable, "sparse_win.py", *args, "--resume"], cwd=HERE, capture_output=True,
                                text=True, timeout=300, env=ONE_THREAD)
        assert first.poll() is None  # the refusal came while the first one was still training
        assert second.returncode == 2 and len(second.stderr.splitlines()) == 1, second.stderr
        assert "in use by another training process" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    assert (tmp_path / "run" / ".lock").exists()  # left behind, but no longer locked:
    epoch = load_ck(tmp_path / "run" / "last.pt")["run"]["epoch"]
    capsys.readouterr()
    assert sw.main(args + ["--resume", "--stop-after-epoch", str(epoch + 1)]) == 0
    assert f"continuing {tmp_path / 'run'} at epoch {epoch}" in capsys.readouterr().out
    assert load_ck(tmp_path / "run" / "last.pt")["run"]["epoch"] == epoch + 1


@pytest.mark.parametrize("how", ["resume", "eval"])
def test_checkpoint_with_code_is_refused(capsys, tmp_path, data_dir, dense_run, how):
    """Checkpoints are read with weights_only=True: a pickled callable is refused, never run."""
    d = tmp_path / "run"
    shutil.copytree(dense_run, d)
    for name in ("last.pt", "best.pt"):
        ck = load_ck(d / name)
        ck["evil"] = os.getcwd  # a global the weights-only unpickler does not allow
        torch.save(ck, d / name)
    before = snapshot(d)
    args = (smoke(d, data_dir, "--mode", "dense", "--train-steps", 10, "--train-subset", 64, "--resume")
            if how == "resume" else ["--eval", d / "best.pt", "--attack", "pgd"])
    assert_cli_error(capsys, args, "not a sparse_win checkpoint", "UnpicklingError")
    assert snapshot(d) == before


def test_checkpoints_load_weights_only(dense_run, static_run, fbplus_run):
    for d in (dense_run, static_run, fbplus_run):
        for name in ("last.pt", "best.pt"):
            torch.load(d / name, map_location="cpu", weights_only=True)  # raises on anything but data


def test_checkpoints_of_formats_1_and_2_still_load_and_newer_ones_are_refused(capsys, tmp_path, data_dir, fbplus_run):
    """Format 3 adds build_model's arguments ('architecture'); format 2 has a 'format' key and the mask once;
    format 1 neither (last.pt's mask also under 'method'). Older checkpoints load in --eval and --resume; the
    library's load_model (no dataset table) reads them given architecture= and refuses them in one line
    otherwise."""
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for fmt in (1, 2):
        d = copy_run(fbplus_run, tmp_path / f"run{fmt}")
        for name in ("best.pt", "last.pt"):
            ck = load_ck(d / name)
            assert ck["format"] == sw.CHECKPOINT_FORMAT == 3 and "mask" not in ck.get("method", {})
            arch = ck.pop("architecture")
            old = dict(ck, format=2) if fmt == 2 else {k: v for k, v in ck.items() if k != "format"}
            if fmt == 1 and "method" in old:
                old["method"] = dict(old["method"], mask=old["mask"])
            torch.save(old, d / name)
        with pytest.raises(sw.SparseWinError, match=f"checkpoint format {fmt} does not record its architecture"):
            sw.load_model(d)
        assert torch.equal(sw.load_model(d, architecture=arch)(x), sw.load_model(fbplus_run)(x))
        assert sw.main(["--eval", str(d / "last.pt"), "--attack", "pgd", *map(str, QUICK)]) == 0
        assert eval_json(d)["epoch"] == 3
        (d / "summary.json").unlink()
        assert sw.main(smoke(d, data_dir, *FBPLUS, "--resume")) == 0  # finished: only the final evaluation runs again
        assert strip(read_run(d)) == strip(read_run(fbplus_run))  # FB+'s history and events restored
    ck = load_ck(d / "best.pt")
    torch.save(dict(ck, format=4), d / "best.pt")
    assert_cli_error(capsys, ["--eval", d, "--attack", "pgd"], "best.pt was written by a newer sparse_win",
                     "checkpoint format 4")


# ----------------------------------------------------------------------------- 8. the fast path on the CPU

def check_fast_run(d: Path, channels_last: bool):
    """Masks exact, masked weights and their momentum zero, losses finite, layout as asked."""
    recs, summary = read_run(d)
    assert all(math.isfinite(r["train_loss"]) for r in recs)
    ck = load_ck(d / "last.pt")
    momentum_of = dict(zip(ck["model"], [None] * len(ck["model"])))
    names = [n for n, _ in smoke_model().named_parameters()]
    for i, n in enumerate(names):
        momentum_of[n] = ck["optimizer"]["state"].get(i, {}).get("momentum_buffer")
    masks = ck["mask"]["masks"]
    assert sum(int(m.sum()) for m in masks.values()) == round(summary["final_density"] * sum(m.numel() for m in
                                                                                              masks.values()))
    for n, m in masks.items():
        w = ck["model"][n]
        assert not w[~m].any() and not momentum_of[n][~m].any(), n
        if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] > 1:
            assert w.is_contiguous(memory_format=torch.channels_last) == channels_last, n


@pytest.mark.parametrize("amp, channels_last", [pytest.param(True, False, marks=pytest.mark.slow),
                                                pytest.param(False, True, marks=pytest.mark.slow), (True, True)])
def test_fast_path_on_cpu(tmp_path, data_dir, amp, channels_last):
    flags = ["--amp" if amp else "--no-amp", "--channels-last" if channels_last else "--no-channels-last"]
    args = smoke(tmp_path / "run", data_dir, "--mode", "dynamic", *flags)
    d = run_ok(args)
    check_fast_run(d, channels_last)
    run_ok(smoke(tmp_path / "half", data_dir, "--mode", "dynamic", *flags, "--stop-after-epoch", 1))
    run_ok(smoke(tmp_path / "half", data_dir, "--mode", "dynamic", *flags, "--resume"))
    assert_same_run(d, tmp_path / "half")


def test_cpu_default_is_fp32_contiguous_eager(tmp_path, data_dir, dynamic_run):
    """Asking for the CPU defaults explicitly changes nothing: the fast path is off on CPU unless asked."""
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--no-amp", "--no-channels-last",
                     "--no-compile"))
    assert_same_run(dynamic_run, d)
    check_fast_run(d, channels_last=False)


@pytest.mark.slow
def test_compile_on_cpu(tmp_path, data_dir):
    """torch.compile on the CPU (minutes here: inductor builds C++ kernels)."""
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--compile", "--amp", "--channels-last",
                     "--epochs", 1))
    check_fast_run(d, channels_last=True)


# ----------------------------------------------------------------------------- 9. report: summary and table

@pytest.mark.parametrize("which", ["dense_run", "dynamic_run", "fbplus_run"])
def test_summary_identities(request, which):
    recs, s = read_run(request.getfixturevalue(which))
    val_ra = [r["val_ra"] for r in recs]
    best = val_ra.index(max(val_ra)) + 1  # first epoch with the highest validation RA
    assert s["best_epoch"] == best
    assert s["ra_best"] == recs[best - 1]["test_ra"] and s["sa_best"] == recs[best - 1]["test_sa"]
    assert s["ra_final"] == recs[-1]["test_ra"] and s["sa_final"] == recs[-1]["test_sa"]
    assert s["ra_diff"] == s["ra_best"] - s["ra_final"] and s["sa_diff"] == s["sa_best"] - s["sa_final"]
    assert s["robust_gap"] == s["train_ra_final"] - s["ra_final"]
    assert 0 <= s["train_ra_final"] <= 100 and s["train_ra_final"] * 64 / 100 == pytest.approx(
        round(s["train_ra_final"] * 64 / 100), abs=1e-9)  # gap_subset 64 images
    table = sw.format_table([s]).splitlines()
    assert len(table) == 3 and table[1] == "|" + "---|" * 12
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells == [s["method"], f"{s['ra_best']:.2f}", f"{s['ra_final']:.2f}", f"{s['ra_diff']:.2f}",
                     f"{s['sa_best']:.2f}", f"{s['sa_final']:.2f}", f"{s['sa_diff']:.2f}", f"{s['train_flops']:.3e}",
                     f"{s['inference_flops']:.3e} ({s['inference_ratio']:.3f})", f"{s['robust_gap']:.2f}",
                     f"{s['final_density']:.4f}", f"{s['itop_rate']:.3f}"]


def test_format_table_rows():
    row = dict(method="Flying Bird+", ra_best=51.7, ra_final=47.51, ra_diff=4.19, sa_best=80.74, sa_final=83.16,
               sa_diff=-2.42, train_flops=1.2004e19, inference_flops=4.042e10, inference_ratio=0.155,
               robust_gap=23.89, final_density=0.1234, itop_rate=0.9)
    lines = sw.format_table([row, dict(row, method="dense AT")]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method | RA best | RA final | diff |")
    assert lines[2] == ("| Flying Bird+ | 51.70 | 47.51 | 4.19 | 80.74 | 83.16 | -2.42 | 1.200e+19 | "
                        "4.042e+10 (0.155) | 23.89 | 0.1234 | 0.900 |")
    assert lines[3].startswith("| dense AT | 51.70 |")
    line = sw.format_table([dict(row, objective="TRADES (beta 6) + EMA (0.999)")]).splitlines()[2]
    assert line.startswith("| Flying Bird+, TRADES (beta 6) + EMA (0.999) | 51.70 |")
    assert sw.format_table([dict(row, objective="PGD-AT")]).splitlines()[2] == lines[2]  # the plain objective: unnamed


# ----------------------------------------------------------------------------- 10. evaluate a checkpoint
# --eval and load_model on the smoke runs: files, options, warnings, resumption, bad input.

EVAL_KEYS = {"file", "checkpoint", "epoch", "key", "method", "mode", "dataset", "arch", "width", "sparsity", "density",
             "nonzero_density", "masked_weights_zero", "split", "examples", "device", "eps", "alpha", "norm", "seed",
             "sa", "loss", "pgd", "autoattack", "checks", "warnings", "wall_seconds"}


CHECKS = {"eps0_equals_clean", "ra_falls_with_steps", "ra_falls_with_eps", "unbounded_ra_zero", "aa_not_above_pgd",
          "autoattack_flags"}


QUICK = ["--eval-subset", 64, "--eval-steps", 2, "--restarts", 2, "--aa-iters", 1, "--check-subset", 32]


@pytest.mark.parametrize("which, mode", [("dense_run", "dense"), ("fbplus_run", "dynamic+"), ("channel_run", "static"),
                                         *[pytest.param(w, m, marks=pytest.mark.slow)
                                           for w, m in (("static_run", "static"), ("dynamic_run", "dynamic"))]])
def test_eval_each_mode(request, tmp_path, capsys, data_dir, which, mode):
    d = copy_run(request.getfixturevalue(which), tmp_path / "run")
    before = snapshot(d)
    recs, summary = read_run(d)
    assert sw.main(["--eval", str(d), *map(str, QUICK)]) == 0  # a run directory means its best.pt
    out = capsys.readouterr().out
    r = eval_json(d)
    assert set(r) == EVAL_KEYS and set(r["checks"]) == CHECKS
    assert r["file"] == "eval-best-test-n64-pgd2x2-aa-standard-i1.json" and r["mode"] == mode
    assert r["checkpoint"] == str((d / "best.pt").resolve()) and r["epoch"] == summary["best_epoch"]
    best = load_ck(d / "best.pt")
    density = 1.0 if best["mask"] is None else sw.SparseMask(smoke_model(), masks=best["mask"]["masks"]).density
    if best.get("channels"):  # a thin network: its weights against the full architecture's
        density = summary["thin"]["weight_density"]
        assert density < 0.6 and sw.load_model(d).layers[0].conv1.out_channels == best["channels"]["layers.0.bn1"]
    assert r["density"] == density and r["masked_weights_zero"] is True and r["nonzero_density"] <= density
    assert r["examples"] == 64 and r["split"] == "test" and r["eps"] == 0.1 and r["alpha"] == 0.025
    assert r["sa"] == recs[r["epoch"] - 1]["test_sa"]  # same split, subset and batches as the training record
    assert r["pgd"]["steps"] == 2 and r["pgd"]["restarts"] == 2
    ex = eval_reference(sw.load_model(d), data_dir)  # robust: clean and every restart right, per example
    assert (r["sa"], r["pgd"]["ra"]) == (pct(ex["clean"]), pct(ex["clean"] & ex["robust"]))
    assert r["autoattack"]["version"] == "standard" and r["autoattack"]["iters"] == 1
    x, y = (t[:64] for t in sw.load_fashion_mnist(str(data_dir))["test"])  # AutoAttack is seeded: recomputed
    aa = sw.autoattack_eval(sw.load_model(d), x.float() / 255, y, eps=0.1, iters=1, batch_size=256, seed=0)
    assert r["autoattack"]["ra"] == 100 * sum(aa["robust"]) / 64 and r["autoattack"]["flags"] == aa["flags"]
    assert all(set(c) >= {"ok", "detail"} for c in r["checks"].values())
    assert r["checks"]["eps0_equals_clean"]["ok"] is True
    assert f"| best.pt (epoch {r['epoch']}) | test | 64 | {density:.4f} | {r['sa']:.2f} |" in out
    after = snapshot(d)  # the training files are untouched; only the results file is new
    assert {k: v for k, v in after.items() if k != r["file"]} == before


def test_eval_last_checkpoint_val_split(tmp_path, fbplus_run):
    d = copy_run(fbplus_run, tmp_path / "run")
    recs, summary = read_run(d)
    assert sw.main(["--eval", str(d / "last.pt"), "--split", "val", "--attack", "pgd", *map(str, QUICK)]) == 0
    r = eval_json(d)
    assert r["file"] == "eval-last-val-n64-pgd2x2.json" and r["epoch"] == len(recs) and r["autoattack"] is None
    assert r["sa"] == recs[-1]["val_sa"] and r["density"] == summary["final_density"] < 0.2  # FB+ pruned extra
    assert r["checks"]["aa_not_above_pgd"]["ok"] is None and r["checks"]["autoattack_flags"]["ok"] is None


def test_eval_restarts_are_the_worst_case_of_that_many_runs(tmp_path, dense_run):
    """--eval --restarts 3: the RA and adversarial loss of evaluate_examples with 3 restarts, exactly."""
    d = copy_run(dense_run, tmp_path / "run")
    r = sw.evaluate_checkpoint(d / "best.pt", subset=64, steps=1, restarts=3, attack="pgd", check_subset=8,
                               device="cpu", log=lambda *a: None)
    cfg = sw.config_of(load_ck(d / "best.pt"), device="cpu")
    x, y = (t[:64] for t in sw.load_data(cfg)["test"])
    eps, alpha = cfg.eps(train=False)
    net = sw.load_model(d / "best.pt")
    ex = {k: sw.evaluate_examples(net, sw.Batches(x, y, batch_size=256), eps=eps, alpha=alpha, steps=1, restarts=k,
                                  generator=torch.Generator().manual_seed(0)) for k in (1, 3)}
    assert r["pgd"]["restarts"] == 3 and r["pgd"]["ra"] == 100 * float((ex[3]["clean"] & ex[3]["robust"]).float().mean())
    assert r["pgd"]["adv_loss"] == ex[3]["adv_loss"].mean().item() > ex[1]["adv_loss"].mean().item()

def test_eval_split_train_is_the_runs_training_images(tmp_path, dense_run):
    d = copy_run(dense_run, tmp_path / "run")
    r = sw.evaluate_checkpoint(d / "best.pt", split="train", steps=2, restarts=1, attack="pgd", check_subset=8,
                               device="cpu", log=lambda *a: None)
    cfg = sw.config_of(load_ck(d / "best.pt"), device="cpu")
    x, y = sw.subsets(cfg, sw.load_data(cfg))["train"]
    assert r["split"] == "train" and r["examples"] == cfg.train_subset == len(y) == 64
    net = sw.load_model(d / "best.pt")
    clean = sw.evaluate(net, sw.Batches(x, y, batch_size=256), eps=0.1, alpha=0.025, steps=0)
    assert r["sa"] == clean["sa"]  # eval mode, no augmentation: the same clean accuracy, exactly
    assert (d / "eval-best-train-all-pgd2x1.json").exists()


def test_eval_options_name_the_file_and_force_overwrites(tmp_path, capsys, dense_run):
    d = copy_run(dense_run, tmp_path / "run")
    args = ["--eval", str(d), "--attack", "pgd", *map(str, QUICK)]
    assert sw.main(args) == 0
    assert sw.main(args + ["--test-eps", "8", "--norm", "l2"]) == 0
    files = sorted(f.name for f in d.glob("eval-*"))
    assert files == ["eval-best-test-n64-pgd2x2-eps8-l2.json", "eval-best-test-n64-pgd2x2.json"]
    other = json.loads((d / files[0]).read_text())
    assert other["eps"] == 8 / 255 and other["alpha"] == 2 / 255 and other["norm"] == "l2"
    first = (d / files[1]).read_text()
    assert_cli_error(capsys, args, files[1], "exists", "--force")
    assert (d / files[1]).read_text() == first
    assert sw.main(args + ["--force", "--seed", "1"]) == 0
    assert json.loads((d / files[1]).read_text())["seed"] == 1


def test_eval_warns_in_one_line_per_failed_check(tmp_path, monkeypatch, capsys, dense_run):
    d = copy_run(dense_run, tmp_path / "run")
    real = sw.model_from_checkpoint
    reversed_model = lambda ck, cfg, path: (Masked(real(ck, cfg, path)[0], "reversed").eval(),  # noqa: E731
                                            real(ck, cfg, path)[1])
    monkeypatch.setattr(sw, "model_from_checkpoint", reversed_model)
    assert sw.main(["--eval", str(d), "--attack", "pgd", *map(str, QUICK)]) == 0
    out = capsys.readouterr().out.splitlines()
    r = eval_json(d)
    warned = [line for line in out if line.startswith("warning: gradient-masking check")]
    assert warned == r["warnings"] and len(warned) == len(failed(r["checks"])) >= 1
    assert "unbounded_ra_zero" in failed(r["checks"])
    row = next(line for line in out if line.startswith("| best.pt"))
    assert row.endswith(f"| failed: {', '.join(k for k, c in r['checks'].items() if c['ok'] is False)} |")


def test_eval_counts_robust_only_when_clean_is_right(tmp_path, monkeypatch, data_dir, dense_run, tiny_fmnist):
    """--eval's PGD RA counts an example robust when it is right on the clean input and after every
    restart (as AutoAttack counts). Here PGD meets a reversed gradient that leads it to the right class,
    so some examples wrong on the clean input come out right after the attack: they must not count."""
    d = copy_run(dense_run, tmp_path / "run")
    model = Masked(tiny_fmnist[0], "reversed").eval()
    monkeypatch.setattr(sw, "model_from_checkpoint", lambda ck, cfg, path: (model, None))
    assert sw.main(["--eval", str(d), "--attack", "pgd", *map(str, QUICK)]) == 0
    r = eval_json(d)
    ex = eval_reference(model, data_dir)
    assert (ex["robust"] & ~ex["clean"]).any()
    assert (r["sa"], r["pgd"]["ra"]) == (pct(ex["clean"]), pct(ex["clean"] & ex["robust"]))


def test_eval_resumes_where_it_stopped(tmp_path, monkeypatch, capsys, dense_run):
    pyautoattack = pytest.importorskip("pyautoattack")
    args = ["--batch-size", 16, *QUICK]  # 4 AutoAttack batches of 16
    ref = copy_run(dense_run, tmp_path / "ref")
    assert sw.main(["--eval", str(ref), *map(str, args)]) == 0
    d = copy_run(dense_run, tmp_path / "run")
    calls = {"aa": 0, "pgd": 0}
    real_aa, real_ex = pyautoattack.AutoAttack.run_standard_evaluation, sw.evaluate_examples

    def aa(self, *a, **kw):
        calls["aa"] += 1
        if calls["aa"] == 3:
            raise KeyboardInterrupt
        return real_aa(self, *a, **kw)
    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", aa)
    monkeypatch.setattr(sw, "evaluate_examples", lambda *a, **kw: calls.__setitem__("pgd", calls["pgd"] + 1)
                        or real_ex(*a, **kw))
    capsys.readouterr()
    assert sw.main(["--eval", str(d), *map(str, args)]) == 130
    assert capsys.readouterr().err.strip() == ("sparse_win.py: interrupted; the same --eval continues from its "
                                               ".partial.json")
    partial = json.loads(next(d.glob("eval-*.partial.json")).read_text())["done"]
    assert set(partial) == {"pgd", "checks", "autoattack_partial"}
    assert len(partial["autoattack_partial"]["robust"]) == 32  # two batches of 16 done
    assert not [f for f in d.glob("eval-*.json") if not f.name.endswith(".partial.json")]
    calls.update(aa=10, pgd=0)  # no more interruptions; count what the second run does
    assert sw.main(["--eval", str(d), *map(str, args)]) == 0
    assert calls == {"aa": 12, "pgd": 0}  # the two AutoAttack batches left, no PGD again
    assert "continuing the evaluation" in capsys.readouterr().out
    assert not list(d.glob("*.partial.json"))
    a, b = eval_json(d), eval_json(ref)
    for r in (a, b):
        r.pop("wall_seconds"), r.pop("checkpoint")
    assert a == b


def test_final_eval_autoattack_adds_to_summary(tmp_path, data_dir, capsys):
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--epochs", 1, "--train-subset", 64,
                     "--final-eval", "autoattack", "--eval-steps", 2, "--restarts", 1, "--aa-iters", 1,
                     "--check-subset", 16))
    out = capsys.readouterr().out
    s = read_run(d)[1]
    best = json.loads((d / s["eval_best"]).read_text())
    final = json.loads((d / s["eval_final"]).read_text())
    assert s["eval_best"] == "eval-best-test-n64-pgd2x1-aa-standard-i1.json"
    assert s["eval_final"] == "eval-last-test-n64-pgd2x1-aa-standard-i1.json"
    assert s["ra_aa_best"] == best["autoattack"]["ra"] and s["ra_aa_final"] == final["autoattack"]["ra"]
    assert best["sa"] == s["sa_best"] and final["sa"] == s["sa_final"]
    row = next(line for line in out.splitlines() if line.startswith("| Flying Bird |"))
    assert row.endswith(f"| {s['ra_aa_best']:.2f} | {s['ra_aa_final']:.2f} |")
    assert "| AA best | AA final |" in out


def test_load_model_same_logits_as_the_training_model(tmp_path, data_dir, monkeypatch):
    built = []
    real = sw.model_for
    monkeypatch.setattr(sw, "model_for", lambda cfg: built.append(real(cfg)) or built[-1])
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--epochs", 1, "--train-subset", 64))
    trained = built[0].eval()  # the model train() trained, as it ended (its one epoch is also the best)
    x = sw.load_fashion_mnist(str(data_dir))["test"][0][:32].float() / 255  # pixels in [0, 1]
    for path in (d, d / "last.pt"):
        model = sw.load_model(path)
        assert not model.training and isinstance(model, sw.ResNet)
        with torch.no_grad():
            assert torch.equal(model(x), trained(x))
        masks = load_ck(d / "last.pt")["mask"]["masks"]
        assert all(not w[~masks[n]].any() for n, w in sw.prunable(model).items())


def test_torchattacks_pgd_on_load_model_gives_our_ra(dynamic_run):
    torchattacks = pytest.importorskip("torchattacks")
    model = sw.load_model(dynamic_run)
    data = sw.load_fashion_mnist("/nonexistent")["test"]
    x, y = data[0][:64].float() / 255, data[1][:64]
    ex = sw.evaluate_examples(model, [(x, y)], eps=0.1, alpha=0.025, steps=5, random_start=False)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=5, random_start=False)(x, y)
    assert torch.equal(theirs, sw.pgd(model, x, y, eps=0.1, alpha=0.025, steps=5, random_start=False))
    with torch.no_grad():
        robust = model(theirs).argmax(1) == y
    assert torch.equal(robust, ex["robust"]) and 0 < robust.sum() < len(y)  # same RA, example by example


def bytes_file(d: Path) -> Path:
    (d / "x.pt").write_bytes(b"not a checkpoint")
    return d / "x.pt"


def state_dict_file(d: Path) -> Path:
    torch.save({"weight": torch.zeros(2)}, d / "sd.pt")  # a torch file, but no sparse_win checkpoint
    return d / "sd.pt"


@pytest.mark.parametrize("make, line", [
    (lambda d: d / "nope", "no such checkpoint or run directory: {d}/nope"),
    (lambda d: d, "{d} holds no best.pt; pass a checkpoint file (best.pt or last.pt)"),
    (bytes_file, "{d}/x.pt is not a sparse_win checkpoint (UnpicklingError)"),
    (state_dict_file, "{d}/sd.pt is not a sparse_win checkpoint (it lacks model or mask)"),
])
def test_eval_bad_paths(capsys, tmp_path, make, line):
    got = assert_cli_error(capsys, ["--eval", make(tmp_path)])
    assert got == "sparse_win.py: error: " + line.format(d=tmp_path)


def test_eval_bad_attack_and_missing_pyautoattack(capsys, tmp_path, monkeypatch, dense_run):
    line = assert_cli_error(capsys, ["--eval", dense_run, "--attack", "fgsm"])
    assert line == "sparse_win.py: error: argument --attack: invalid choice: 'fgsm' (choose from 'pgd', 'autoattack', 'all')"
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if not installed
    want = f"sparse_win.py: error: {sw.AA_MISSING} (or pass --attack pgd)"
    for args in (["--eval", dense_run], ["--eval", dense_run, "--attack", "autoattack"],
                 smoke(tmp_path / "run", tmp_path, "--final-eval", "autoattack")):
        assert assert_cli_error(capsys, args) == want
    assert not (tmp_path / "run").exists() and not list(dense_run.glob("eval-*"))
    with pytest.raises(sw.SparseWinError, match="pip install pyautoattack"):
        sw.autoattack_eval(nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), eps=0.1)


def test_eval_refuses_a_corrupt_mask(capsys, tmp_path, dynamic_run):
    ck = load_ck(dynamic_run / "best.pt")
    name = next(n for n, m in ck["mask"]["masks"].items() if not m.all())
    ck["model"][name][~ck["mask"]["masks"][name]] = 1.0
    torch.save(ck, tmp_path / "best.pt")
    assert_cli_error(capsys, ["--eval", tmp_path / "best.pt"], "masked weights are not zero", "corrupt")
    with pytest.raises(sw.SparseWinError, match="not zero"):
        sw.load_model(tmp_path)


# ----------------------------------------------------------------------------- 11. benchmark

def test_benchmark_cpu(monkeypatch, capsys):
    """--benchmark times Trainer.step, the step train() runs, for a dense, a Flying Bird and a channel ticket's
    thin model, and the inference forward of each."""
    rows, steps = [], {}
    real, real_step = sw.benchmark, sw.Trainer.step

    def step(self, x, y, i, kind):
        params = sum(p.numel() for p in self.net.parameters())
        steps.setdefault(id(self), (type(self.method).__name__, params, []))[2].append((kind, len(y), self.ledger.steps))
        return real_step(self, x, y, i, kind)
    monkeypatch.setattr(sw, "benchmark", lambda cfg, log=print: rows.extend(real(cfg, log)) or rows)
    monkeypatch.setattr(sw.Trainer, "step", step)
    assert sw.main(["--benchmark", "--preset", "smoke", "--mode", "dense", "--batch-size", "8", "--device", "cpu",
                    "--sparsity", "0.5"]) == 0
    assert [(r["variant"], r["model"]) for r in rows] == [("fp32 eager", m) for m in ("dense", "sparse", "thin")]
    (dense, n_dense, a), (fb, n_fb, b), (thin, n_thin, c) = steps.values()
    assert (dense, fb, thin) == ("Dense", "FlyingBird", "Dense") and n_dense == n_fb
    for calls in (a, b, c):  # 3 warm-up steps, then at least 5 timed ones; each one charged
        assert len(calls) >= 8 and calls == [("pgd", 8, n) for n in range(len(calls))]
    net = smoke_model()
    half = sw.slim(net, {n: round(0.5 * g.numel()) for n, g in sw.bn_gammas(net).items()})
    assert n_thin == sum(p.numel() for p in half.parameters()) < n_dense  # physically half the inner channels
    fwd = [full_forward_flops(m, (1, 28, 28)) for m in (net, half)]  # the helper of the channel-ticket tests
    assert rows[0]["flops_ratio"] == 1.0 and rows[2]["flops_ratio"] == fwd[1] / fwd[0]
    assert 0.4 < rows[1]["flops_ratio"] < 0.9  # FB at density 0.5 (IGQ keeps the small layers denser)
    for r in rows:
        assert r["images_per_s"] > 0 and r["epoch_s"] == pytest.approx(45000 / r["images_per_s"])
        assert r["tflops"] > 0 and r["peak_fraction"] is None and r["inference_per_s"] > 0
    out = capsys.readouterr().out
    assert out.count("img/s") == 6


# ----------------------------------------------------------------------------- 12. CUDA (python -m pytest -m cuda)
# The GPU code path: bf16 autocast, channels_last, torch.compile, the fused mask multiply.
# Skipped without a GPU; run on a lent device by the GPU check (shared/gpu-check.sh).

@pytest.fixture
def gpu_data_dir(data_dir):
    """Fashion-MNIST: the Debian package, or where the GPU check puts it (.device/data)."""
    if not Path(sw.DEBIAN_FASHION_MNIST).is_dir() and data_dir != HERE / ".device" / "data":
        pytest.skip("no Fashion-MNIST on this machine")
    return data_dir


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["dynamic", "dynamic+", "static"])
def test_cuda_fast_path_trains_with_exact_masks(tmp_path, gpu_data_dir, mode):
    extra = FBPLUS[2:] if mode == "dynamic+" else []
    d = run_ok(smoke(tmp_path / "run", gpu_data_dir, "--mode", mode, "--device", "cuda", *extra))
    check_fast_run(d, channels_last=True)  # CUDA default: bf16 autocast + channels_last
    if mode != "dynamic+":
        return
    # resume on the GPU goes through (bitwise equality is a CPU property: cuDNN picks kernels per run)
    run_ok(smoke(tmp_path / "half", gpu_data_dir, "--mode", mode, "--device", "cuda", *extra,
                 "--stop-after-epoch", 1))
    run_ok(smoke(tmp_path / "half", gpu_data_dir, "--mode", mode, "--device", "cuda", *extra, "--resume"))
    check_fast_run(tmp_path / "half", channels_last=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_channel_ticket_trains_resumes_and_evaluates_the_thin_network(tmp_path, gpu_data_dir):
    """The channel ticket on the fast path (bf16, channels_last): the thin network is re-wrapped, trains,
    resumes, and load_model rebuilds it; its measured step is reported."""
    args = smoke(tmp_path / "run", gpu_data_dir, *CHANNEL, "--device", "cuda")
    run_ok(args + ["--stop-after-epoch", 1])
    run_ok(args + ["--resume"])
    s = read_run(tmp_path / "run")[1]
    assert s["epochs"] == 2 and sum(s["thin"]["channels"].values()) == 60 and s["thin"]["at_step_s"] > 0
    net = sw.load_model(tmp_path / "run", device="cuda")
    assert net.layers[0].conv1.out_channels == s["thin"]["channels"]["layers.0.bn1"]
    x = torch.rand(4, 1, 28, 28, device="cuda")
    torch.testing.assert_close(net(x).cpu(), sw.load_model(tmp_path / "run")(x.cpu()), rtol=1e-3, atol=1e-3)  # TF32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compile_trains_with_exact_masks(tmp_path, gpu_data_dir):
    d = run_ok(smoke(tmp_path / "run", gpu_data_dir, "--mode", "dynamic", "--device", "cuda", "--compile",
                     "--epochs", 1))
    check_fast_run(d, channels_last=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_cuda_channels_last_masks_equal_cpu_masks(growth):
    """Same weights and seed: CUDA channels_last (bf16 multipliers) and CPU contiguous give equal masks."""
    gen = torch.Generator().manual_seed(0)
    cpu = smoke_model()
    fill_(cpu, gen)
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=torch.channels_last)
    mc, mg = sw.SparseMask(cpu, density=0.2, seed=3), sw.SparseMask(gpu, density=0.2, seed=3)
    for step in range(5):
        with torch.no_grad():
            for pc, pg in zip(cpu.parameters(), gpu.parameters()):
                pc.copy_(torch.randn(pc.shape, generator=gen))
                pg.copy_(pc)
                pc.grad = torch.randn(pc.shape, generator=gen)
                pg.grad = torch.empty_like(pg).copy_(pc.grad)
        mc.apply(), mg.apply()
        mc.update(0.3, growth=growth), mg.update(0.3, growth=growth)
        for n in mc.names:
            assert torch.equal(mc.masks[n], mg.masks[n].cpu()), (step, n)
        assert mc.counts == mg.counts
    for n, p in sw.prunable(gpu).items():
        assert not p[~mg.masks[n]].any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_on_cuda_matches_cpu(tmp_path, dense_run):
    d = copy_run(dense_run, tmp_path / "run")
    for device in ("cpu", "cuda"):
        assert sw.main(["--eval", str(d), "--device", device, *map(str, QUICK), "--force"]) == 0
        r = eval_json(d)
        assert r["device"].startswith(device)
        if device == "cpu":
            cpu = r
    assert abs(r["sa"] - cpu["sa"]) <= 100 / 64 and r["density"] == cpu["density"]  # TF32 convs: 1 image may flip
    assert r["checks"]["eps0_equals_clean"]["ok"] is True
    assert abs(r["pgd"]["ra"] - cpu["pgd"]["ra"]) <= 100 * 3 / 64  # other random starts on CUDA


# ----------------------------------------------------------------------------- 13. torchrun (DDP) on the CPU
# Two gloo processes on this machine stand in for two GPUs: the same code path as NCCL on CUDA.

def eval_shards(world: int, rank: int, reduce=None) -> dict:
    """Sharded evaluation of a fixed model on 100 real test images (batches of 33: the last shard is empty),
    each rank's PGD started from its rows of the global batch's random start."""
    torch.manual_seed(0)
    net = smoke_model()
    x, y = (t[:100] for t in sw.load_fashion_mnist("/nonexistent")["test"])
    batches, gen = sw.Batches(x, y, batch_size=33, rank=rank, world=world), torch.Generator().manual_seed(1)
    return sw.evaluate(net, batches, eps=0.1, alpha=0.025, steps=3, generator=gen, reduce=reduce,
                       start=lambda xb: batches.start(xb, eps=0.1, generator=gen))


def ddp_worker(rank: int, world: int, store: str, argv: list[str], out: str):
    """One rank of a torchrun-like job: records its masks after every topology update and its
    sharded evaluation, then runs the CLI (which finds the process group already joined).

    The ranks meet through a file (a FileStore), not a TCP port: a port found free, released and
    bound again later can be taken by another process in between."""
    import torch.distributed as td
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ev = eval_shards(world, rank, sw.Dist().sum_)
    snaps, real = [], sw.SparseMask.update

    def update(self, *a, **kw):
        changed = real(self, *a, **kw)
        snaps.append({n: m.clone() for n, m in self.masks.items()})
        return changed
    sw.SparseMask.update = update
    average, real_average = {}, sw.WeightAverage.update

    def average_update(self, *a, **kw):  # --ema-decay: this rank's last averaged weights
        real_average(self, *a, **kw)
        average.update({n: p.clone() for n, p in self.model.named_parameters()})
    sw.WeightAverage.update = average_update
    code = sw.main(argv)
    torch.save(dict(code=code, snaps=snaps, eval=ev, average=average), Path(out) / f"rank{rank}.pt")


def torchrun(args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """sparse_win.py under `torchrun --standalone` with 2 processes. --standalone binds its rendezvous
    store to port 0 (the system picks a free port and the store keeps it) and the workers join that
    store, so no port is found free, released and bound again; timeout only guards against a hang."""
    env = dict(ONE_THREAD, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "sparse_win.py", *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir):
    """FB+ (3 epochs, topology updates every 2-3 steps) on 2 processes, each rank's masks recorded."""
    base = tmp_path_factory.mktemp("ddp")
    argv = smoke(base / "run", data_dir, *FBPLUS)
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(base / "store"), argv, str(base)), nprocs=2, join=True)
    return base


def test_ddp_masks_identical_on_every_rank_with_exact_density(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["code"] == r1["code"] == 0
    assert len(r0["snaps"]) == len(r1["snaps"]) == 5  # the same schedule as one process (test_fbplus_end_to_end)
    for a, b in zip(r0["snaps"], r1["snaps"]):
        for n in a:
            assert torch.equal(a[n], b[n]), n
    last = load_ck(ddp_run / "run" / "last.pt")
    for n, m in last["mask"]["masks"].items():  # rank 0's checkpoint holds the masks both ranks used
        assert torch.equal(m, r0["snaps"][-1][n])
        assert not last["model"][n][~m].any()
    counts = [int(m.sum()) for m in last["mask"]["masks"].values()]
    assert sum(counts) == round(read_run(ddp_run / "run")[1]["final_density"] * sum(
        m.numel() for m in last["mask"]["masks"].values()))


@pytest.mark.slow
def test_ddp_regularized_ranks_agree(tmp_path, data_dir):
    """TRADES + AWP + weight averaging on 2 processes: the same masks and the same averaged weights on both."""
    argv = smoke(tmp_path / "run", data_dir, *FBPLUS, *REGULARIZED)
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(tmp_path / "store"), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["code"] == r1["code"] == 0 and len(r0["snaps"]) == 5 and r0["average"]
    assert all(torch.equal(a[n], b[n]) for a, b in zip(r0["snaps"], r1["snaps"]) for n in a)
    assert all(torch.equal(r0["average"][n], r1["average"][n]) for n in r0["average"])
    assert read_run(tmp_path / "run")[1]["objective"].startswith("TRADES")


def test_ddp_writes_once_and_counts_global_images(ddp_run, fbplus_run):
    recs, summary = read_run(ddp_run / "run")
    lines = (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [r["epoch"] for r in recs] == [1, 2, 3]  # one record per epoch, written once
    one, _ = read_run(fbplus_run)
    ck, ck1 = load_ck(ddp_run / "run" / "last.pt"), load_ck(fbplus_run / "last.pt")
    assert ck["ledger"]["images"] == ck1["ledger"]["images"] == 3 * N_TRAIN  # global images, as one process
    assert ck["ledger"]["steps"] == ck1["ledger"]["steps"] and ck["run"]["world"] == 2
    assert [r["lr"] for r in recs] == [r["lr"] for r in one]


def test_ddp_sharded_evaluation_equals_one_process(ddp_run):
    one = eval_shards(1, 0)
    for r in (0, 1):
        ev = torch.load(ddp_run / f"rank{r}.pt", weights_only=False)["eval"]
        assert ev["sa"] * 100 == pytest.approx(one["sa"] * 100, abs=1e-9)  # exact in counts (100 images)
        assert ev["ra"] * 100 == pytest.approx(one["ra"] * 100, abs=1e-9)
        torch.testing.assert_close(ev["adv_loss"], one["adv_loss"])  # sums in another order


@pytest.mark.slow
def test_torchrun_cli_resume_is_identical_and_refuses_another_world(capsys, tmp_path, data_dir, ddp_run):
    """The CLI under torchrun (2 processes): stop after epoch 1, resume, same as the uninterrupted run."""
    args = smoke(tmp_path / "run", data_dir, *FBPLUS)
    p = torchrun(args + ["--stop-after-epoch", 1])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("epoch   1/3") == 1  # rank 0 alone logs
    before = snapshot(tmp_path / "run")
    assert_cli_error(capsys, args + ["--resume"], "2 processes, now 1")
    assert snapshot(tmp_path / "run") == before
    p = torchrun(args + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(ddp_run / "run", tmp_path / "run")


@pytest.mark.slow
def test_torchrun_refuses_a_batch_the_ranks_do_not_divide(tmp_path, data_dir):
    p = torchrun(smoke(tmp_path / "run", data_dir, "--batch-size", 63))
    assert p.returncode != 0
    assert "sparse_win.py: error: --batch-size 63 (the global batch) must be divisible by the number of " \
           "processes, 2" in p.stderr


@pytest.mark.slow
def test_torchrun_a_rank_that_raises_ends_the_job(tmp_path, data_dir):
    """Rank 1 raises in its 3rd training attack: the job exits non-zero with rank 1's message, without
    waiting for rank 0's collectives to time out (--dist-timeout 600 is longer than torchrun's hang
    guard: a job that waited for it would time out here instead of failing)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.functional as F\n"
        "    real, calls = F.cross_entropy, []\n"
        "    def failing(*a, **kw):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 9:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return real(*a, **kw)\n"
        "    F.cross_entropy = failing\n")
    p = torchrun(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--dist-timeout", 600),
                 env_extra=dict(PYTHONPATH=str(hook)))
    assert p.returncode != 0 and "injected failure on rank 1" in p.stderr, p.stderr[-3000:]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int):
    """SIGKILL a process and every process below it (torchrun's workers run in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_torchrun_elastic_restart_after_a_killed_rank_is_identical(tmp_path, data_dir, ddp_run):
    """torchrun --max-restarts=1 with --resume auto: rank 1 is SIGKILLed in epoch 2 of the first attempt; torchrun
    restarts the group, which continues from the last checkpoint (--checkpoint-every 3) to the records of an
    uninterrupted 2-process run. Prints the seconds from the kill to training again and the steps repeated."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, signal, time
        import torch.nn.functional as F
        real, calls, attempt = F.cross_entropy, [], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        def hooked(*a, **kw):  # per rank: 3 a step (PGD-2, the update), 8 evaluating: call 29 is epoch 2, step 3
            calls.append(1)
            if attempt == "0" and os.environ.get("RANK") == "1" and len(calls) == 29:
                open(r"{tmp_path / 'killed'}", "w").write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            if attempt == "1" and os.environ.get("RANK") == "0" and len(calls) == 1:
                open(r"{tmp_path / 'again'}", "w").write(str(time.time()))
            return real(*a, **kw)
        F.cross_entropy = hooked
        """))
    args = smoke(tmp_path / "run", data_dir, *FBPLUS, "--checkpoint-every", 3, "--resume", "auto")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--max-restarts=1", "sparse_win.py", *map(str, args)], cwd=HERE, capture_output=True,
                       text=True, timeout=1200, env=dict(ONE_THREAD, PYTHONPATH=str(hook),
                                                         TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0"))  # as torchrun()
    assert p.returncode == 0, p.stderr[-3000:]
    cont = next(line for line in p.stdout.splitlines() if line.startswith("continuing"))
    assert cont == f"continuing {tmp_path / 'run'} at epoch 1, step 2", p.stdout  # global step 6 of the kill's 7
    assert_same_run(ddp_run / "run", tmp_path / "run")
    waited = float((tmp_path / "again").read_text()) - float((tmp_path / "killed").read_text())
    print(f"elastic restart: {waited:.1f} s from the kill to training again; 0 finished steps repeated "
          f"(killed in epoch 2, step 3; continued at its step 3); records identical")


def node(rank: int, port: int, args) -> subprocess.Popen:
    """One torchrun agent as node `rank` of 2 (one worker each), c10d rendezvous on localhost."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                             "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                             "--rdzv-id=sparse-win-test", "sparse_win.py", *map(str, args)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_and_survive_a_killed_node(tmp_path, data_dir, ddp_run):
    """Two agents (--nnodes=2, one process each) end with the records of one node's two processes. Killing one
    node (its agent and worker) mid-run ends the other non-zero within --dist-timeout, leaves no half-written
    file, and the same two commands with --resume auto finish the run with the same records."""
    t0, args = time.time(), smoke(tmp_path / "two", data_dir, *FBPLUS, "--resume", "auto", "--dist-timeout", 120)
    port = free_port()
    nodes = [node(r, port, args) for r in (0, 1)]
    assert all(n.wait(timeout=1200) == 0 for n in nodes), [n.stderr.read()[-2000:] for n in nodes]
    two_nodes = time.time() - t0
    assert_same_run(ddp_run / "run", tmp_path / "two")
    d, args = tmp_path / "killed", smoke(tmp_path / "killed", data_dir, *FBPLUS, "--resume", "auto", "--dist-timeout", 120)
    port = free_port()
    nodes = [node(r, port, args) for r in (0, 1)]
    wait_for(d / "metrics.jsonl", nodes[0], timeout=600)
    while "epoch" not in (d / "metrics.jsonl").read_text() or not (d / "last.pt").exists():  # kill in epoch 2
        assert nodes[0].poll() is None and nodes[1].poll() is None
        time.sleep(0.2)
    kill_tree(nodes[0].pid)
    t_kill = time.time()
    assert nodes[1].wait(timeout=180) != 0
    ended = time.time() - t_kill
    assert ended < 120 + 30 and not list(d.glob("*.tmp")) and load_ck(d / "last.pt")["run"]["epoch"] >= 1
    port = free_port()
    nodes = [node(r, port, args) for r in (0, 1)]
    assert all(n.wait(timeout=1200) == 0 for n in nodes), [n.stderr.read()[-2000:] for n in nodes]
    assert_same_run(ddp_run / "run", d)
    print(f"two nodes: records identical to one node's two processes ({two_nodes:.0f} s); the other node ended "
          f"{ended:.0f} s after the kill, non-zero; the same commands with --resume auto: identical records")


# ----------------------------------------------------------------------------- 14. README, the demo and the scripts

def test_pip_install_then_import_from_another_folder(tmp_path):
    """pip install . puts the one module on the path (pyproject.toml's [project]) with its MIT licence; its library
    needs torch alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("sparse_win.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(HERE / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                        str(tmp_path / "site"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "site").glob("*.py")) == ["sparse_win.py"]  # the module alone
    info = next((tmp_path / "site").glob("sparse_win-*.dist-info"))
    assert "License-Expression: MIT" in (info / "METADATA").read_text()
    assert (info / "licenses" / "LICENSE").read_text() == (HERE / "LICENSE").read_text()
    code = ("import torch, sparse_win as sw; print(sw.__file__); "
            "print(sw.build_model('resnet18', width=0.0625).eval()(torch.rand(2, 3, 8, 8)).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == [str(tmp_path / "site" / "sparse_win.py"), "torch.Size([2, 10])"]


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The README's "own training loop" examples run as printed, in order, and keep the density."""
    import re
    code = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert len(code) == 2
    monkeypatch.chdir(tmp_path)  # it saves tiny.pt
    scope = {}
    exec(compile(code[0], "README.md", "exec"), scope)
    mask, ledger = scope["mask"], scope["ledger"]
    model, net, x = scope["model"].eval(), scope["net"], torch.rand(2, 3, 32, 32)
    assert not net.training and torch.equal(net(x), model(x))  # load_model: the same logits
    assert mask.density == pytest.approx(0.2, abs=1e-4) and mask.counts == [int(m.sum()) for m in mask.masks.values()]
    assert ledger.steps == 4 and ledger.actual > 0 and ledger.paper == ledger.actual * 12 // 9  # K=3: 12x vs 9x
    assert mask.steps == 4 and scope["update"]["step"] == 4 and scope["update"]["pruned"] > 0  # updates at 2, 4
    exec(compile(code[1], "README.md", "exec"), scope)  # the regularizers, continuing the same loop
    weights, averaged = sw.prunable(scope["model"]), sw.prunable(scope["average"].model)
    assert mask.steps == 5 and all(not weights[n][~m].any() and not averaged[n][~m].any() for n, m in mask.masks.items())


@pytest.mark.slow
def test_cpu_demo_learns(tmp_path):
    """The README's first command (FB+ with the paper's window 4, threshold 0.5, ratios 0.4 / 0.05, start
    at half of training, on Fashion-MNIST): robust accuracy far above chance, and every topology update
    from the start epoch on decided by the rule on the recorded history."""
    assert sw.main(["--preset", "cpu-demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    recs, summary = read_run(tmp_path / "demo")
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert summary["ra_best"] > 40 and summary["sa_best"] > 60  # chance is 10%
    assert summary["topology_updates"] > 0 and summary["itop_rate"] > summary["final_density"]
    cfg = sw.parse_args(["--preset", "cpu-demo"])
    updates = load_ck(tmp_path / "demo" / "last.pt")["run"]["updates"]
    assert any(u["epoch"] > cfg.fbplus_window for u in updates)  # a decision with a full window
    check_fbplus_decisions(recs, updates, summary["fbplus_events"], start=sw.resolved(cfg).fbplus_start,
                           window=cfg.fbplus_window, threshold=cfg.fbplus_threshold)


@pytest.mark.slow
def test_run_experiments_smoke():
    """run_experiments.sh --smoke: the 12 Table-1 commands for a few steps, then one table row each."""
    out = subprocess.run(["bash", str(HERE / "run_experiments.sh"), "--smoke"], capture_output=True, text=True,
                         cwd=HERE, timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "seed0" in line]
    assert len(rows) == 12
    for data in ("cifar10", "cifar100", "tiny-imagenet"):
        for method in ("dense AT", "Robust Bird", "Flying Bird,", "Flying Bird+"):
            assert sum(r.startswith(f"| {data}-") and method in r for r in rows) == 1, (data, method)


def test_run_experiments_checks_tiny_imagenet_before_the_first_run(tmp_path):
    out = run_script(DATA=str(tmp_path), OUT=str(tmp_path / "runs"))  # the real Table 1: no data there
    assert out.returncode == 2 and "tiny-imagenet not found" in out.stderr and "DATASETS=" in out.stderr
    assert "==" not in out.stdout and not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.slow
def test_run_experiments_folders_are_the_single_run_defaults():
    """The script's run folders are the ones `python sparse_win.py` picks for the same options, so that the
    README's --eval examples name them."""
    out = run_script("--smoke", GPUS="a", DATASETS="cifar10", MODES="dynamic", SEEDS="2")
    assert out.returncode == 0, out.stderr[-2000:]
    done = [line.split("done: ")[1] for line in out.stdout.splitlines() if line.startswith("-- [GPU a] done: ")]
    cfg = sw.Config(dataset="cifar10", mode="dynamic", sparsity=0.8, seed=2)
    assert [Path(d).name for d in done] == [cfg.run_dir.name] == ["cifar10-dynamic-s0.8-seed2"]
    assert (Path(done[0]) / "summary.json").exists()


def run_script(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HERE / "run_experiments.sh"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=900, env=dict(ONE_THREAD, PYTHON=sys.executable, **env))


@pytest.mark.slow
def test_run_experiments_queue_on_two_slots():
    """GPUS="a b": a queue of 3 runs on 2 slots; each run once, both slots busy, one table row each."""
    out = run_script("--smoke", GPUS="a b", DATASETS="cifar10", MODES="dense static dynamic")
    assert out.returncode == 0, out.stderr[-2000:]
    started = [line for line in out.stdout.splitlines() if line.startswith("== [GPU ")]
    assert sorted(line.split("] ")[1] for line in started) == [f"cifar10 {m} seed 0" for m in
                                                               ("dense", "dynamic", "static")]
    assert {line[len("== [GPU "):].split("]")[0] for line in started} == {"a", "b"}
    rows = [line for line in out.stdout.splitlines() if line.startswith("| cifar10-")]
    assert len(rows) == 3 and sum("Robust Bird" in r for r in rows) == 1


@pytest.mark.slow
def test_run_experiments_queue_with_torchrun():
    """NPROC=2: each run of the queue is a torchrun job of 2 processes (gloo on the CPU)."""
    out = run_script("--smoke", GPUS="a b", NPROC="2", DATASETS="cifar10", MODES="static dynamic+")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("== [GPU a b] cifar10") == 2
    assert sum(line.startswith("| cifar10-") for line in out.stdout.splitlines()) == 2


@pytest.mark.slow
def test_same_metrics_as_a_git_revision():
    """.ci/same_metrics.py: smoke runs of every mode write the same metrics.jsonl and summary.json (time
    aside) with this sparse_win.py as with SAME_METRICS_REV's (default HEAD: a refactor's check before
    it is committed; on a clean tree it checks that two runs of the same command agree)."""
    rev = os.environ.get("SAME_METRICS_REV", "HEAD")
    if subprocess.run(["git", "cat-file", "-e", f"{rev}:sparse_win.py"], cwd=HERE, capture_output=True).returncode:
        pytest.skip(f"no sparse_win.py at {rev} in this checkout")
    p = subprocess.run([sys.executable, str(HERE / ".ci" / "same_metrics.py"), rev], capture_output=True, text=True,
                       cwd=HERE, timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("same   ") == 5 and "identical" in p.stdout


# Every command in README.md's bash blocks, as written, and the test that runs it, or why none does.
README_COMMANDS = {
    "pip install -r requirements.txt": "not run: the network and minutes (.ci/run does it on a clean clone)",
    "python sparse_win.py --preset smoke": "test_readme_laptop_commands_run_as_written",
    "python sparse_win.py --eval runs/smoke --eval-subset 500 --restarts 1 --aa-iters 10":
        "test_readme_laptop_commands_run_as_written",
    "python sparse_win.py --preset cpu-demo": "test_readme_laptop_commands_run_as_written",
    "python sparse_win.py --dataset cifar100 --mode dynamic --sparsity 0.9": "not run: CIFAR-100 download, GPU hours",
    "bash run_experiments.sh": "not run: CIFAR and Tiny-ImageNet, GPU days (test_run_experiments_checks_tiny_imagenet_"
                               "before_the_first_run runs it without the data)",
    "bash run_experiments.sh --smoke": "test_run_experiments_smoke",
    "python sparse_win.py --eval runs/cifar10-dynamic-s0.8-seed0": "not run: needs a trained CIFAR-10 run "
                                                                  "(test_eval_each_mode runs --eval on smoke runs)",
    "python sparse_win.py --eval runs/cifar10-dynamic-s0.8-seed0 --attack pgd --eval-subset 1000": "not run: as above",
    "torchrun --standalone --nproc_per_node=4 sparse_win.py --dataset cifar10 --mode dynamic+ --resume auto": "not "
        "run: 4 GPUs (test_torchrun_elastic_restart_after_a_killed_rank_is_identical runs --resume auto on 2 CPU "
        "processes)",
    "torchrun --standalone --nproc_per_node=2 sparse_win.py --preset smoke --device cpu --out runs/smoke-ddp":
        "test_readme_laptop_commands_run_as_written",
    'GPUS="0 1 2 3 4 5 6 7" NPROC=4 bash run_experiments.sh': "not run: 8 GPUs",
    "python -m pytest -q": "CI (.ci/run)",
}


def readme_commands() -> list[str]:
    import re
    blocks = re.findall(r"```bash\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_every_readme_command_is_run_or_listed():
    """A command added to README.md must be run by a test, or be listed above with why it is not."""
    commands = readme_commands()
    assert sorted(set(commands)) == sorted(README_COMMANDS)
    tests = (HERE / "test_sparse_win.py").read_text()
    for how in README_COMMANDS.values():
        named = [w.strip("(),") for w in how.split() if w.startswith(("test_", "(test_"))]
        assert how.startswith(("not run", "CI")) or f"def {how.split()[0]}(" in tests, how
        assert all(f"def {t}" in tests for t in named), how


@pytest.mark.slow
def test_readme_laptop_commands_run_as_written(tmp_path):
    """The laptop commands and the 2-process CPU torchrun, as README prints them, in a copy of the repository
    (one thread each): each ends with status 0 and writes the folder README names."""
    repo = tmp_path / "repo"
    shutil.copytree(HERE, repo, ignore=shutil.ignore_patterns(".git", "runs", "data", ".device", "__pycache__"))
    for command in [c for c, how in README_COMMANDS.items() if how == "test_readme_laptop_commands_run_as_written"]:
        argv = command.split()
        argv[0:1] = [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
        p = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=1800,
                           env=dict(ONE_THREAD, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0"))
        assert p.returncode == 0, (command, p.stderr[-2000:])
    for folder in ("smoke", "fashion-mnist-dynamic+-s0.8-seed0", "smoke-ddp"):
        assert (repo / "runs" / folder / "summary.json").exists() and (repo / "runs" / folder / "curves.png").exists()
    result = json.loads((repo / "runs" / "smoke" / "eval-best-test-n500-pgd50x1-aa-standard-i10.json").read_text())
    assert result["examples"] == 500 and result["autoattack"]["iters"] == 10


def test_every_mutation_of_the_mutation_check_still_applies():
    """.ci/mutants.py's fragments occur exactly once in sparse_win.py (an edit that moves one must update it),
    and each names tests that exist in the default suite."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutants", HERE / ".ci" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    src, tests = (HERE / "sparse_win.py").read_text(), (HERE / "test_sparse_win.py").read_text()
    assert [name for name, old, _, _ in mutants.MUTATIONS if src.count(old) != 1] == []
    assert f"plants {len(mutants.MUTATIONS)} realistic bugs" in " ".join((HERE / "README.md").read_text().split())
    for name, _, _, selection in mutants.MUTATIONS:
        assert all(f"def {t.strip()}" in tests for t in selection.split(" or ")), name


def test_pyproject_deselects_slow_tests_and_skips_benchmarks():
    """What test_plain_pytest_is_the_default_suite (slow) checks by running pytest, read from pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["addopts"].split() == ["-m", "'not", "slow'", "--benchmark-skip"]
    assert {m.split(":")[0] for m in options["markers"]} == {"slow", "cuda"}


@pytest.mark.slow
def test_plain_pytest_is_the_default_suite():
    """`python -m pytest` with no flags (pyproject.toml): slow tests deselected, benchmarks skipped."""
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k",
                        "test_cpu_demo_learns or test_bench_mask_apply or test_normalize_module"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:]
    assert "1 passed, 1 skipped, " in p.stdout and "deselected" in p.stdout, p.stdout[-2000:]
    assert "benchmark-skip" in p.stdout  # the skip reason names pytest-benchmark's option
