import dataclasses, gzip, json, math, os, pickle, shutil, struct, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import sparse_win as sw

# End-to-end tests of the training program (config, data, train, report, main).
# Every run uses the `smoke` preset (Fashion-MNIST from Debian's dataset-fashion-mnist,
# 4-channel ResNet-18, PGD-2) with its run directory and data dir under tmp_path.

HERE = Path(sw.__file__).resolve().parent
K = sw.PRESETS["smoke"]["train_steps"]  # training PGD steps of the smoke preset
N_TRAIN = sw.PRESETS["smoke"]["train_subset"]
REC_KEYS = {"epoch", "lr", "train_loss", "train_ra", "val_sa", "val_ra", "val_adv_loss", "test_sa", "test_ra",
            "test_adv_loss", "density", "train_flops", "train_flops_paper", "itop", "time"}
WALL = {"time", "wall_seconds"}  # wall-clock fields: the only ones allowed to differ after a resume


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One intra-op thread: on a shared 2-core box OpenMP's spinning threads made a smoke step
    # take 7 s instead of 0.16 s, and a fixed thread count keeps float reductions reproducible.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_dynamic_end_to_end(dynamic_run):
    recs, s, last, per_weight = check_common(dynamic_run, "dynamic", 2)
    net = smoke_model()
    shapes = [tuple(p.shape) for p in sw.prunable(net).values()]
    counts = sw.allocate_counts(shapes, 0.2, "igq")
    target = sum(counts) / sum(math.prod(sh) for sh in shapes)
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
    net = smoke_model()
    shapes = [tuple(p.shape) for p in sw.prunable(net).values()]
    counts = sw.allocate_counts(shapes, 0.2, "igq")
    target = sum(counts) / sum(math.prod(sh) for sh in shapes)
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
        meta = {"fine_label_names": ["f%d" % i for i in range(100)], "coarse_label_names": ["c%d" % i for i in range(20)]}
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
