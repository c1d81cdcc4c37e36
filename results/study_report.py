"""Tables and figures of the Fashion-MNIST studies, written again from the committed run files.

    python results/study_report.py --study results/fashion-mnist/runs results/fashion-mnist
    python results/study_report.py --overfit results/fashion-mnist-overfit/runs results/fashion-mnist-overfit

The first study (run_experiments.sh --study) keeps each run in <runs>/<mode>-s<sparsity>/seed<k>;
its table and figures group the runs by (mode, sparsity) and give mean ± sample std over seeds,
every number from the runs' summary.json and metrics.jsonl.

The overfit study (run_experiments.sh --study-overfit) keeps each run in <runs>/<variant>/seed<k>
with config.json, metrics.jsonl, summary.json and the evaluations made right after training:
eval-{best,last}-test-n2000-pgd20x1.json (PGD-20 on the first 2,000 test images) and
eval-{best,last}-train-all-pgd20x1.json (PGD-20 on the run's 500 training images, eval mode).
Its table takes accuracies and the robust gap from those evaluations (one test image = 0.05
points), FLOPs and density from summary.json; the per-epoch 500-image numbers stay in the curves.
Its Capacity section (and capacity.png) sets each sparse variant beside dense AT narrowed to as many
active conv + linear weights (the small-dense-* variants), paired by seed, with a paired t-test; the
active weights are what summary.json records, else counted from the run's config and final density.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sparse_win as sw  # noqa: E402

# ----------------------------------------------------------------------------- the first study (--study)

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


def plus_minus(mean: float, std: float, n: int, decimals: int) -> str:
    """'mean ± std' over n seeds; one seed's value alone (no '± 0.00')."""
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if n > 1 else "")


def group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    """{(mode, sparsity): runs}, seeds pooled; dense AT is keyed at sparsity 0 whatever it was given."""
    groups = {}
    for r in runs:
        s = r["summary"]
        groups.setdefault((s["mode"], 0.0 if s["mode"] == "dense" else float(s["sparsity"])), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (sw.MODES.index(kv[0][0]), kv[0][1])))


def group_stats(runs: list[dict]) -> dict:
    """Mean and std over seeds of every STUDY_COLUMNS value, plus train_ra_final and the seeds."""
    keys = [k for _, k, _ in STUDY_COLUMNS] + ["train_ra_final"]
    return dict(n=len(runs), seeds=sorted(r["config"].get("seed") for r in runs),
                **{k: mean_std([r["summary"][k] for r in runs]) for k in keys})


