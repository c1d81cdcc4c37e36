"""Tests of results/study_report.py, the tables and figures of the Fashion-MNIST studies.

    python -m pytest -q results/test_study_report.py      # also part of the default suite
    python -m pytest -m slow results/test_study_report.py # the studies' smoke runs through run_experiments.sh
"""
import json
import math
import os
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



def run_study_script(flag: str, timeout: int) -> Path:
    """bash run_experiments.sh FLAG with this interpreter; returns the folder of the report it wrote."""
    out = subprocess.run(["bash", str(HERE / "run_experiments.sh"), flag], capture_output=True,
                         text=True, cwd=HERE, timeout=timeout, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return Path(out.stdout.splitlines()[-1].removeprefix("report in ")).parent


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
    """run_experiments.sh --study-overfit-smoke: the 16 variants (seed 0), each evaluated, then the report."""
    report = run_study_script("--study-overfit-smoke", timeout=1800)
    text = (report / "table.md").read_text()
    assert "| dense AT | 0 |" in text and "| fixed random mask s=0.8 (FB, death rate 0) | 0 |" in text
    thin = text.split("physically thinner network")[1].split("## Flying Bird across")[0]
    assert "| Robust Bird, channel ticket s=0.79 (thin network, ~0.2 of the weights) | 0 |" in thin
    assert len(list((report / "runs").glob("*/seed0/summary.json"))) == 16
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
    for name in ("curves.png", "gap.png", "sparsity.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
