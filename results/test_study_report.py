"""Tests of results/study_report.py, the tables and figures of the Fashion-MNIST studies.

    python -m pytest -q results/test_study_report.py      # also part of the default suite
    python -m pytest -m slow results/test_study_report.py # the studies' smoke runs through run_experiments.sh
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import study_report  # results/study_report.py (pytest puts this folder on sys.path; the script adds the repository)
import sparse_win as sw

HERE = Path(sw.__file__).resolve().parent  # the repository


STUDY_KEYS = [k for _, k, _ in study_report.STUDY_COLUMNS] + ["train_ra_final"]


def fake_run(d: Path, mode: str, sparsity: float, seed: int, value: float, history: list[tuple]):
    """A finished run dir: every summary value = value (ra_best = value too), epochs (test_ra, train_ra)."""
    d.mkdir(parents=True)
    summary = dict({k: value for k in STUDY_KEYS}, mode=mode, sparsity=sparsity, method=sw.METHOD[mode])
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.json").write_text(json.dumps(dict(mode=mode, sparsity=sparsity, seed=seed)))
    (d / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=i + 1, test_ra=t, train_ra=r)) + "\n"
                                             for i, (t, r) in enumerate(history)))


def test_mean_std_is_sample_std():
    assert study_report.mean_std([5.0]) == (5.0, 0.0)
    values = [0.3, 1.7, 2.2, 9.1]
    mean, std = study_report.mean_std(values)
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
    stats = study_report.study_report(root, tmp_path / "report", log=lambda *a: None)

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
    assert "| Flying Bird s=0.5 | 1 | 33.00 | 33.00 |" in sweep and "| Flying Bird s=0.8 | 3 |" in sweep  # no ± 0.00
    assert "dense AT" not in sweep
    assert sweep.splitlines()[-1].endswith("| 43.000 ± 3.606 | 43.0000 ± 3.6056 | 43.00 ± 3.61 |")  # + train RA
    for name in ("curves.png", "gap.png", "sparsity.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob("*.tmp*"))


def test_study_report_without_runs_says_so(tmp_path):
    with pytest.raises(sw.SparseWinError, match="no finished runs"):
        study_report.study_report(tmp_path, tmp_path / "report")


def test_study_report_writes_the_committed_table_again(tmp_path, monkeypatch):
    """The committed results/fashion-mnist/table.md, written again from the committed runs, byte for byte
    (made as README says, from the repository: the table names its runs folder as given)."""
    monkeypatch.chdir(HERE)
    study_report.study_report("results/fashion-mnist/runs", tmp_path, log=lambda *a: None)
    assert (tmp_path / "table.md").read_text() == (HERE / "results" / "fashion-mnist" / "table.md").read_text()


def test_t_test_p_against_known_values():
    """Student's t, two-sided: the closed forms of 1 and 2 d.o.f., the tables' 5% points, the normal limit."""
    p = study_report.t_test_p
    assert p(2.0, 2) == pytest.approx(0.1835, abs=1e-4)
    assert p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-12)
    for t in (0.3, 1.5, 7.0):  # df 1 (Cauchy): 1 - 2 atan|t| / pi; df 2: 1 - |t| / sqrt(t^2 + 2)
        assert p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
        assert p(-t, 2) == p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)
    for t, df in ((12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.228, 10), (1.960, 10**6)):
        assert p(t, df) == pytest.approx(0.05, abs=2e-4), (t, df)
    assert (p(0.0, 3), p(math.inf, 3)) == (1.0, 0.0)
    assert study_report.betainc(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)  # sum_j>=2 C(4,j) .4^j .6^(4-j)
    assert study_report.betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)), rel=1e-12)


def test_paired_t_test():
    t, pv = study_report.paired_t_test([1.0, 2.0, 3.0])  # mean 2, std 1: t = 2 sqrt(3), 2 d.o.f.
    assert t == pytest.approx(2 * math.sqrt(3)) and pv == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert study_report.paired_t_test([-1.0, -2.0, -3.0])[0] == pytest.approx(-t)
    assert study_report.paired_t_test([1.5]) is None and study_report.paired_t_test([0.0, 0.0]) is None
    assert study_report.paired_t_test([2.0, 2.0]) == (math.inf, 0.0)


def test_active_weights_from_the_summary_or_the_config():
    aw = study_report.active_weights
    cfg = dict(arch="resnet18", dataset="fashion-mnist", width=0.125, mode="dynamic", sparsity=0.8, seed=0)
    assert aw(dict(final_density=0.2), cfg) == 35010  # 0.2 x the 175,048 conv + linear weights at width 0.125
    assert aw(dict(final_density=1.0), dict(cfg, mode="dense", width=0.056)) == 35544
    assert aw(dict(active_weights=1234, final_density=0.2), cfg) == 1234  # recorded counts come first
    assert aw(dict(weights=dict(active=99, dense=175048), final_density=0.2), cfg) == 99
    small = dict(cfg, mode="small-dense", sparsity=0.9)  # --mode small-dense: dense at the width it chose
    assert aw(dict(mode="small-dense", width=0.04, final_density=1.0), small) == 17376
    assert aw(dict(mode="small-dense", final_density=1.0), small) == 17505  # no width recorded: its target
    assert aw(dict(final_density=0.5), dict(cfg, dataset="no-such-data")) is None
    assert aw({}, cfg) is None


def fake_overfit_run(d: Path, seed: int, mode: str, width: float, density: float, best_test: float,
                     last_test: float, last_train: float):
    """A finished, evaluated overfit-study run (resnet18, Fashion-MNIST): PGD-20 RA best.pt test = best_test,
    final model test = last_test, final model train = last_train (best.pt train = last_train too)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(arch="resnet18", dataset="fashion-mnist", width=width,
                                                   mode=mode, sparsity=round(1 - density, 4), seed=seed)))
    (d / "summary.json").write_text(json.dumps(dict(
        mode=mode, best_epoch=50, train_flops_dense_ratio=density, inference_ratio=density, final_density=density,
        fbplus_events=[], wall_seconds=600.0)))
    (d / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, test_ra=last_test, train_ra=last_train)) + "\n")
    for ck, split, ra in (("best", "test-n2000", best_test), ("last", "test-n2000", last_test),
                          ("best", "train-all", last_train), ("last", "train-all", last_train)):
        (d / f"eval-{ck}-{split}-pgd20x1.json").write_text(json.dumps(dict(pgd=dict(ra=ra), sa=80.0, wall_seconds=6.0)))