def study_table(rows: list[tuple[str, dict]], extra=()) -> str:
    cols = [*STUDY_COLUMNS, *extra]
    return sw.markdown_table(["method", "n", *(h for h, _, _ in cols)],
                             [[label, st["n"], *(plus_minus(*st[k], st["n"], d) for _, k, d in cols)]
                              for label, st in rows])


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
        raise sw.SparseWinError(f"no finished runs (summary.json) under {runs_root}")
    stats = {k: group_stats(v) for k, v in groups.items()}
    main = [k for k in groups if k[0] == "dense" or math.isclose(k[1], sparsity)]
    sweep = [k for k in groups if k[0] == sweep_mode]
    label = lambda k: sw.METHOD[k[0]] + ("" if k[0] == "dense" else f" s={k[1]:g}")  # noqa: E731
    train_ra = (("train RA (final model)", "train_ra_final", 2),)
    text = (f"# Study: {runs_root}\n\nMean ± sample std over n seeds. Accuracies in %, test set; best = epoch of "
            f"best validation RA; robust gen. gap = train RA - test RA of the final model; FLOPs as a "
            f"fraction of dense AT.\n\n## Methods at sparsity {sparsity:g}\n\n"
            + study_table([(label(k), stats[k]) for k in main])
            + f"\n\n## {sw.METHOD[sweep_mode]} across sparsity\n\n"
            + study_table([(label(k), stats[k]) for k in sweep], extra=train_ra) + "\n")
    sw.write_text_atomic(out_dir / "table.md", text)

    colors = {k: f"C{i}" for i, k in enumerate(main)}
    fig, ax = plt.subplots(figsize=(7, 4))  # curves.png: mean over seeds per epoch
    for k in main:
        for key, ls, what in (("test_ra", "-", "test RA"), ("train_ra", "--", "train RA")):
            per_epoch = {}
            for r in groups[k]:
                for h in r["history"]:
                    if h[key] is not None:  # --eval-every: only the evaluated epochs
                        per_epoch.setdefault(h["epoch"], []).append(h[key])
            ep = sorted(per_epoch)
            ax.plot(ep, [mean_std(per_epoch[e])[0] for e in ep], ls, color=colors[k], label=f"{label(k)} {what}")
    ax.set(xlabel="epoch", ylabel="robust accuracy (%)", title="test RA (solid), running train RA (dashed)")
    ax.legend(fontsize=7)
    sw.save_figure(fig, out_dir / "curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))  # gap.png: one point per seed, bar = mean ± std
    titles = ("robust gen. gap", "robust overfitting (RA best - final)")
    for ax, key, title in zip(axes, ("robust_gap", "ra_diff"), titles):
        for i, k in enumerate(main):
            values = [r["summary"][key] for r in groups[k]]
            ax.bar(i, stats[k][key][0], yerr=stats[k][key][1], color=colors[k], alpha=0.4, capsize=4)
            ax.plot([i] * len(values), values, "o", color=colors[k])
        ax.set_xticks(range(len(main)), [label(k) for k in main], rotation=20, fontsize=7)
        ax.set(ylabel="points (%)", title=title)
    sw.save_figure(fig, out_dir / "gap.png")

    fig, ax = plt.subplots(figsize=(6, 4))  # sparsity.png: Figure-1 analogue
    xs = [k[1] for k in sweep]
    for key, what in (("train_ra_final", "train RA (final model)"), ("ra_final", "test RA (final)")):
        ax.errorbar(xs, [stats[k][key][0] for k in sweep], yerr=[stats[k][key][1] for k in sweep],
                    marker="o", capsize=4, label=what)
    ax.set(xlabel="sparsity", ylabel="robust accuracy (%)", title=f"{sw.METHOD[sweep_mode]}: robust train vs test")
    ax.legend()
    sw.save_figure(fig, out_dir / "sparsity.png")
    log(text)
    return stats


# ----------------------------------------------------------------------------- the overfit study (--overfit)

# variant folder -> label, in table order; the Flying Bird sweep is read beside fb-s0.8
VARIANTS = {
    "dense": "dense AT",
    "small-dense-w0.056": "small dense AT (width 0.056, as many weights as 80% sparse)",
    "rb-s0.8": "Robust Bird s=0.8",
    "fb-s0.8": "Flying Bird s=0.8",
    "fbplus-s0.8": "Flying Bird+ s=0.8",
    "fixed-mask-s0.8": "fixed random mask s=0.8 (FB, death rate 0)",
    "rb-channel-s0.79": "Robust Bird, channel ticket s=0.79 (thin network, ~0.2 of the weights)",
    "dense-trades": "dense AT + TRADES (beta 6)",
    "fbplus-s0.8-trades": "Flying Bird+ s=0.8 + TRADES (beta 6)",
    "dense-awp": "dense AT + AWP (gamma 0.005)",
    "fbplus-s0.8-awp": "Flying Bird+ s=0.8 + AWP (gamma 0.005)",
    "dense-ema": "dense AT + EMA (0.995)",
    "fbplus-s0.8-ema": "Flying Bird+ s=0.8 + EMA (0.995)",
    "fb-s0.5": "Flying Bird s=0.5",
    "fb-s0.9": "Flying Bird s=0.9",
    "fb-s0.95": "Flying Bird s=0.95",
    # the capacity study (section "Capacity"): dense AT narrowed to the sparse models' active weights
    "small-dense-w0.088": "small dense AT (width 0.088, as many weights as 50% sparse)",
    "small-dense-w0.04": "small dense AT (width 0.04, as many weights as 90% sparse)",
    "small-dense-w0.028": "small dense AT (width 0.028, as many weights as 95% sparse)",
    "fixed-mask-s0.95": "fixed random mask s=0.95 (FB, death rate 0)",
}
SWEEP = ("dense", "fb-s0.5", "fb-s0.8", "fb-s0.9", "fb-s0.95")
REGULARIZERS = ("trades", "awp", "ema")  # variants dense-<r> and fbplus-s0.8-<r>
COLUMNS = (  # (header, key, decimals)
    ("RA best", "ra_best", 2), ("RA final", "ra_final", 2), ("diff", "ra_diff", 2),
    ("SA best", "sa_best", 2), ("SA final", "sa_final", 2), ("robust gen. gap", "robust_gap", 2),
    ("train RA (final)", "train_ra_final", 2), ("train FLOPs (x dense)", "train_flops_dense_ratio", 3),
    ("inference FLOPs (x dense)", "inference_ratio", 3), ("final density", "final_density", 4),
    ("CPU minutes", "minutes", 1))
CLAIMS = (("robust gen. gap", "robust_gap"), ("RA best - final", "ra_diff"), ("RA best", "ra_best"),
          ("SA best", "sa_best"))


def read_eval(d: Path, name: str) -> dict | None:
    p = d / name
    return json.loads(p.read_text()) if p.exists() else None


def run_row(d: Path, test_n: int = 2000) -> dict | None:
    """One finished and evaluated run as a table row, or None while it is not."""
    evals = {f"{ck}_{split}": read_eval(d, f"eval-{ck}-{split}-{'all' if split == 'train' else f'n{test_n}'}"
                                        f"-pgd20x1.json") for ck in ("best", "last") for split in ("test", "train")}
    if not (d / "summary.json").exists() or any(e is None for e in evals.values()):
        return None
    s = json.loads((d / "summary.json").read_text())
    config = json.loads((d / "config.json").read_text())
    ra = {k: e["pgd"]["ra"] for k, e in evals.items()}
    aa = read_eval(d, "eval-best-test-n500-aa-standard.json")
    return dict(
        seed=config["seed"], dir=d, weights=active_weights(s, config),
        ra_best=ra["best_test"], ra_final=ra["last_test"], ra_diff=ra["best_test"] - ra["last_test"],
        sa_best=evals["best_test"]["sa"], sa_final=evals["last_test"]["sa"],
        robust_gap=ra["last_train"] - ra["last_test"], train_ra_final=ra["last_train"],
        robust_gap_best=ra["best_train"] - ra["best_test"], best_epoch=s["best_epoch"],
        train_flops_dense_ratio=s["train_flops_dense_ratio"], inference_ratio=s["inference_ratio"],
        final_density=s["final_density"], fbplus_events=len(s["fbplus_events"]),
        minutes=(s["wall_seconds"] + sum(e["wall_seconds"] for e in evals.values())) / 60,
        aa=aa["autoattack"]["ra"] if aa else None, train_minutes=s["wall_seconds"] / 60,
        **({f"thin_{k}": v for k, v in s["thin"].items() if k != "channels"} if s.get("thin") else {}),
        history=[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()])


def cell(values: list[float], decimals: int) -> str:
    """mean ± sample std over seeds; a single value alone (no '± 0.00')."""
    return plus_minus(*mean_std(values), len(values), decimals) if values else "-"


def table(rows: list[tuple[str, list[dict]]], columns=COLUMNS) -> str:
    return sw.markdown_table(["variant", "seeds", *(h for h, _, _ in columns)],
                             [[label, ",".join(str(r["seed"]) for r in runs),
                               *(cell([r[k] for r in runs], d) for _, k, d in columns)] for label, runs in rows])


def paired(groups: dict[str, list[dict]]) -> str:
    """Per claim: variant minus dense AT of the same seed, mean ± std over the seeds both have."""
    dense = {r["seed"]: r for r in groups.get("dense", [])}
    rows = []
    for v, runs in groups.items():
        both = [r for r in runs if r["seed"] in dense and v != "dense"]
        if not both:
            continue
        cells = []
        for _, k in CLAIMS:
            diffs = [r[k] - dense[r["seed"]][k] for r in both]
            cells.append(cell(diffs, 2) + " (" + " / ".join(f"{d:+.2f}" for d in diffs) + ")")
        rows.append([VARIANTS[v], ",".join(str(r["seed"]) for r in both), *cells])
    return sw.markdown_table(["variant", "seeds", *(f"{h} (- dense)" for h, _ in CLAIMS)], rows)


def overfit_groups(runs_root: Path, test_n: int = 2000) -> dict[str, list[dict]]:
    """{variant: its finished and evaluated runs' rows, by seed}: the VARIANTS and any other small-dense-* folder."""
    groups = {}
    extra = sorted(p.name for p in runs_root.glob("small-dense-*") if p.is_dir() and p.name not in VARIANTS)
    for v in [*VARIANTS, *extra]:
        rows = [r for d in sorted((runs_root / v).glob("seed*")) if (r := run_row(d, test_n)) is not None]
        if rows:
            groups[v] = sorted(rows, key=lambda r: r["seed"])
    return groups


def overfit_report(runs_root, out_dir, test_n: int = 2000, log=print) -> dict:
    """table.md, curves.png, gap.png, sparsity.png, capacity.png of the overfit study; returns {variant: rows}.

    Besides the VARIANTS, any other small-dense-* folder is read (a small dense AT of the capacity study)."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    groups = overfit_groups(runs_root, test_n)
    if not groups:
        raise sw.SparseWinError(f"no finished and evaluated runs under {runs_root}")
    regularized = {f"{base}-{r}" for r in REGULARIZERS for base in ("dense", "fbplus-s0.8")}
    capacity_only = {"fb-s0.5", "fb-s0.9", "fb-s0.95", "fixed-mask-s0.95"}  # the sweep and the capacity section
    main = [v for v in groups if v not in capacity_only and v not in regularized
            and (v == "small-dense-w0.056" or not v.startswith("small-dense"))]
    aa = [(VARIANTS[v], [r for r in groups[v] if r["aa"] is not None]) for v in main]
    text = (f"# Study: {runs_root}\n\nFashion-MNIST, 500 training images without augmentation, eps 0.1, "
            f"ResNet-18 width 0.125, 120 epochs. Accuracies in %: PGD-20 (one start, eval mode) on the first "
            f"{test_n} test images for best.pt (best validation RA) and the final model; robust gen. gap = "
            f"PGD-20 RA on the 500 training images - test RA, final model. Mean ± sample std over the seeds "
            f"listed; CPU minutes = training + these evaluations, one thread.\n\n## Variants\n\n"
            + table([(VARIANTS[v], groups[v]) for v in main])
            + "\n\n## Paired with dense AT (same seed): variant - dense, mean ± std (per seed)\n\n"
            + paired({v: groups[v] for v in main})
            + thin_section(groups)
            + regularizer_section(groups)
            + "\n\n## Flying Bird across sparsity (dense AT = sparsity 0)\n\n"
            + table([(VARIANTS[v], groups[v]) for v in SWEEP if v in groups])
            + capacity_section(groups)
            + ("\n\n## AutoAttack (standard, 500 test images, best.pt)\n\n"
               + table([a for a in aa if a[1]], columns=(("AutoAttack RA", "aa", 2), ("PGD-20 RA best", "ra_best",
                                                                                      2)))
               if any(a[1] for a in aa) else "") + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    sw.write_text_atomic(out_dir / "table.md", text)
    figures(groups, main, out_dir)
    if any(v.startswith("small-dense") for v in groups):
        capacity_figure(groups, out_dir)
    log(text)
    return groups


THIN_COLUMNS = (  # the channel ticket's thin network: its size, and the time it measured (summary.json "thin")
    ("weight density", "thin_weight_density", 4), ("parameters (x dense)", "thin_params_ratio", 4),
    ("forward FLOPs (x dense)", "thin_flops_ratio", 4), ("PGD-10 AT step speedup", "thin_at_speedup", 2),
    ("inference speedup", "thin_inference_speedup", 2), ("training minutes", "train_minutes", 1))


def thin_section(groups: dict) -> str:
    """The channel ticket's row beside dense AT's training time (nothing while it has no finished run)."""
    thin = [v for v in groups if any("thin_at_speedup" in r for r in groups[v])]
    if not thin:
        return ""
    return ("\n\n## Robust Bird's channel ticket: a physically thinner network\n\nSpeedups measured in the run "
            "(one PGD-10 AT step and one inference forward at its batch size, 32 in the study, median of 5, thin "
            "vs the full dense network, one thread); training minutes = the run's wall time, stage 1 included.\n\n"
            + table([(VARIANTS[v], groups[v]) for v in thin], columns=THIN_COLUMNS)
            + "\n\n" + table([(VARIANTS["dense"], groups.get("dense", []))], columns=THIN_COLUMNS[-1:]))


def regularizer_section(groups: dict) -> str:
    """Dense AT and Flying Bird+ with each regularizer beside their plain rows, and per regularizer the
    paired difference Flying Bird+ - dense (same seed): does sparsity still shrink the gap with it?"""
    names = [r for r in REGULARIZERS if f"dense-{r}" in groups or f"fbplus-s0.8-{r}" in groups]
    if not names:
        return ""
    rows = [v for base in ("dense", "fbplus-s0.8") for v in [base] + [f"{base}-{r}" for r in names] if v in groups]
    pairs = []
    for suffix in [""] + [f"-{r}" for r in names]:
        dense = {r["seed"]: r for r in groups.get(f"dense{suffix}", [])}
        diffs = [dict(r, **{k: r[k] - dense[r["seed"]][k] for _, k in CLAIMS})
                 for r in groups.get(f"fbplus-s0.8{suffix}", []) if r["seed"] in dense]
        if diffs:
            pairs.append((VARIANTS[f"fbplus-s0.8{suffix}"], diffs))
    return ("\n\n## Regularizers: dense AT and Flying Bird+ with TRADES, AWP or weight averaging\n\n"
            + table([(VARIANTS[v], groups[v]) for v in rows])
            + "\n\nFlying Bird+ - dense AT with the same objective and seed:\n\n"
            + table(pairs, columns=tuple((f"{h} (FB+ - dense)", k, 2) for h, k in CLAIMS)))


def figures(groups: dict, main: list[str], out_dir: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    fig, ax = plt.subplots(figsize=(8, 4.5))  # curves.png: per-epoch means over seeds (500-image numbers)
    for v in main:
        for key, ls in (("test_ra", "-"), ("train_ra", "--")):
            per_epoch = {}
            for r in groups[v]:
                for h in r["history"]:
                    if h[key] is not None:
                        per_epoch.setdefault(h["epoch"], []).append(h[key])
            ep = sorted(per_epoch)
            ax.plot(ep, [mean_std(per_epoch[e])[0] for e in ep], ls, color=colors[v], lw=1,
                    label=VARIANTS[v].split(" (")[0] if ls == "-" else None)
    ax.set(xlabel="epoch", ylabel="robust accuracy (%)",
           title="test RA, 500 images (solid); running train RA (dashed)")
    ax.legend(fontsize=7)
    sw.save_figure(fig, out_dir / "curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))  # gap.png: one point per seed, bar = mean
    for ax, key, title in zip(axes, ("robust_gap", "ra_diff"), ("robust gen. gap", "robust overfitting (RA best - final)")):
        for i, v in enumerate(main):
            values = [r[key] for r in groups[v]]
            ax.bar(i, mean_std(values)[0], color=colors[v], alpha=0.4)
            ax.plot([i] * len(values), values, "o", color=colors[v])
        ax.set_xticks(range(len(main)), [VARIANTS[v].split(" (")[0] for v in main], rotation=25, fontsize=7)
        ax.set(ylabel="points (%)", title=title)
    sw.save_figure(fig, out_dir / "gap.png")

    sweep = [v for v in SWEEP if v in groups]
    fig, ax = plt.subplots(figsize=(6, 4))  # sparsity.png: the paper's Figure 1 analogue
    xs = [0.0 if v == "dense" else float(v.split("-s")[1]) for v in sweep]
    for key, what in (("train_ra_final", "train RA (final model)"), ("ra_final", "test RA (final)"),
                      ("ra_best", "test RA (best)")):
        ax.plot(xs, [mean_std([r[key] for r in groups[v]])[0] for v in sweep], "o-", label=what)
    ax.set(xlabel="sparsity", ylabel="robust accuracy (%)", title="Flying Bird: robust train vs test")
    ax.legend()
    sw.save_figure(fig, out_dir / "sparsity.png")


# ----------------------------------------------------------------------------- the capacity study (overfit report)

WEIGHT_KEYS = ("active_weights", "weights")  # where a summary.json records a run's active conv+linear weights
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(sw.Config)}  # for a config.json without a key
DENSE_CURVE = ("dense", "small-dense-w0.088", "small-dense-w0.056", "small-dense-w0.04", "small-dense-w0.028")
FB_CURVE = ("fb-s0.5", "fb-s0.8", "fb-s0.9", "fb-s0.95")
POINTS = ("fbplus-s0.8", "rb-s0.8", "rb-channel-s0.79", "fixed-mask-s0.8", "fixed-mask-s0.95")
CAPACITY_SPARSE = ("fb-s0.5", "fb-s0.8", "fbplus-s0.8", "rb-s0.8", "fixed-mask-s0.8", "rb-channel-s0.79",
                   "fb-s0.9", "fb-s0.95", "fixed-mask-s0.95")  # each paired with the small dense AT of its count
CAPACITY_CLAIMS = (("robust gen. gap", "robust_gap"), ("RA final", "ra_final"), ("RA best", "ra_best"),
                   ("RA best - final", "ra_diff"))
MATCH_FACTOR = 1.25  # a small dense AT matches a sparse model when their active weights differ by at most this factor


@functools.lru_cache(maxsize=None)
def prunable_weights(arch: str, dataset: str, width: float, wrn_depth: int = 34, wrn_widen: int = 10) -> int:
    """Conv + linear (prunable) weights of the architecture at this width, counted on a freshly built model."""
    info = sw.DATASETS[dataset]
    net = sw.build_model(arch, num_classes=info["classes"], in_channels=info["channels"], width=width,
                         mean=info["mean"], std=info["std"], wrn_depth=wrn_depth, wrn_widen=wrn_widen)
    return sum(w.numel() for w in sw.prunable(net).values())


def active_weights(summary: dict, config: dict) -> int | None:
    """A run's active conv + linear weights at the end of training.

    The count its summary.json records (WEIGHT_KEYS: a number, or a dict with "active"), else counted from
    its config: final_density x the prunable weights of its network at its width (a channel ticket's
    final_density is its thin network's share); a --mode small-dense run is dense at the width its summary
    records ("width"), and without one, is taken at the count it was matched to, (1 - sparsity) x the base
    width's. None when neither can be had (an architecture or dataset this code cannot build)."""
    for k in WEIGHT_KEYS:
        value = summary.get(k)
        value = value.get("active") if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return round(value)
    cfg = {**CONFIG_DEFAULTS, **config}
    count = lambda width: prunable_weights(cfg["arch"], cfg["dataset"], float(width),  # noqa: E731
                                           int(cfg["wrn_depth"]), int(cfg["wrn_widen"]))
    try:
        if summary.get("mode", cfg["mode"]) == "small-dense":
            if summary.get("width") is not None:
                return count(summary["width"])
            return round((1 - float(cfg["sparsity"])) * count(cfg["width"]))
        return round(float(summary["final_density"]) * count(cfg["width"]))
    except (KeyError, TypeError, ValueError):
        return None


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    evaluated where it converges fast (x < (a + 1) / (a + b + 2)) and through I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even term, then the odd one
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return front * f


def t_test_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom: P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2, 0.5, df / (df + t * t)))


