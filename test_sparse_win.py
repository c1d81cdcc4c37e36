"""Tests of sparse_win.py: properties of the library parts, the training program end to end,
and benchmarks against in-run baselines.

    python -m pytest -p test_sparse_win test_sparse_win.py -q            # default suite (CI)
    python -m pytest -p test_sparse_win test_sparse_win.py -m slow       # the longer runs
    python -m pytest -p test_sparse_win test_sparse_win.py --benchmark-only

`-p test_sparse_win` loads this file as a plugin too, so that pytest_configure below registers
the `slow` marker and deselects slow tests unless -m is given. Benchmarks (pytest-benchmark)
are skipped by default; their groups put our code beside its baseline, and the "(x.xx)" in
the table is the ratio. Hypothesis runs the "ci" profile (derandomized) when CI is set.
"""
import copy
import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sparse_win as sw

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer runs, deselected by default (run with -m slow)")
    if not config.getoption("markexpr"):
        config.option.markexpr = "not slow"
    if not config.getoption("benchmark_only", False) and not config.getoption("benchmark_skip", False):
        config.option.benchmark_skip = True  # benchmarks run with --benchmark-only


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
# library: models, masks, attack, early bird, FLOPs
# =============================================================================

# Library half of sparse_win.py: models, attack, masks, early bird, FLOPs.
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


# ----------------------------------------------------------------------------- 1. allocation

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
    per_weight = sw.layer_flops(net, (3, 32, 32))
    params = sw.prunable(net)
    shapes = [tuple(p.shape) for p in params.values()]
    dense = sw.forward_flops(per_weight, {n: p.numel() for n, p in params.items()})
    expect = {0.2: dict(igq=0.516, erk=0.508, uniform=0.200), 0.1: dict(igq=0.357, erk=0.248, uniform=0.100)}
    for density, table in expect.items():
        for alloc, ratio in table.items():
            counts = dict(zip(params, sw.allocate_counts(shapes, density, alloc)))
            assert abs(sw.forward_flops(per_weight, counts) / dense - ratio) <= 0.0005, (density, alloc)


# ----------------------------------------------------------------------------- 2. topology updates

def check_update(mask, model, opt, death_rate, growth):
    """One update with every property checked against a slow reference; returns nothing."""
    params = sw.prunable(model)
    before = {n: mask.masks[n].clone() for n in mask.names}
    w0 = {n: params[n].detach().clone() for n in mask.names}
    m0 = {n: momentum(opt, params[n]).clone() for n in mask.names}
    g0 = {n: params[n].grad.clone() for n in mask.names}
    ever0 = {n: mask.ever_active[n].clone() for n in mask.names}
    itop0, counts0, density0 = mask.itop_rate(), list(mask.counts), mask.density

    info = mask.update(death_rate, growth=growth, optimizer=opt)

    total = 0
    for i, n in enumerate(mask.names):
        b, a = before[n].reshape(-1), mask.masks[n].reshape(-1)  # logical order, any memory format
        nnz, size = counts0[i], b.numel()
        k = min(math.ceil(death_rate * nnz), size - nnz)
        dropped = (b & ~a).nonzero().view(-1).tolist()
        grown = (~b & a).nonzero().view(-1).tolist()
        assert len(dropped) == k and len(grown) == k
        assert mask.counts[i] == nnz == int(a.sum())  # per-layer count unchanged
        w_before = w0[n].reshape(-1).tolist()
        active = b.nonzero().view(-1).tolist()
        inactive = (~b).nonzero().view(-1).tolist()
        assert_chosen(w_before, active, dropped, k)  # pruned: smallest |w| among the active
        if growth == "gradient":  # grown: largest |grad| among the previously inactive
            assert_chosen(g0[n].reshape(-1).tolist(), inactive, grown, k, largest=True)
        touched = torch.zeros_like(b)
        touched[dropped + grown] = True
        w, mom = params[n].detach().reshape(-1), momentum(opt, params[n]).reshape(-1)
        assert torch.equal(w[~touched], w0[n].reshape(-1)[~touched])  # never touched: same values
        assert torch.equal(mom[~touched], m0[n].reshape(-1)[~touched])
        assert torch.equal(w[touched], torch.zeros_like(w[touched]))  # pruned + regrown start at 0
        assert torch.equal(mom[touched], torch.zeros_like(mom[touched]))
        assert torch.equal(mask.ever_active[n], ever0[n] | mask.masks[n])
        total += k
    assert info == dict(pruned=total, grown=total)
    assert mask.density == density0
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