def test_overfit_capacity_section_pairs_by_count(tmp_path):
    """Sparse variants paired by seed with the small dense AT of their active weights; missing ones marked;
    the report regenerates byte for byte."""
    root = tmp_path / "runs"
    for seed in (0, 1, 2):  # small dense: gap 30, RA final 60, RA best 61 on every seed
        fake_overfit_run(root / "dense" / f"seed{seed}", seed, "dense", 0.125, 1.0, 61.0, 60.0, 95.0)
        fake_overfit_run(root / "small-dense-w0.056" / f"seed{seed}", seed, "dense", 0.056, 1.0, 61.0, 60.0, 90.0)
        # Flying Bird 80%: gap 30 + 1, 2, 3; RA final equal; RA best 1 more on every seed
        fake_overfit_run(root / "fb-s0.8" / f"seed{seed}", seed, "dynamic", 0.125, 0.2, 62.0, 60.0, 91.0 + seed)
    for seed in (1, 2):
        fake_overfit_run(root / "small-dense-w0.04" / f"seed{seed}", seed, "dense", 0.04, 1.0, 61.0, 60.0, 90.0)
    fake_overfit_run(root / "fb-s0.9" / "seed1", 1, "dynamic", 0.125, 0.1, 63.0, 61.5, 90.0)
    fake_overfit_run(root / "fb-s0.9" / "seed0", 0, "dynamic", 0.125, 0.1, 63.0, 61.5, 90.0)
    fake_overfit_run(root / "fbplus-s0.8" / "seed2", 2, "dynamic+", 0.125, 0.1, 62.0, 59.0, 90.0)
    fake_overfit_run(root / "fixed-mask-s0.95" / "seed0", 0, "dynamic", 0.125, 0.05, 60.0, 59.0, 88.0)
    (root / "fb-s0.95" / "seed0").mkdir(parents=True)  # still training: not a run yet
    report = tmp_path / "report"
    groups = study_report.overfit_report(root, report, log=lambda *a: None)
    assert [r["weights"] for r in groups["fb-s0.8"]] == [35010] * 3
    assert [r["weights"] for r in groups["small-dense-w0.04"]] == [17376] * 2

    text = (report / "table.md").read_text()
    variants, capacity = text.split("## Capacity")
    assert "| small dense AT (width 0.056, as many weights as 80% sparse) | 0,1,2 |" in variants
    assert "w0.04" not in variants and "s=0.95" not in variants  # the capacity-only variants stay out of the main table
    lines = capacity.splitlines()
    row = lambda start: next(line for line in lines if line.startswith(start))  # noqa: E731
    assert row("| small dense AT w0.04 |") == ("| small dense AT w0.04 | 1,2 | 17,376 | 30.00 ± 0.00 | "
                                               "60.00 ± 0.00 | 61.00 ± 0.00 | 1.00 ± 0.00 | 90.00 ± 0.00 |")
    assert row("| small dense AT w0.088 |").startswith("| small dense AT w0.088 | missing | - |")
    assert row("| 0.8 | Flying Bird s=0.8 |") == (
        "| 0.8 | Flying Bird s=0.8 | small-dense-w0.056 (nearest count) | 35,010 / 35,544 | 0,1,2 (n=3) | "
        "2.00 ± 1.00 (+1.00 / +2.00 / +3.00), p = 0.074 | 0.00 ± 0.00 (+0.00 / +0.00 / +0.00), p = - | "
        "1.00 ± 0.00 (+1.00 / +1.00 / +1.00), p = 0.000 | 1.00 ± 0.00 (+1.00 / +1.00 / +1.00), p = 0.000 |")
    assert row("| 0.9 | Flying Bird s=0.9 |") == (  # seed 0 has no small dense: one pair, no p
        "| 0.9 | Flying Bird s=0.9 | small-dense-w0.04 (nearest count) | 17,505 / 17,376 | 1 (n=1) | "
        "-1.50 (-1.50), p = - | 1.50 (+1.50), p = - | 2.00 (+2.00), p = - | 0.50 (+0.50), p = - |")
    fbplus = [line for line in lines if line.startswith("| 0.8 | Flying Bird+ s=0.8 |")]  # its count, its nominal s
    assert [line.split(" | ")[2:5] for line in fbplus] == [
        ["small-dense-w0.04 (nearest count)", "17,505 / 17,376", "2 (n=1)"],
        ["small-dense-w0.056 (nominal s=0.8)", "17,505 / 35,544", "2 (n=1)"]]
    assert row("| 0.5 | Flying Bird s=0.5 |").endswith("| - / - | - | missing: no finished run | - | - | - |")
    assert row("| 0.95 | fixed random mask s=0.95 |") == (
        "| 0.95 | fixed random mask s=0.95 | - | 8,752 / - | - | missing: no small dense AT within x1.25 of 8,752 "
        "weights | - | - | - |")
    assert (report / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    study_report.overfit_report(root, again, log=lambda *a: None)
    for name in ("table.md", "capacity.png"):
        assert (again / name).read_bytes() == (report / name).read_bytes(), name


def test_overfit_report_reads_other_small_dense_folders(tmp_path):
    """A small-dense-* folder VARIANTS does not name (--mode small-dense, its width in summary.json) is read too."""
    root = tmp_path / "runs"
    fake_overfit_run(root / "dense" / "seed0", 0, "dense", 0.125, 1.0, 61.0, 60.0, 95.0)
    fake_overfit_run(root / "fb-s0.5" / "seed0", 0, "dynamic", 0.125, 0.5, 62.0, 61.0, 92.0)
    d = root / "small-dense-s0.5" / "seed0"
    fake_overfit_run(d, 0, "small-dense", 0.125, 1.0, 61.0, 60.0, 93.0)
    (d / "summary.json").write_text(json.dumps(dict(json.loads((d / "summary.json").read_text()), width=0.088)))
    study_report.overfit_report(root, tmp_path / "report", log=lambda *a: None)
    capacity = (tmp_path / "report" / "table.md").read_text().split("## Capacity")[1]
    assert "| small dense AT s0.5 | 0 | 87,565 |" in capacity
    assert ("| 0.5 | Flying Bird s=0.5 | small-dense-s0.5 (nearest count) | 87,524 / 87,565 | 0 (n=1) | "
            "-2.00 (-2.00), p = - | 1.00 (+1.00), p = - |") in capacity


def run_study_script(flag: str, timeout: int) -> Path:
    """bash run_experiments.sh FLAG with this interpreter; returns the folder of the report it wrote."""
    out = subprocess.run(["bash", str(HERE / "run_experiments.sh"), flag], capture_output=True,
                         text=True, cwd=HERE, timeout=timeout, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return Path(out.stdout.splitlines()[-1].removeprefix("report in ")).parent


def test_readme_quotes_the_committed_results():
    """The numbers README.md quotes from results/ are the committed files': the second study's paired differences
    (per seed), its FLOPs and the capacity pairing, the first study's FB+ gap, the demo and the H200's figures."""
    readme = " ".join((HERE / "README.md").read_text().split())  # line breaks fall anywhere
    root = HERE / "results"
    groups = study_report.overfit_groups(root / "fashion-mnist-overfit" / "runs")
    dense = {r["seed"]: r for r in groups["dense"]}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    seeds = lambda d: " (" + " / ".join(f"{x:+.2f}" for x in d) + ")"  # noqa: E731

    def paired(v, key, per_seed=True):
        d = [r[key] - dense[r["seed"]][key] for r in groups[v]]
        return f"{mean(d):+.2f}" + (seeds(d) if per_seed else "")
    methods = (("RB", "rb-s0.8"), ("FB", "fb-s0.8"), ("FB+", "fbplus-s0.8"))
    quotes = [", ".join(f"{m} {paired(v, 'robust_gap')}" for m, v in methods),
              ", ".join(f"{m} {paired(v, 'ra_diff', False)}" for m, v in methods),
              ", ".join(f"{m} {paired(v, 'ra_best', False)}" for m, v in methods),
              ", ".join(f"{m} {mean([r['inference_ratio'] for r in groups[v]]):.3f}" for m, v in methods),
              f"dense AT: {mean([r['ra_diff'] for r in groups['dense']]):.2f}",
              f"robust gap is {mean([r['robust_gap'] for r in groups['dense']]):.1f} points"]
    fb = next(e for e in study_report.capacity_pairs(groups) if e["variant"] == "fb-s0.8")
    assert fb["dense"] == "small-dense-w0.056"
    quotes.append(f"FB {mean(fb['diffs']['robust_gap']):+.2f}{seeds(fb['diffs']['robust_gap'])}")
    first = root / "fashion-mnist" / "runs"
    gap = lambda v, k: json.loads((first / v / f"seed{k}" / "summary.json").read_text())["robust_gap"]  # noqa: E731
    d = [gap("dynamic+-s0.8", k) - gap("dense-s0.8", k) for k in range(3)]
    quotes.append(f"FB+'s {mean(d):+.2f}{seeds(d)}")
    demo = json.loads((root / "demo-eval" / "demo-summary.json").read_text())
    quotes.append(f"{round(demo['wall_seconds'] / 60)} minutes, RA best {demo['ra_best']:.2f}, SA best "
                  f"{demo['sa_best']:.2f}, inference FLOPs {demo['inference_ratio']:.3f}x dense")
    log = (root / "gpu-check-h200.log").read_text()
    speed = {v: float(re.search(rf"^{v} +dense +([\d.]+) img/s", log, re.M)[1]) for v in ("fp32 eager",
                                                                                    "bf16 channels_last")}
    quotes += [f"{speed['fp32 eager']:,.0f} img/s for PGD-10 AT, bf16 + channels_last {speed['bf16 channels_last']:,.0f}"]
    h200 = {n: json.loads((root / "demo-eval" / "earlier-rule-h200" / f"eval-best-test-n500-{n}.json").read_text())
            for n in ("pgd20x1", "pgd50x5", "aa-standard")}
    quotes.append(f"an H200 took {h200['pgd20x1']['wall_seconds']:.2f} s for PGD-20, {h200['pgd50x5']['wall_seconds']:.2f} "
                  f"s for PGD-50 x 5 and {h200['aa-standard']['wall_seconds']:.2f} s for standard AutoAttack on 500 "
                  f"images (RA {h200['pgd20x1']['pgd']['ra']:.2f}, {h200['pgd50x5']['pgd']['ra']:.2f}, "
                  f"{h200['aa-standard']['autoattack']['ra']:.2f}")
    assert [q for q in quotes if q not in readme] == []


@pytest.mark.slow
def test_run_experiments_study_smoke():
    """run_experiments.sh --study-smoke: 4 methods x 3 seeds + the FB sweep, then table.md and three figures."""
    report = run_study_script("--study-smoke", timeout=900)
    main, sweep = (report / "table.md").read_text().split("across sparsity")
    rows = lambda text: [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")][1:]  # noqa: E731
    assert rows(main) == [["| dense AT", "3"], ["| Robust Bird s=0.8", "3"], ["| Flying Bird s=0.8", "3"],
                          ["| Flying Bird+ s=0.8", "3"]]
    assert rows(sweep) == [["| Flying Bird s=0", "1"], ["| Flying Bird s=0.5", "1"], ["| Flying Bird s=0.8", "3"],
                           ["| Flying Bird s=0.9", "1"], ["| Flying Bird s=0.95", "1"]]
    assert len(list((report / "runs").glob("*/seed*/log.txt"))) == 16
    for name in ("curves.png", "gap.png", "sparsity.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_experiments_study_overfit_smoke():
    """run_experiments.sh --study-overfit-smoke: the 20 variants (seed 0), each evaluated, then the report."""
    report = run_study_script("--study-overfit-smoke", timeout=1800)
    text = (report / "table.md").read_text()
    assert "| dense AT | 0 |" in text and "| fixed random mask s=0.8 (FB, death rate 0) | 0 |" in text
    thin = text.split("physically thinner network")[1].split("## Flying Bird across")[0]
    assert "| Robust Bird, channel ticket s=0.79 (thin network, ~0.2 of the weights) | 0 |" in thin
    assert len(list((report / "runs").glob("*/seed0/summary.json"))) == 20
    capacity = text.split("## Capacity")[1]
    for v in ("small dense AT w0.088", "small dense AT w0.04", "small dense AT w0.028", "fixed random mask s=0.95"):
        assert f"| {v} | 0 |" in capacity
    regularizers = text.split("## Regularizers")[1].split("## Flying Bird across")[0]
    for r in ("TRADES (beta 6)", "AWP (gamma 0.005)", "EMA (0.995)"):
        assert f"| dense AT + {r} | 0 |" in regularizers and f"| Flying Bird+ s=0.8 + {r} | 0 |" in regularizers
    assert json.loads((report / "runs" / "fbplus-s0.8-trades" / "seed0" / "summary.json").read_text())[
        "objective"] == "TRADES (beta 6)"
    assert "| small dense AT (width 0.056, as many weights as 80% sparse) | 0 |" in text and "± 0.00" not in text
    runs = report / "runs"
    for d in runs.glob("*/seed0"):
        names = {p.name for p in d.glob("eval-*.json")}
        assert names == {f"eval-{ck}-{s}.json" for ck in ("best", "last") for s in ("test-n64-pgd20x1",
                                                                                    "train-all-pgd20x1")}, d
    fixed = torch.load(runs / "fixed-mask-s0.8" / "seed0" / "last.pt", weights_only=True)["mask"]
    assert all(torch.equal(fixed["masks"][n], fixed["ever_active"][n]) for n in fixed["masks"])  # never moved
    for name in ("curves.png", "gap.png", "sparsity.png", "capacity.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