def paired_t_test(diffs: list[float]) -> tuple[float, float] | None:
    """(t, two-sided p) of the paired t-test on the per-seed differences (n - 1 d.o.f.); None with fewer than
    two differences, or when they are all 0. Equal nonzero differences give t = ±inf, p = 0."""
    n = len(diffs)
    if n < 2:
        return None
    mean, std = mean_std(diffs)
    if std == 0.0:
        return None if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (std / math.sqrt(n))
    return t, t_test_p(t, n - 1)


def variant_label(v: str) -> str:
    """A capacity-study variant's short label: its VARIANTS label without the parenthesis; a small dense AT
    named by its folder's suffix (small-dense-w0.04: 'small dense AT w0.04')."""
    if v.startswith("small-dense-"):
        return "small dense AT " + v.removeprefix("small-dense-")
    return VARIANTS.get(v, v).split(" (")[0]


def mean_weights(runs: list[dict]) -> float | None:
    counts = [r["weights"] for r in runs if r.get("weights") is not None]
    return sum(counts) / len(counts) if counts else None


def nearest_small_dense(groups: dict, count: float) -> str | None:
    """The small dense AT variant whose mean active weights are nearest (in ratio) to count, if within
    MATCH_FACTOR; None when there is none."""
    if count <= 0:
        return None
    candidates = [(abs(math.log(w / count)), v) for v in groups if v.startswith("small-dense")
                  if (w := mean_weights(groups[v]))]
    if not candidates:
        return None
    distance, v = min(candidates)
    return v if distance <= math.log(MATCH_FACTOR) else None


