import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
import sparse_win as sw

import copy
import io
import random

from hypothesis import assume
from torch.utils.flop_counter import FlopCounterMode

# Library half of sparse_win.py: models, attack, masks, early bird, FLOPs.
# Hypothesis draws shapes, densities and seeds; torch fills values from a seeded Generator.

SEEDS = st.integers(0, 2**31 - 1)
DENSITIES = st.floats(0.01, 1.0)  # sparsity 0 .. 0.99
ALLOCS = st.sampled_from(["igq", "erk", "uniform"])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add sync cost (16 ms vs 0.1 ms per conv on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    # same seed -> same masks, on another model of the same shapes
    other = sw.SparseMask(model_from_shapes(shapes, torch.Generator().manual_seed(seed + 1)),
                          density=density, allocation=alloc, seed=seed)
    assert all(torch.equal(mask.masks[n], other.masks[n]) for n in mask.names)


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


@pytest.mark.xfail(reason="BUG: update(extra_prune=...) regrows a weight more than it prunes when "
                          "k == nnz (nnz - k - 1 < 0 makes the extra prune negative)", strict=True)
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


@pytest.mark.xfail(reason="BUG: layer_flops keeps only the last call of a module (out[name] = ...), "
                          "so a layer used twice in forward is counted once", strict=True)
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