def test_gradient_growth_needs_grad():
    model = nn.Sequential(nn.Linear(6, 6))
    mask = sw.SparseMask(model, density=0.5)
    with pytest.raises(sw.SparseWinError):
        mask.update(0.3, growth="gradient")


def expected_count(nnz, size, p, extra_prune, extra_growth):
    """FB+ per-layer count after update (PAPER_SPEC Sec. 5, caps as documented in update())."""
    k = min(math.ceil(p * nnz), size - nnz)
    drop = k + (max(0, min(math.ceil(p * extra_prune * nnz), nnz - k - 1)) if extra_prune else 0)
    grow = min(k + (math.ceil(extra_growth * k) if extra_growth else 0), size - nnz)
    return nnz - drop + grow, drop, grow


@settings(max_examples=40, deadline=None)
@given(spec=chain_specs(), density=DENSITIES, seed=SEEDS, p=st.floats(0.005, 0.5),
       which=st.sampled_from(["prune", "grow", "both"]))
def test_fbplus_extra_prune_and_growth_counts(spec, density, seed, p, which):
    model = chain_model(spec, torch.Generator().manual_seed(seed))
    mask = sw.SparseMask(model, density=density, seed=seed)
    ep, eg = (0.4 if which != "grow" else 0.0), (0.05 if which != "prune" else 0.0)
    counts0, sizes = list(mask.counts), list(mask.sizes)
    # k == nnz (a one-weight layer at p = 0.5) is test_extra_prune_never_raises_count's case
    assume(all(min(math.ceil(p * n), s - n) < n for n, s in zip(counts0, sizes)))
    before = {n: mask.masks[n].clone() for n in mask.names}
    w0 = {n: mask.params[n].detach().view(-1).tolist() for n in mask.names}
    info = mask.update(p, extra_prune=ep, extra_growth=eg)
    drops = grows = 0
    for i, n in enumerate(mask.names):
        nnz, size = counts0[i], sizes[i]
        want, drop, grow = expected_count(nnz, size, p, ep, eg)
        assert mask.counts[i] == int(mask.masks[n].sum()) == want
        k = min(math.ceil(p * nnz), size - nnz)
        if ep and not eg and k + math.ceil(p * ep * nnz) < nnz:  # uncapped: exactly ceil(p * 0.4 * nnz) fewer
            assert want == nnz - math.ceil(p * ep * nnz)
        if eg and not ep and k + math.ceil(eg * k) <= size - nnz:  # uncapped: ceil(0.05 k) more
            assert want == nnz + math.ceil(eg * k)
        b, a = before[n].view(-1), mask.masks[n].view(-1)
        dropped = (b & ~a).nonzero().view(-1).tolist()
        assert len((~b & a).nonzero()) == grow
        assert_chosen(w0[n], b.nonzero().view(-1).tolist(), dropped, drop)
        drops, grows = drops + drop, grows + grow
    assert info == dict(pruned=drops, grown=grows)


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


# ----------------------------------------------------------------------------- 3. cosine death rate

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


# ----------------------------------------------------------------------------- 4. FB+ decision

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


# ----------------------------------------------------------------------------- 5. mask state round trip

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


# ----------------------------------------------------------------------------- 6. PGD

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


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 12), k=st.integers(2, 6), b=st.integers(1, 5), seed=SEEDS,
       eps=st.floats(0.01, 0.3))
def test_pgd_one_step_closed_form_linear(d, k, b, seed, eps):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    x = torch.rand(b, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=gen)
    adv = sw.pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False)
    W, bias = model.weight.detach(), model.bias.detach()
    g = (torch.softmax(x @ W.T + bias, dim=1) - F.one_hot(y, k).double()) @ W  # dCE/dx per sample
    want = torch.clamp(x + eps * g.sign(), 0, 1)
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