def capacity_pairs(groups: dict) -> list[dict]:
    """One entry per CAPACITY_SPARSE variant and the small dense AT it is paired with: by its active weights,
    and, where its nominal sparsity's count (1 - s) x its network's weights points to another small dense AT
    (Flying Bird+ ends sparser than it starts), by that too. Entries: variant, s, weights, dense, match,
    dense_weights, seeds (on both sides), diffs {claim key: per-seed differences}, missing (why, or None)."""
    entries = []
    for v in CAPACITY_SPARSE:
        s = float(v.rsplit("-s", 1)[1])
        runs = groups.get(v, [])
        count = mean_weights(runs)
        if count is None:
            entries.append(dict(variant=v, s=s, weights=None, dense=None, match=None, dense_weights=None, seeds=[],
                                diffs={}, missing="no finished run" if not runs else "active weights unknown"))
            continue
        targets = [("nearest count", count)]
        if not any("thin_weight_density" in r for r in runs):  # an unstructured mask: s is the weight sparsity
            full = [r["weights"] / r["final_density"] for r in runs if r["weights"] and r["final_density"]]
            if full:
                targets.append((f"nominal s={s:g}", (1 - s) * sum(full) / len(full)))
        matched = []
        for how, target in targets:
            d = nearest_small_dense(groups, target)
            if d is None and how == "nearest count":
                entries.append(dict(variant=v, s=s, weights=count, dense=None, match=how, dense_weights=None,
                                    seeds=[], diffs={}, missing=f"no small dense AT within x{MATCH_FACTOR:g} of "
                                                               f"{target:,.0f} weights"))
            if d is None or d in matched:
                continue
            matched.append(d)
            dense = {r["seed"]: r for r in groups[d]}
            both = [r for r in runs if r["seed"] in dense]
            entries.append(dict(
                variant=v, s=s, weights=count, dense=d, match=how, dense_weights=mean_weights(groups[d]),
                seeds=[r["seed"] for r in both], diffs={k: [r[k] - dense[r["seed"]][k] for r in both]
                                                         for _, k in CAPACITY_CLAIMS},
                missing=None if both else f"no seed on both sides (seeds {','.join(str(r['seed']) for r in runs)} "
                                          f"against {','.join(map(str, dense))})"))
    return entries


