#!/usr/bin/env python3
"""Mutation check: does the default suite catch realistic one-line bugs in sparse_win.py?

    python .ci/mutants.py                 # every mutation (a few minutes on two cores)
    python .ci/mutants.py -k fb+ -j 2     # those whose name contains "fb+", two at a time
    python .ci/mutants.py --list          # the mutations and the tests that should catch them

For each mutation (name, old fragment, new fragment, pytest -k selection) the repository's
sparse_win.py and test_sparse_win.py (with pyproject.toml, README.md, run_experiments.sh, results/) are
copied into a temporary directory, the fragment is replaced (it must occur exactly once, else
the mutation "did not apply") and the selected tests run there, derandomized (CI=1) as in CI.
A failing selection caught the bug; a passing one did not. The selections are run once on the
unmutated copy first: they must pass, or a "caught" would mean nothing.

Prints a markdown table (mutation, result, the tests that failed) and exits 0 only when every
mutation applied and was caught. Every selection is part of the default suite (no slow tests),
so "caught" here means caught by `python -m pytest -q`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("sparse_win.py", "test_sparse_win.py", "pyproject.toml", "README.md", "run_experiments.sh",
         "results/study_report.py", "results/test_study_report.py")

CHARGE = '        self.ledger.charge(self.batches.rows[2], self.fwd, cost, out["passes"], out["forwards"])\n'
UPDATE_BLOCK = (CHARGE
                + '        if out["update"] is not None:\n'
                + "            self.fwd = None\n"
                + "            self.dist.check_masks(self.method.mask, self.where(i))\n"
                + '            self.run.updates.append(out["update"])\n')
RECOUNT = "        self.fwd = self.fwd or self.method.forward_flops(self.per_weight, self.unowned)\n"

# (name, old fragment, new fragment, pytest -k selection). Names start with the area.
MUTATIONS = [
    # -- issue 25: no traps in the library
    ("library: Flying Bird's growth name not checked (a misspelling grows at random)",
     'density, check_choice("growth", growth, GROWTHS), seed', "density, growth, seed",
     "test_names_are_checked_and_methods_used_before_start_say_so"),
    ("library: Flying Bird used before start() fails on None",
     "    def after_step(self, optimizer, epoch) -> dict | None:\n        self._started()\n",
     "    def after_step(self, optimizer, epoch) -> dict | None:\n",
     "test_names_are_checked_and_methods_used_before_start_say_so"),
    ("library: no warning when T is longer than the run",
     "if not (self.interval <= early or", "if False and not (self.interval <= early or",
     "test_flying_bird_warns_when_no_topology_update_would_happen"),
    ("library: the early bird's boundary (a distance equal to the threshold is settled) moved",
     "self.distances[-1] <= self.threshold", "self.distances[-1] < self.threshold",
     "test_early_bird_rule_at_its_boundary"),
    ("library: adversarial_step checks the loss after backward (a bad step touches the weights)",
     "        if before_backward is not None:\n            before_backward(value)\n        optimizer.zero_grad(set_to_none=True)\n        value.backward()\n",
     "        optimizer.zero_grad(set_to_none=True)\n        value.backward()\n        optimizer.step()\n        if before_backward is not None:\n            before_backward(value)\n",
     "test_adversarial_step_stops_a_bad_step_before_it_touches_the_weights"),
    # -- issue 29: a mistyped name, the values used, where the data came from
    ("cli: no 'did you mean' for a mistyped option, choice or preset",
     "close = difflib.get_close_matches(word, list(names), n=2, cutoff=0.8)", "close = []",
     "test_cli_bad_options"),
    ("resume: last.pt's config compared unresolved (a run written with eps -1 no longer resumes)",
     "old = dataclasses.asdict(resolved(config_of(ck)))", "old = dataclasses.asdict(config_of(ck))",
     "test_resume_of_a_last_pt_that_recorded_defaults_unresolved"),
    ("eval: --test-eps alone keeps the run's step size (not eps / 4)",
     'step = {"test_alpha": -1.0} if "test_eps" in overrides else {}', "step = {}",
     "test_eval_options_name_the_file_and_force_overwrites"),
    ("train: summary.json does not record where the data came from",
     "    t.run.data = source\n", "",
     "test_the_smoke_preset_runs_flying_bird_plus_and_records_the_values_used"),
    ("library: adversarial_step picks attack_model / update_model with `or` (a compiled module has no truth value)",
     "(m if m is not None else model for m in (attack_model, update_model))",
     "(m or model for m in (attack_model, update_model))",
     "test_adversarial_step_runs_the_given_attack_and_update_modules"),
    # -- the three of issue 15
    ("fb+: robust gap with its sign flipped (val RA - train RA)",
     'self.record(train_ra - val["ra"], val["adv_loss"])', 'self.record(val["ra"] - train_ra, val["adv_loss"])',
     "test_fbplus_end_epoch_to_update_with_paper_defaults or test_fbplus_end_to_end"),
    ("flops: a step charged after after_step (the update step at the new density)",
     UPDATE_BLOCK, UPDATE_BLOCK.replace(CHARGE, "") + RECOUNT + CHARGE,
     "test_fbplus_end_to_end"),
    ("masks: Robust Bird re-masks the weights but not the momentum (mask.step() without the optimizer)",
     "self.mask.step(optimizer)  # masked weights", "self.mask.step()  # masked weights",
     "test_robust_bird_masks_weights_and_momentum or test_static_end_to_end"),
    # -- the released prune-and-regrow rule, fp32 evaluation
    ("masks: regrowth only among positions inactive before pruning (the just-pruned excluded)",
     "            mask.index_fill_(0, drop, False)\n", "",
     "test_update_dense_enough_layer or test_fbplus_extra_prune_and_growth_counts"),
    ("masks: FB+'s extra pruning also prunes a full layer",
     "if nnz == size or k <= 0:", "if k <= 0:",
     "test_update_leaves_a_full_layer_alone or test_fbplus_with_erk_keeps_its_dense_layers_dense"),
    ("masks: FB+'s extra growth counted from the total pruned (k + extra) instead of k",
     "k_grow = min(k + (math.ceil(extra_growth * k) if extra_growth else 0), len(pool))",
     "k_grow = min(k_drop + (math.ceil(extra_growth * k_drop) if extra_growth else 0), len(pool))",
     "test_fbplus_extra_prune_and_growth_counts"),
    ("eval: the evaluation attack runs under the caller's autocast (bf16)",
     "    with torch.autocast(device, enabled=False):  # fp32", "    with nullcontext():  # fp32",
     "test_evaluate_is_fp32_inside_an_autocast_region"),
    ("train: Robust Bird's default milestones are the paper's 100/150",
     "    milestones = (50, 150)  # released", "    milestones = (100, 150)  # released",
     "test_robust_bird_default_milestones_are_the_released_50_150"),
    # -- masks and allocation
    ("masks: regrown weights and momentum not zeroed (only the pruned ones)",
     "_flat(t).index_fill_(0, both, 0)", "_flat(t).index_fill_(0, drop, 0)",
     "test_update_many_random_updates"),
    ("masks: update() leaves the optimizer state (momentum) of pruned/regrown weights",
     "            for t in [p, *self._state_of(optimizer, p)]:\n                _flat(t)",
     "            for t in [p]:\n                _flat(t)",
     "test_update_many_random_updates"),
    ("masks: prune the largest |w| instead of the smallest",
     "_smallest(p.reshape(-1)[active].abs(), k_drop)", "_smallest(-p.reshape(-1)[active].abs(), k_drop)",
     "test_update_many_random_updates or test_update_matches_sort_reference"),
    ("masks: gradient growth picks the smallest |grad|",
     "_smallest(-p.grad.reshape(-1)[pool].abs(), k_grow)", "_smallest(p.grad.reshape(-1)[pool].abs(), k_grow)",
     "test_update_matches_sort_reference"),
    ("masks: ERK without the kernel dimensions (Erdos-Renyi)",
     "raw = [sum(s) / math.prod(s) for s in shapes]", "raw = [sum(s[:2]) / math.prod(s) for s in shapes]",
     "test_erk_closed_form_on_a_small_cnn or test_layer_densities_weighted_mean_and_closed_forms"),
    ("masks: total count floored instead of rounded",
     "max(len(sizes), round(density * sum(sizes)))", "max(len(sizes), int(density * sum(sizes)))",
     "test_allocate_counts_exact_total_and_bounds or test_dynamic_end_to_end"),
    # -- early bird and Robust Bird
    ("early bird: distance to the previous mask only, not the max over the queue",
     "self.distances.append(max(d) if d else 1.0)", "self.distances.append(d[-1] if d else 1.0)",
     "test_early_bird_fires_when_masks_settle"),
    ("early bird: magnitude mask keeps the largest signed values (abs() dropped)",
     "torch.cat([w.detach().abs().flatten().float()", "torch.cat([w.detach().flatten().float()",
     "test_magnitude_mask_global_topk"),
    ("early bird: FIFO length hard-coded to the paper's 5 (--eb-queue ignored)",
     "queue=cfg.eb_queue, threshold=cfg.eb_threshold", "queue=5, threshold=cfg.eb_threshold",
     "test_robust_bird_masks_weights_and_momentum"),
    ("flops: Robust Bird's train_flops_dense_ratio counts stage-1 images as AT images",
     'dense_fwd * (ledger.images - run.ticket_images)', "dense_fwd * ledger.images",
     "test_static_end_to_end"),
    # -- Flying Bird
    ("fb: T switches one epoch late (epoch > half instead of >=)",
     "self.interval_late if epoch >= self.late_epoch", "self.interval_late if epoch > self.late_epoch",
     "test_flying_bird_death_rate_and_intervals_from_the_config or test_dynamic_end_to_end"),
    ("fb: death rate from the defaults, not from --death-rate / --death-rate-final",
     "cosine_death_rate(self.mask.steps, self.total_steps, self.death_rate, self.death_rate_final)",
     "cosine_death_rate(self.mask.steps, self.total_steps)",
     "test_flying_bird_death_rate_and_intervals_from_the_config"),
    # -- Flying Bird+
    ("fb+: extra pruning fired by the growth rule (prune and grow swapped)",
     "extra_prune=self.prune_ratio if prune else 0.0", "extra_prune=self.prune_ratio if grow else 0.0",
     "test_fbplus_end_epoch_to_update_with_paper_defaults"),
    ("fb+: growth rule fed the clean val loss instead of the adversarial one",
     'self.record(train_ra - val["ra"], val["adv_loss"])', 'self.record(train_ra - val["ra"], val["loss"])',
     "test_fbplus_end_epoch_to_update_with_paper_defaults or test_fbplus_end_to_end"),
    ("fb+: --fbplus-start 0 taken as 'unset' (> 0 instead of >= 0)",
     "fbplus_start=cfg.fbplus_start if cfg.fbplus_start >= 0", "fbplus_start=cfg.fbplus_start if cfg.fbplus_start > 0",
     "test_fbplus_end_epoch_to_update_with_paper_defaults"),
    ("fb+: a stalled loss (equal values) does not count for growth",
     "(b > a) if rising else (b >= a)", "(b > a) if rising else (b > a)",
     "test_fbplus_decision_hand_made"),
    # -- PGD
    ("pgd: training attack given the evaluation budget (train/test eps swapped)",
     "cfg, (eps, alpha), stopping = self.cfg, self.cfg.eps(train=True), []",
     "cfg, (eps, alpha), stopping = self.cfg, self.cfg.eps(train=False), []",
     "test_train_and_eval_attacks_use_their_own_budgets"),
    ("pgd: L2 projection onto the sphere instead of the ball",
     "delta = delta * torch.clamp(eps / n, max=1.0)", "delta = delta * (eps / n)",
     "test_pgd_l2_one_step_closed_form_linear"),
    ("pgd: one-sided random start U(0, eps)",
     ".uniform_(-eps, eps, generator=generator)", ".uniform_(0, eps, generator=generator)",
     "test_one_step_attacks_closed_form_linear"),
    ("pgd: projection around the previous iterate instead of the clean input",
     "adv = _project(adv.detach() + alpha * step, x, eps, norm)",
     "adv = _project(adv.detach() + alpha * step, adv.detach(), eps, norm)",
     "test_pgd_ball_box_mode_grads_determinism"),
    # -- DDP sharding
    ("ddp: every rank takes the first rows of the random start",
     "**attack)[lo:hi]", "**attack)[:hi - lo]",
     "test_pgd_on_a_shard_equals_the_slice_of_the_full_batch or test_batches_start_is_each_ranks_slice"),
    ("ddp: shard offsets ignore the remainder of the batch",
     "lo = self.rank * q + min(self.rank, r)", "lo = self.rank * q",
     "test_batches_shards_are_the_rows_of_one_process"),
    ("ddp: the ledger counts this rank's images, not the global batch",
     "ledger.charge(self.batches.rows[2], self.fwd,", "ledger.charge(len(y), self.fwd,",
     "test_ddp_writes_once_and_counts_global_images"),
    # -- resume
    ("resume: FB+ history not restored",
     'list(state["gaps"]), list(state["losses"]), list(state["events"])', '[], [], list(state["events"])',
     "test_resume_fbplus_equivalent"),
    ("resume: the mask's RNG state not restored",
     'self.generator.set_state(state["generator"])', 'self.generator.get_state()',
     "test_mask_state_dict_round_trip_through_bytes"),
    ("resume: mid-epoch running sums not restored",
     "if part and self.dist.main:", "if part and not self.dist.main:",
     "test_stop_signal_mid_epoch_then_the_same_command_is_identical"),
    # -- evaluation
    ("eval: best.pt chosen on the last of equal val RAs (>=)",
     'if evaluated and val["ra"] > run.best_val_ra:', 'if evaluated and val["ra"] >= run.best_val_ra:',
     "test_train_reads_the_right_split_for_each_use"),
    ("eval: best.pt chosen by test RA",
     'if evaluated and val["ra"] > run.best_val_ra:', 'if evaluated and test["ra"] > run.best_val_ra:',
     "test_train_reads_the_right_split_for_each_use"),
    ("eval: robust generalization gap measured on val instead of training images",
     'train_final = t.evaluate("gap")', 'train_final = t.evaluate("val")',
     "test_train_reads_the_right_split_for_each_use"),
    ("eval: --eval counts robust examples that are misclassified clean",
     'robust=(ex["clean"] & ex["robust"]).tolist()', 'robust=ex["robust"].tolist()',
     "test_eval_counts_robust_only_when_clean_is_right"),
    ("eval: --eval ignores --restarts",
     "norm=cfg.norm, restarts=restarts,", "norm=cfg.norm, restarts=1,",
     "test_eval_each_mode or test_eval_restarts_are_the_worst_case"),
    # -- Robust Bird's channel ticket (issue 17)
    ("channel: slim keeps the consumer's first k inputs, not the kept channels",
     '_keep_only(consumer, ("weight",), idx, 1)', '_keep_only(consumer, ("weight",), torch.arange(len(idx), '
     'device=idx.device), 1)',
     "test_slim_computes_what_the_network_with_zeroed_channels_computes"),
    ("channel: slim forgets the BatchNorm running statistics",
     '_keep_only(bn, ("weight", "bias", "running_mean", "running_var"), idx, 0)',
     '_keep_only(bn, ("weight", "bias"), idx, 0)\n        bn.running_mean, bn.running_var = bn.running_mean[:len(idx)], '
     'bn.running_var[:len(idx)]',
     "test_slim_computes_what_the_network_with_zeroed_channels_computes"),
    ("channel: no channel reserved per group (a layer can lose every channel)",
     "keep[starts + torch.stack([part.argmax() for part in flat.split(sizes)])] = True",
     "keep[starts[:0]] = True",
     "test_channel_mask_keeps_the_largest_and_one_per_group"),
    ("channel: the BN L1 penalty also in AT (not only stage 1)",
     'if self.pretraining and self.ticket == "channel" and self.bn_l1:', 'if self.ticket == "channel" and self.bn_l1:',
     "test_bn_l1_subgradient_in_stage_one_only or test_channel_ticket_l1_penalty"),
    ("channel: the penalty's sign flipped (pushes |gamma| up)",
     "g.grad.add_(torch.sign(g.detach()), alpha=self.bn_l1)", "g.grad.add_(torch.sign(g.detach()), alpha=-self.bn_l1)",
     "test_bn_l1_subgradient_in_stage_one_only"),
    ("channel: resume forgets the thin architecture (trains the full network again)",
     '    if ck.get("channels"):  # a channel ticket\'s thin network: rebuilt to the recorded channel counts',
     '    if False:  # a channel ticket\'s thin network: rebuilt to the recorded channel counts',
     "test_resume_channel_ticket_equivalent"),
    ("channel: the thin network's density counted against itself (1.0), not the full network",
     "sum(weight_counts(self.model).values()) / self.full_weights",
     "sum(weight_counts(self.model).values()) / sum(weight_counts(self.model).values())",
     "test_channel_ticket_end_to_end or test_robust_bird_channel_ticket_adopts"),
    # -- regularizers (issue 18)
    ("trades: the KL term's sign flipped (the loss rewards disagreement)",
     "return F.cross_entropy(logits, y) + beta * kl, adv_logits", "return F.cross_entropy(logits, y) - beta * kl, adv_logits",
     "test_trades_loss_closed_form_linear"),
    ("trades: the attack starts at x (no 0.001 N(0, I))",
     "loss_fn=kl, init=x + start)", "loss_fn=kl, init=x)",
     "test_trades_attack_equals_the_reference_loop"),
    ("awp: the perturbation not masked (pruned weights move during the step)",
     "n: g * masks[n] if masks is not None and n in masks else g for", "n: g for",
     "test_awp_perturbation_masks_norms_and_exact_undo"),
    ("awp: undone by subtraction (w + v - v rounds)",
     "                self.weights[n].copy_(w)", "                self.weights[n].sub_(self.v[n])",
     "test_awp_perturbation_masks_norms_and_exact_undo"),
    ("awp: the ascent forward updates the BatchNorm statistics",
     "**{n: b.clone() for n, b in model.named_buffers()}}", "**dict(model.named_buffers())}",
     "test_awp_keeps_batchnorm_statistics"),
    ("ema: the average not re-masked (a pruned weight lives on in it)",
     "            for n, m in masks.items():\n                weights[n].mul_(m)", "            pass",
     "test_weight_average_closed_form_and_masks or test_regularizers_end_to_end"),
    ("ema: the raw model evaluated instead of the average",
     "evaluate(self.average.model if self.average is not None else self.core, b,", "evaluate(self.core, b,",
     "test_regularizers_end_to_end"),
    ("ema: resume starts a fresh average from the raw weights",
     '        t.average.load_state_dict(ck["model"])', "        pass",
     "test_resume_regularized_equivalent"),
    ("flops: AWP's ascent not charged",
     "passes=(2 if trades else 1) * (2 if awp else 1),", "passes=2 if trades else 1,",
     "test_regularizers_charge_their_flops"),
]


def run_tests(where: Path, selection: str, timeout: int) -> tuple[int, str]:
    env = dict(os.environ, CI="1", MUTANTS="1", PYTHONDONTWRITEBYTECODE="1")  # derandomized, no shrinking
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "-k", selection]
    try:
        p = subprocess.run(cmd, cwd=where, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s"
    return p.returncode, p.stdout + p.stderr


def copy_repo(dst: Path, mutation: tuple[str, str] | None = None) -> bool:
    for name in FILES:
        if (ROOT / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    if mutation is None:
        return True
    old, new = mutation
    text = (dst / "sparse_win.py").read_text()
    if text.count(old) != 1:
        return False
    (dst / "sparse_win.py").write_text(text.replace(old, new))
    return True


def failing_tests(output: str) -> list[str]:
    names = re.findall(r"^(?:FAILED|ERROR) test_sparse_win\.py::(\S+)", output, re.M)
    return sorted(set(n.split("[")[0] for n in names)) or ["(see output)"]


def check(mutation, timeout: int) -> dict:
    name, old, new, selection = mutation
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        t0 = time.time()
        if not copy_repo(Path(tmp), (old, new)):
            return dict(name=name, result="mutation did not apply", tests=[], seconds=0.0)
        rc, out = run_tests(Path(tmp), selection, timeout)
    seconds = time.time() - t0
    if rc == 1:
        return dict(name=name, result="caught", tests=failing_tests(out), seconds=seconds)
    if rc == 0:
        return dict(name=name, result="NOT caught", tests=[], seconds=seconds)
    if rc == 5:
        return dict(name=name, result="no test selected", tests=[selection], seconds=seconds)
    if rc == -1:
        return dict(name=name, result="caught (timeout)", tests=[selection], seconds=seconds)
    return dict(name=name, result=f"error (pytest exit {rc})", tests=[out.strip().splitlines()[-1:]], seconds=seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutations checked at a time")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
    ap.add_argument("--list", action="store_true", help="list the mutations and their selections")
    args = ap.parse_args()
    todo = [m for m in MUTATIONS if args.k in m[0]]
    if args.list:
        for name, _, _, selection in todo:
            print(f"{name}\n    -k {selection!r}")
        return 0
    t0 = time.time()
    union = " or ".join(f"({m[3]})" for m in todo)
    with tempfile.TemporaryDirectory(prefix="mutant-base-") as tmp:
        copy_repo(Path(tmp))
        rc, out = run_tests(Path(tmp), union, args.timeout)
    if rc != 0:
        print(out[-3000:])
        print(f"the selected tests fail without any mutation (pytest exit {rc}): fix them first")
        return 2
    print(f"baseline: the selected tests pass unmutated ({time.time() - t0:.0f} s)", flush=True)
    def one(m):
        r = check(m, args.timeout)
        print(f"{r['result']:>24}: {r['name']} ({r['seconds']:.0f} s)", flush=True)
        return r
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, todo))
    print("\n| mutation | result | failing tests | s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['result']} | {', '.join(map(str, r['tests']))} | {r['seconds']:.0f} |")
    bad = [r for r in results if not r["result"].startswith("caught")]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutations caught in {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