# ----------------------------------------------------------------------------- 7. evaluate

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


# ----------------------------------------------------------------------------- 8. early bird

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
    assert fired[:4] == [False] * 4  # the queue is not full yet
    assert fired[-1] and eb.emerged
    first = fired.index(True)
    assert eb.distances[first] <= 0.08 < max(eb.distances[:first])
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


# ----------------------------------------------------------------------------- 9. FLOPs

def flop_counter(model, input_shape):
    fc = FlopCounterMode(display=False)
    p = next(model.parameters())
    with fc, torch.no_grad():
        model(torch.zeros(1, *input_shape, dtype=p.dtype))
    return fc


def check_flops_against_counter(model, input_shape):
    """Total and per-layer dense FLOPs of layer_flops agree with FlopCounterMode."""
    training = model.training
    per_weight = sw.layer_flops(model, input_shape)
    assert model.training == training  # layer_flops restores the mode
    model.eval()
    params = sw.prunable(model)
    assert set(per_weight) == set(params)
    dense = sw.forward_flops(per_weight, {n: p.numel() for n, p in params.items()})
    fc = flop_counter(model, input_shape)
    total = fc.get_total_flops()
    assert abs(dense - total) <= 0.01 * total
    counts = fc.get_flop_counts()
    root = type(model).__name__
    for n, p in params.items():
        mod = n[: -len(".weight")]
        assert per_weight[n] * p.numel() == sum(counts[f"{root}.{mod}"].values()), n
    return per_weight, dense


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16", "wrn"])
def test_dense_flops_match_flop_counter(arch):
    model = sw.build_model(arch, width=1.0, wrn_depth=10, wrn_widen=2)
    _, dense = check_flops_against_counter(model.train(), (3, 32, 32))  # train mode: BN must not break it
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
    per_weight, _ = check_flops_against_counter(UserNet(), (2, 8, 8))
    assert per_weight == {"a.weight": 2 * 16, "b.weight": 2 * 16, "tok.weight": 2 * 16, "head.weight": 2}


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        return self.l(torch.tanh(self.l(x)))  # one weight, used twice per image


def test_layer_flops_counts_every_call_of_a_shared_layer():
    model = SharedNet()
    per_weight = sw.layer_flops(model, (8,))
    assert sw.forward_flops(per_weight, {"l.weight": 64}) == flop_counter(model, (8,)).get_total_flops()