def paired_cell(diffs: list[float]) -> str:
    """mean ± std (per seed), p = the paired t-test's two-sided p-value ('-' when it has none)."""
    test = paired_t_test(diffs)
    return (cell(diffs, 2) + " (" + " / ".join(f"{d:+.2f}" for d in diffs) + "), p = "
            + (f"{test[1]:.3f}" if test else "-"))


def weights_cell(counts: list[int]) -> str:
    """Active weights over seeds: the count when every seed has the same, else mean ± std; '-' when unknown."""
    if len(set(counts)) > 1:
        mean, std = mean_std(counts)
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{counts[0]:,}" if counts else "-"


def capacity_section(groups: dict) -> str:
    """The capacity study: every dense and sparse variant by its active weights (missing ones marked), and
    each sparse variant - the small dense AT of its count, paired by seed, with the paired t-test.
    Nothing while no small dense AT has a finished run."""
    if not any(v.startswith("small-dense") for v in groups):
        return ""
    dense_curve = [*DENSE_CURVE, *sorted(v for v in groups if v.startswith("small-dense") and v not in DENSE_CURVE)]
    columns = (("robust gen. gap", "robust_gap"), ("RA final", "ra_final"), ("RA best", "ra_best"),
               ("RA best - final", "ra_diff"), ("train RA (final)", "train_ra_final"))
    rows = []
    for v in [*dense_curve, *FB_CURVE, *POINTS]:
        runs = groups.get(v, [])
        w = [r["weights"] for r in runs if r["weights"] is not None]
        rows.append([variant_label(v),
                     ",".join(str(r["seed"]) for r in runs) or "missing",
                     weights_cell(w),
                     *(cell([r[k] for r in runs], 2) for _, k in columns)])
    pairs = []
    for e in capacity_pairs(groups):
        weights = "-" if e["weights"] is None else f"{e['weights']:,.0f}"
        weights += " / " + ("-" if e["dense_weights"] is None else f"{e['dense_weights']:,.0f}")
        head = [f"{e['s']:g}", variant_label(e["variant"]),
                f"{e['dense']} ({e['match']})" if e["dense"] else "-", weights,
                f"{','.join(map(str, e['seeds']))} (n={len(e['seeds'])})" if e["seeds"] else "-"]
        pairs.append(head + ([f"missing: {e['missing']}"] + ["-"] * (len(CAPACITY_CLAIMS) - 1) if e["missing"]
                             else [paired_cell(e["diffs"][k]) for _, k in CAPACITY_CLAIMS]))
    return ("\n\n## Capacity: sparse networks against dense networks with as many weights\n\n"
            "Active weights = conv + linear weights of the final model (final density x the network's; the channel "
            "ticket's thin network). Dense AT at decreasing width (small dense) against Flying Bird across sparsity, "
            "Flying Bird+, Robust Bird, the channel ticket and the fixed random masks; mean ± sample std over the "
            "seeds listed (capacity.png: the same, against the active weights).\n\n"
            + sw.markdown_table(["variant", "seeds", "active weights", *(h for h, _ in columns)], rows)
            + f"\n\nSparse variant - the small dense AT of its count (the nearest, within a factor "
              f"{MATCH_FACTOR:g}; and that of its nominal sparsity where it differs: Flying Bird+ ends sparser than "
              "it starts), paired by seed over the seeds both have (n): mean ± std (per seed), p = two-sided paired "
              "t-test, n - 1 degrees of freedom ('-' with one seed).\n\n"
            + sw.markdown_table(["s", "sparse variant", "small dense AT (matched by)",
                                 "active weights (sparse / dense)", "paired seeds",
                                 *(f"{h} (sparse - dense)" for h, _ in CAPACITY_CLAIMS)], pairs))


