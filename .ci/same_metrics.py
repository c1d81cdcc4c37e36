"""Does this sparse_win.py train exactly as another revision's? Smoke runs of every mode with both.

    python .ci/same_metrics.py REV          # e.g. 10778d0, main, HEAD (default: HEAD)

Extracts `git show REV:sparse_win.py` into a temp dir, runs `--preset smoke` of each mode (and
Flying Bird+ with its adaptive rule firing) with that file and with the working tree's, one
thread each on the CPU, and compares the runs' metrics.jsonl record by record with the
wall-clock field "time" removed, and the fields of summary.json that both versions write (a field
only one writes is named, not counted as a difference) without "wall_seconds". Prints one line per
run and exits 1 on any difference. Fashion-MNIST comes from Debian's dataset-fashion-mnist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
# The smoke preset as it was before it ran Flying Bird+ (dense AT, 2 epochs, FB+'s defaults), pinned so that a
# revision from either side of that change runs the same commands.
SMOKE_BEFORE = ["--mode", "dense", "--epochs", "2", "--milestones", "1", "--fbplus-start", "-1", "--fbplus-window", "4",
                "--fbplus-threshold", "0.5"]
RUNS = {  # name -> extra flags over --preset smoke and SMOKE_BEFORE
    "dense": ["--mode", "dense"],
    "static": ["--mode", "static"],
    "dynamic": ["--mode", "dynamic"],
    "dynamic+": ["--mode", "dynamic+"],
    # FB+ from epoch 0 with a 1-difference window and threshold 0: extra prune and growth fire in epoch 3
    "dynamic+ firing": ["--mode", "dynamic+", "--epochs", "3", "--fbplus-start", "0", "--fbplus-window", "1",
                        "--fbplus-threshold", "0"],
}
WALL = {"time", "wall_seconds", "data"}  # and where the data were read from: records of the run, not results


def run(code_dir: Path, out: Path, data: Path, extra: list[str]) -> str:
    args = [sys.executable, "sparse_win.py", "--preset", "smoke", *SMOKE_BEFORE, "--device", "cpu", "--data-dir",
            str(data), "--no-download", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(args, cwd=code_dir, env=env, capture_output=True, text=True, timeout=1800)
    return "" if p.returncode == 0 else f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}"


def records(d: Path) -> tuple[list[dict], dict]:
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((d / "summary.json").read_text())
    strip = lambda r: {k: v for k, v in r.items() if k not in WALL}  # noqa: E731
    return [strip(r) for r in metrics], strip(summary)


def first_difference(a, b, where="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}{k}: only in {'new' if k in b else 'old'}"
            if (d := first_difference(a[k], b[k], f"{where}{k}.")) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} entries, now {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := first_difference(x, y, f"{where}[{i}].")) is not None:
                return d
        return None
    return None if a == b else f"{where.rstrip('.')}: {a!r}, now {b!r}"


def main(rev: str = "HEAD", jobs: int = 2) -> int:
    old_code = subprocess.run(["git", "show", f"{rev}:sparse_win.py"], cwd=HERE, capture_output=True, text=True)
    if old_code.returncode:
        print(f"same_metrics.py: cannot read sparse_win.py at {rev}: {old_code.stderr.strip()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        (tmp / "old" / "sparse_win.py").write_text(old_code.stdout)
        (tmp / "data").mkdir()
        tasks = [(name, which, code) for name in RUNS for which, code in (("old", tmp / "old"), ("new", HERE))]
        with ThreadPoolExecutor(jobs) as pool:
            errors = dict(zip(tasks, pool.map(
                lambda t: run(t[2], tmp / t[1] / "runs" / t[0].replace(" ", "-"), tmp / "data", RUNS[t[0]]), tasks)))
        failed = 0
        for name in RUNS:
            bad = [f"{which} run failed ({errors[(name, which, code)]})" for which, code in
                   (("old", tmp / "old"), ("new", HERE)) if errors[(name, which, code)]]
            if not bad:
                old, new = (records(tmp / which / "runs" / name.replace(" ", "-")) for which in ("old", "new"))
                shared = set(old[1]) & set(new[1])
                diff = first_difference(old[0], new[0], "metrics.jsonl ")
                diff = diff or first_difference(*({k: s[k] for k in shared} for s in (old[1], new[1])), "summary.json ")
                bad = [diff] if diff else []
                only = sorted(set(old[1]) ^ set(new[1]))
                if not bad:
                    print(f"same   {name}: {len(old[0])} epochs of metrics.jsonl and summary.json equal (time aside)"
                          + (f"; summary fields in one version only: {', '.join(only)}" if only else ""))
            for b in bad:
                print(f"DIFFER {name}: {b}")
            failed |= bool(bad)
    print(f"{'differences' if failed else 'identical'}: working tree vs {rev}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