@settings(max_examples=20, deadline=None)
@given(cin=st.integers(1, 4), cout_g=st.integers(1, 3), groups=st.integers(1, 2), k=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 2), dil=st.integers(1, 2), hw=st.integers(5, 10))
def test_conv_flops_closed_form(cin, cout_g, groups, k, stride, pad, dil, hw):
    conv = nn.Conv2d(cin * groups, cout_g * groups, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    out = (hw + 2 * pad - dil * (k - 1) - 1) // stride + 1
    assume(out >= 1)
    model = nn.Sequential(conv)
    per_weight = sw.layer_flops(model, (cin * groups, hw, hw))
    assert per_weight == {"0.weight": 2 * out * out}
    assert per_weight["0.weight"] * conv.weight.numel() == flop_counter(model, (cin * groups, hw, hw)).get_total_flops()


@settings(max_examples=8, deadline=None)
@given(density=st.floats(0.02, 1.0), alloc=ALLOCS, seed=SEEDS)
def test_sparse_flops_per_layer(density, alloc, seed):
    model = sw.build_model("resnet18", width=0.125)
    mask = sw.SparseMask(model, density=density, allocation=alloc, seed=seed)
    per_weight = sw.layer_flops(model, (3, 16, 16))
    counts = mask.layer_counts()
    sparse = sw.forward_flops(per_weight, counts)
    assert sparse == sum(per_weight[n] * int(mask.masks[n].sum()) for n in mask.names)
    dense_l = {n: per_weight[n] * mask.masks[n].numel() for n in mask.names}
    torch.testing.assert_close(float(sparse), sum(counts[n] / mask.masks[n].numel() * dense_l[n] for n in mask.names),
                               rtol=1e-12, atol=0)
    if density == 1.0:
        assert sparse == sum(dense_l.values())


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


# ----------------------------------------------------------------------------- 10. models

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


# =============================================================================
# program: config, data, training, report, CLI
# =============================================================================

# End-to-end tests of the training program (config, data, train, report, main).
# Every run uses the `smoke` preset (Fashion-MNIST from Debian's dataset-fashion-mnist,
# 4-channel ResNet-18, PGD-2) with its run directory and data dir under tmp_path.

HERE = Path(sw.__file__).resolve().parent
K = sw.PRESETS["smoke"]["train_steps"]  # training PGD steps of the smoke preset
N_TRAIN = sw.PRESETS["smoke"]["train_subset"]
REC_KEYS = {"epoch", "lr", "train_loss", "train_ra", "val_sa", "val_ra", "val_adv_loss", "test_sa", "test_ra",
            "test_adv_loss", "density", "train_flops", "train_flops_paper", "itop", "time"}
WALL = {"time", "wall_seconds"}  # wall-clock fields: the only ones allowed to differ after a resume


def smoke(out, data_dir, *extra) -> list[str]:
    return ["--preset", "smoke", "--out", str(out), "--data-dir", str(data_dir), "--no-download", *map(str, extra)]


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


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
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
    return run_ok(smoke(tmp_path_factory.mktemp("fbp") / "run", data_dir, *FBPLUS))


@pytest.fixture(scope="module")
def static_run(tmp_path_factory, data_dir):
    return run_ok(smoke(tmp_path_factory.mktemp("static") / "run", data_dir, "--mode", "static"))


# ----------------------------------------------------------------------------- 1. end to end

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
    per_weight = sw.layer_flops(net, (1, 28, 28))
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
        for n, m in last["mask"]["masks"].items():  # masked weights are zero in the saved model
            assert m.shape == last["model"][n].shape and not last["model"][n][~m].any()
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


def test_fbplus_end_to_end(fbplus_run):
    recs, s, last, per_weight = check_common(fbplus_run, "dynamic+", 3)
    net, shapes, counts, target = smoke_igq()
    ups = last["run"]["updates"]
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
    # FLOPs: before any event the per-layer counts are IGQ's; afterwards cheaper steps
    fwd0 = sw.forward_flops(per_weight, dict(zip(sw.prunable(net), counts)))
    for e in (1, 2):
        assert recs[e - 1]["train_flops"] == (2 * K + 3) * fwd0 * N_TRAIN * e
    assert recs[2]["train_flops"] - recs[1]["train_flops"] < (2 * K + 3) * fwd0 * N_TRAIN
    assert s["train_flops_paper"] * (2 * K + 3) == s["train_flops"] * 3 * (K + 1)
    assert s["inference_flops"] < fwd0


def test_static_end_to_end(static_run):
    recs, s, last, per_weight = check_common(static_run, "static", 2)
    net = smoke_model()
    total = sum(p.numel() for p in sw.prunable(net).values())
    # no early bird in 2 epochs (queue of 5): stage 1 stops at --eb-max-epochs 2
    assert s["ticket_epochs"] == 2 and len(s["early_bird_distances"]) == 2
    assert s["early_bird_distances"][0] == 1.0 and 0 <= s["early_bird_distances"][1] <= 1
    # global magnitude ticket: exactly round(d * total) weights over conv + linear
    target = round(0.2 * total) / total
    assert s["final_density"] == target and all(r["density"] == target for r in recs)
    assert s["topology_updates"] == 0 and s["fbplus_events"] == []
    # stage 1 is standard training (3x forward per image per step) at full density
    assert s["ticket_flops"] == 3 * s["inference_flops_dense"] * N_TRAIN * 2 > 0
    fwd = s["inference_flops"]
    for e, r in enumerate(recs, 1):
        assert r["train_flops"] == s["ticket_flops"] + (2 * K + 3) * fwd * N_TRAIN * e
    assert s["inference_ratio"] == fwd / s["inference_flops_dense"] < 1
    # the ticket mask stays fixed: never-active weights stay out, ITOP = density
    assert all(r["itop"] == target for r in recs)


def test_training_loss_falls(tmp_path, data_dir):
    d = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dense", "--epochs", 3, "--train-steps", 1,
                     "--lr", 0.05, "--width", 0.125, "--train-subset", 512, "--milestones", 10))
    recs, s = read_run(d)
    losses = [r["train_loss"] for r in recs]
    assert losses[-1] < losses[0] - 0.1, losses
    assert s["train_flops_paper"] * 5 == s["train_flops"] * 6  # PGD-1: 3 x 2 vs 2 + 3