def capacity_figure(groups: dict, out_dir: Path):
    """capacity.png: robust gap, final test RA and best - final against the active weights (log axis); a curve
    for dense AT at decreasing width, one for Flying Bird across sparsity, points for the other sparse
    variants; mean ± std over seeds as error bars. Robust Bird's and the fixed masks' points are drawn 5% right
    and left of their counts (the legend says so), off Flying Bird's at the same count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    dense_curve = sorted((v for v in groups if v == "dense" or v.startswith("small-dense")),
                         key=lambda v: (mean_weights(groups[v]) or 0, v))
    series = [  # (variants, style, color, label, x dodge: Robust Bird and the fixed masks share 35,010 with FB)
        (dense_curve, "o-", colors["dense"], "dense AT, decreasing width", 1.0),
        ([v for v in FB_CURVE if v in groups], "o-", colors["fb-s0.8"], "Flying Bird, s = 0.5-0.95", 1.0),
        (["fbplus-s0.8"], "^", colors["fbplus-s0.8"], "Flying Bird+ s=0.8", 1.0),
        (["rb-s0.8"], "s", colors["rb-s0.8"], "Robust Bird s=0.8 (x 1.05)", 1.05),
        (["rb-channel-s0.79"], "D", colors["rb-channel-s0.79"], "channel ticket s=0.79", 1.0),
        (["fixed-mask-s0.8", "fixed-mask-s0.95"], "x", colors["fixed-mask-s0.8"], "fixed random mask (x 0.95)", 0.95)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, (("robust_gap", "robust gen. gap (points)"),
                                      ("ra_final", "test RA, final model (%)"),
                                      ("ra_diff", "robust overfitting: RA best - final (points)"))):
        for variants, style, color, label, dodge in series:
            present = [v for v in variants if v in groups and mean_weights(groups[v])]
            if not present:
                continue
            stats = [mean_std([r[key] for r in groups[v]]) for v in present]
            ax.errorbar([mean_weights(groups[v]) * dodge for v in present], [m for m, _ in stats],
                        yerr=[s for _, s in stats], fmt=style, color=color, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set(xlabel="active conv + linear weights", title=title)
    axes[0].legend(fontsize=7)
    sw.save_figure(fig, out_dir / "capacity.png")


USAGE = "usage: python results/study_report.py --study RUNS OUT_DIR | --overfit RUNS OUT_DIR [TEST_IMAGES]"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not ((args[:1] == ["--study"] and len(args) == 3) or (args[:1] == ["--overfit"] and len(args) in (3, 4))):
        sys.exit(USAGE)
    try:
        if args[0] == "--study":
            study_report(args[1], args[2])
        else:
            overfit_report(args[1], args[2], *map(int, args[3:]))
    except sw.SparseWinError as e:
        sys.exit(f"study_report.py: error: {e}")