# ----------------------------------------------------------------------------- 2. resume

def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in WALL}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


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
    assert ck["run"]["phase"] == "ticket" and ck["run"]["ticket_epochs"] == 1
    # resume, stop after the first adversarial epoch, resume again
    assert sw.main(args + ["--resume", "--stop-after-epoch", "1"]) == 0
    assert load_ck(tmp_path / "run" / "last.pt")["run"]["phase"] == "adv"
    run_ok(args + ["--resume"])
    assert_same_run(static_run, tmp_path / "run")


# ----------------------------------------------------------------------------- 3. CLI errors

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
])
def test_cli_bad_options(capsys, tmp_path, args, words):
    assert_cli_error(capsys, ["--preset", "smoke", "--out", tmp_path / "run", *args], *words)
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_cli_missing_cifar(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = assert_cli_error(capsys, ["--preset", "smoke", "--dataset", "cifar10", "--no-download", "--data-dir",
                                     tmp_path / "empty", "--out", tmp_path / "run"], "cifar10", "data_batch_1")
    assert "cifar-10-batches-py" in line


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


def test_cli_unwritable_out(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_cli_error(capsys, ["--preset", "smoke", "--out", tmp_path / "file" / "sub"], "cannot write", "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_cli_resume_without_checkpoint(capsys, tmp_path):
    assert_cli_error(capsys, ["--preset", "smoke", "--resume", "--out", tmp_path / "run"], "--resume", "last.pt")


def test_cli_resume_unreadable_checkpoint(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    assert_cli_error(capsys, smoke(run, data_dir, "--resume"), "last.pt", "not a readable")
    assert (run / "last.pt").read_bytes() == b"not a checkpoint"


def test_run_killed_before_first_checkpoint_can_start_again(tmp_path, data_dir):
    """metrics.jsonl without last.pt (killed in epoch 1): nothing to resume, so a new run may start."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    run_ok(smoke(run, data_dir, "--epochs", 1, "--train-subset", 64))
    assert len(read_run(run)[0]) == 1


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


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


def test_cli_subprocess_one_line():
    p = subprocess.run([sys.executable, "sparse_win.py", "--sparsity", "2"], cwd=HERE, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["sparse_win.py: error: --sparsity must be in [0, 1), got 2.0"]
    assert p.stdout == ""


# ----------------------------------------------------------------------------- 4. data loaders

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


# ----------------------------------------------------------------------------- 5. augment

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


# ----------------------------------------------------------------------------- 6. parse_args

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
    assert cfg.epochs == 200 and cfg.lr == 0.1 and cfg.milestones == (100, 150) and cfg.batch_size == 128
    assert cfg.momentum == 0.9 and cfg.weight_decay == 5e-4 and cfg.arch == "resnet18"
    assert cfg.train_steps == 10 and cfg.test_steps == 20 and cfg.norm == "linf"
    assert cfg.eps(train=True) == (8 / 255, 2 / 255) and cfg.eps(train=False) == (8 / 255, 2 / 255)
    assert cfg.update_interval == 900 and cfg.update_interval_late == 1200 and cfg.allocation == "igq"
    assert cfg.growth == "random" and cfg.death_rate == 0.5 and cfg.death_rate_final == 0.005
    assert (cfg.fbplus_window, cfg.fbplus_prune, cfg.fbplus_grow, cfg.fbplus_threshold) == (4, 0.4, 0.05, 0.5)
    assert cfg.fbplus_start_epoch == 100 and (cfg.eb_threshold, cfg.eb_queue) == (0.08, 5)
    assert sw.DATASETS["cifar100"]["rotate"] == 15
    assert sw.parse_args(["--dataset", "fashion-mnist"]).eps(train=True) == pytest.approx((0.1, 0.025))


# ----------------------------------------------------------------------------- 7. summary / table

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


# ----------------------------------------------------------------------------- 8. benchmark

def test_benchmark_cpu(monkeypatch, capsys):
    rows = []
    real = sw.benchmark
    monkeypatch.setattr(sw, "benchmark", lambda cfg, log=print: rows.extend(real(cfg, log)) or rows)
    assert sw.main(["--benchmark", "--preset", "smoke", "--batch-size", "8", "--device", "cpu"]) == 0
    assert [(r["variant"], r["model"]) for r in rows] == [("fp32 eager", "dense"), ("fp32 eager", "sparse")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["epoch_s"] == pytest.approx(45000 / r["images_per_s"])
        assert r["tflops"] > 0 and r["peak_fraction"] is None
    out = capsys.readouterr().out
    assert out.count("img/s") == 2


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
    """Peak resident memory of a PGD AT step, with masks vs dense (target: within 5%)."""
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


# ----------------------------------------------------------------------------- README and demo

def test_readme_snippet_runs():
    """The README's "own training loop" example runs as printed and keeps its density."""
    import re
    code = re.findall(r"```python\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert len(code) == 1
    scope = {}
    exec(compile(code[0], "README.md", "exec"), scope)
    mask, ledger = scope["mask"], scope["ledger"]
    assert mask.density == pytest.approx(0.2, abs=1e-4) and mask.counts == [int(m.sum()) for m in mask.masks.values()]
    assert ledger.steps == 4 and ledger.actual > 0 and ledger.paper == ledger.actual * 12 // 9  # K=3: 12x vs 9x


@pytest.mark.slow
def test_cpu_demo_learns(tmp_path):
    """The README's first command (FB+ on Fashion-MNIST): robust accuracy far above chance."""
    assert sw.main(["--preset", "cpu-demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    recs, summary = read_run(tmp_path / "demo")
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert summary["ra_best"] > 40 and summary["sa_best"] > 60  # chance is 10%
    assert summary["topology_updates"] > 0 and summary["itop_rate"] > summary["final_density"]


def test_dynamic_sparse_standard_training_updates_topology(tmp_path, data_dir):
    """Flying Bird without an attack (--train-steps 0) still prunes and regrows on schedule."""
    run = run_ok(smoke(tmp_path / "run", data_dir, "--mode", "dynamic", "--train-steps", 0, "--epochs", 1))
    _, summary = read_run(run)
    steps = update_steps(1, N_TRAIN // 64, 2, 3)  # one epoch: all of it is the "late" half, T = 3
    assert summary["topology_updates"] == len(steps) == 1 and summary["itop_rate"] > summary["final_density"]


@pytest.mark.slow
def test_run_experiments_smoke():
    """run_experiments.sh --smoke: the 12 Table-1 commands for a few steps, then one table row each."""
    out = subprocess.run(["bash", str(HERE / "run_experiments.sh"), "--smoke"], capture_output=True, text=True,
                         cwd=HERE, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "seed0" in line]
    assert len(rows) == 12
    for data in ("cifar10", "cifar100", "tiny-imagenet"):
        for method in ("dense AT", "Robust Bird", "Flying Bird,", "Flying Bird+"):
            assert sum(r.startswith(f"| {data}-") and method in r for r in rows) == 1, (data, method)


# =============================================================================
# study report: many runs -> table.md and three figures
# =============================================================================

STUDY_KEYS = [k for _, k, _ in sw.STUDY_COLUMNS] + ["train_ra_final"]


def fake_run(d: Path, mode: str, sparsity: float, seed: int, value: float, history: list[tuple]):
    """A finished run dir: every summary value = value (ra_best = value too), epochs (test_ra, train_ra)."""
    d.mkdir(parents=True)
    summary = dict({k: value for k in STUDY_KEYS}, mode=mode, sparsity=sparsity, method=sw.METHOD[mode])
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.json").write_text(json.dumps(dict(mode=mode, sparsity=sparsity, seed=seed)))
    (d / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=i + 1, test_ra=t, train_ra=r)) + "\n"
                                             for i, (t, r) in enumerate(history)))


def test_mean_std_is_sample_std():
    assert sw.mean_std([5.0]) == (5.0, 0.0)
    values = [0.3, 1.7, 2.2, 9.1]
    mean, std = sw.mean_std(values)
    torch.testing.assert_close((mean, std), (float(np.mean(values)), float(np.std(values, ddof=1))))


def test_study_report_means_stds_and_figures(tmp_path):
    root = tmp_path / "runs"
    for seed, v in enumerate((50.0, 54.0)):  # dense AT, given --sparsity 0.8: keyed at sparsity 0
        fake_run(root / "dense-s0.8" / f"seed{seed}", "dense", 0.8, seed, v, [(10.0, 20.0), (30.0, 40.0)])
    for seed, v in enumerate((40.0, 42.0, 47.0)):
        fake_run(root / "dynamic-s0.8" / f"seed{seed}", "dynamic", 0.8, seed, v, [(1.0, 2.0)])
    fake_run(root / "dynamic-s0.5" / "seed0", "dynamic", 0.5, 0, 33.0, [(1.0, 2.0)])
    (root / "unfinished").mkdir()  # no summary.json: not a run
    (root / "unfinished" / "metrics.jsonl").write_text("")
    stats = sw.study_report(root, tmp_path / "report", log=lambda *a: None)

    assert list(stats) == [("dense", 0.0), ("dynamic", 0.5), ("dynamic", 0.8)]
    dense, fb, fb5 = stats[("dense", 0.0)], stats[("dynamic", 0.8)], stats[("dynamic", 0.5)]
    assert (dense["n"], dense["seeds"], fb["n"], fb["seeds"], fb5["n"]) == (2, [0, 1], 3, [0, 1, 2], 1)
    for k in STUDY_KEYS:  # hand-computed: (50+54)/2, sqrt((4+4)/1); (40+42+47)/3, sqrt((9+1+16)/2)
        assert dense[k] == (52.0, math.sqrt(8.0))
        assert fb[k] == (43.0, math.sqrt(13.0))
        assert fb5[k] == (33.0, 0.0)

    table = (tmp_path / "report" / "table.md").read_text()
    main, sweep = table.split("across sparsity")
    assert "| dense AT | 2 | 52.00 ± 2.83 | 52.00 ± 2.83 |" in main
    assert "| Flying Bird s=0.8 | 3 | 43.00 ± 3.61 |" in main and "s=0.5" not in main
    assert "| Flying Bird s=0.5 | 1 | 33.00 ± 0.00 |" in sweep and "| Flying Bird s=0.8 | 3 |" in sweep
    assert "dense AT" not in sweep
    assert sweep.splitlines()[-1].endswith("| 43.000 ± 3.606 | 43.0000 ± 3.6056 | 43.00 ± 3.61 |")  # + train RA
    for name in ("curves.png", "gap.png", "sparsity.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob("*.tmp*"))


def test_study_report_without_runs_says_so(tmp_path):
    with pytest.raises(sw.SparseWinError, match="no finished runs"):
        sw.study_report(tmp_path, tmp_path / "report")


@pytest.mark.slow
def test_run_experiments_study_smoke():
    """run_experiments.sh --study-smoke: 4 methods x 3 seeds + the FB sweep, then table.md and three figures."""
    out = subprocess.run(["bash", str(HERE / "run_experiments.sh"), "--study-smoke"], capture_output=True,
                         text=True, cwd=HERE, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = Path(out.stdout.splitlines()[-1].removeprefix("report in ")).parent
    main, sweep = (report / "table.md").read_text().split("across sparsity")
    rows = lambda text: [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")][1:]  # noqa: E731
    assert rows(main) == [["| dense AT", "3"], ["| Robust Bird s=0.8", "3"], ["| Flying Bird s=0.8", "3"],
                          ["| Flying Bird+ s=0.8", "3"]]
    assert rows(sweep) == [["| Flying Bird s=0", "1"], ["| Flying Bird s=0.5", "1"], ["| Flying Bird s=0.8", "3"],
                           ["| Flying Bird s=0.9", "1"], ["| Flying Bird s=0.95", "1"]]
    assert len(list((report / "runs").glob("*/seed*/log.txt"))) == 16
    for name in ("curves.png", "gap.png", "sparsity.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

