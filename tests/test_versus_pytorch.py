"""benchmarks/versus_pytorch.py at a tiny size (so it cannot rot), and evaluate.py's
throughput line. Needs PyTorch and torchattacks (`pip install -e ".[compare]"` and
`pip install --no-deps torchattacks==3.5.1`); skipped only when PyTorch is missing."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = "PyTorch is not installed: pip install -e '.[compare]' (CPU torch 2.13.0)"


def load_script():
    spec = importlib.util.spec_from_file_location(
        "versus_pytorch", os.path.join(ROOT, "benchmarks", "versus_pytorch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vs():
    pytest.importorskip("torch", reason=NO_TORCH)
    return load_script()


TINY = ["--models=small_cnn", "--width=4", "--hidden=16", "--batch_size=8", "--batches=1",
        "--rounds=1", "--steps=2", "--aa_images=8", "--aa_chunk=4", "--aa_budgets=official",
        "--aa_iters=3", "--aa_queries=10", "--train_images=128", "--train_epochs=1",
        "--train_steps=1", "--threads=2"]


def test_tiny_comparison_prints_both_frameworks(vs, capsys):
    import torchattacks  # noqa: F401  (CI installs it: the AutoAttack part needs it)

    out = vs.main(TINY)
    printed = capsys.readouterr().out
    # The copied weights give the same logits (inference and training-mode BatchNorm).
    assert out["parity"]["small_cnn"]["eval"] < 1e-4
    assert out["parity"]["small_cnn"]["train"] < 1e-4
    # Speed: both frameworks measured, both steps, ratio = ours / theirs.
    best = out["speed"]["small_cnn"]
    assert set(best) == {("ours", "plain"), ("ours", "at"), ("torch", "plain"),
                         ("torch", "at")}
    assert all(v > 0 for v in best.values())
    at_row = out["speed_rows"][1]
    assert at_row["step"] == "PGD-2 AT step"
    assert float(at_row["again_tf / PyTorch"]) == pytest.approx(
        best[("ours", "at")] / best[("torch", "at")], rel=0.01)
    assert "| model | step | again_tf img/s | PyTorch img/s | again_tf / PyTorch |" in printed
    # AutoAttack: same weights and predictions in both, both cascades ran on every image.
    check = out["aa_check"]
    assert check["max_logit_gap"] < 1e-4 and check["same_predictions"] == 8
    aa = out["aa"]["official"]
    for lib in ("ours", "torchattacks"):
        after = [aa["accuracy_after"][lib][c] for c in vs.COMPONENTS]
        assert after == sorted(after, reverse=True)  # the cascade never gains accuracy
        assert after[-1] == pytest.approx(aa["robust"][lib])
        assert after[0] <= check["clean_accuracy"]
    assert aa["worst_case"] <= min(aa["robust"].values())
    assert "| budget | after | again_tf robust acc | torchattacks robust acc |" in printed
    assert printed.count("official (3 it, 10 q) |") == 5  # four components and the total


def test_resnet18_twin_matches_after_copy_and_a_wrong_copy_is_caught(vs):
    """ResNet-18's stride-2 padding and shortcuts: the twin gives the same logits; a
    deliberately wrong copy (moving variance left at PyTorch's 1) is noticed."""
    import torch
    args = vs.parse_args(["--models=resnet18"])
    row, ok, gaps = vs.parity("resnet18", args)
    assert ok and gaps["eval"] < 1e-4 and gaps["train"] < 1e-4, row
    keras.utils.set_random_seed(1)
    tf_model = vs.build_tf("resnet18", args)
    vs.randomize_batchnorm(tf_model, 1)
    net = vs.make_twin("resnet18", tf_model, args)
    with torch.no_grad():
        net.blocks[2].bn1.running_var.fill_(1.0)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    gap, _, _ = vs.logits_gap(tf_model, net, x, training=False)
    assert gap > 1e-3


def test_small_cnn_flatten_order_matters(vs):
    """The first Dense after Flatten is re-ordered from Keras' HWC to PyTorch's CHW: with
    the rows left in Keras' order the logits differ (so the parity check can fail)."""
    import torch
    args = vs.parse_args(["--width=4", "--hidden=8"])
    keras.utils.set_random_seed(2)
    tf_model = vs.build_tf("small_cnn", args)
    net = vs.make_twin("small_cnn", tf_model, args)
    x = np.random.default_rng(1).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    assert vs.logits_gap(tf_model, net, x, training=False)[0] < 1e-4
    kernel = tf_model.pool.dense[0].kernel.numpy()
    with torch.no_grad():
        net.dense0.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
    assert vs.logits_gap(tf_model, net, x, training=False)[0] > 1e-3


def test_torchattacks_budget_is_read_from_torchattacks(vs):
    """The "torchattacks" budget is what torchattacks.AutoAttack builds (10 iterations,
    Square 5000 queries), and ours then runs with the same numbers."""
    torchattacks = pytest.importorskip("torchattacks")
    args = vs.parse_args(["--width=4", "--hidden=8"])
    net = vs.make_twin("small_cnn", vs.build_tf("small_cnn", args), args)
    comps = vs.torchattacks_components(torchattacks, net, args, "torchattacks")
    assert [type(c).__name__ for c in comps] == ["APGD", "APGDT", "FAB", "Square"]
    assert (comps[0].steps, comps[1].steps, comps[2].steps, comps[3].n_queries) == (
        10, 10, 10, 5000)
    official = vs.torchattacks_components(torchattacks, net, args, "official")
    assert (official[0].steps, official[2].steps, official[3].n_queries) == (100, 100, 5000)
    assert official[3].rescale_schedule is False and official[2].multi_targeted


def test_bad_arguments_are_one_line_errors():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "versus_pytorch.py"),
                           "--parts=speed,nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --parts=")


def test_evaluate_prints_images_per_second(tmp_path):
    """evaluate.py's last line: images/s of the whole evaluation and of each attack,
    consistent with the seconds in its JSON report."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    path = tmp_path / "m.keras"
    model.save(path)
    proc = run_main("evaluate.py", f"--model_path={path}", "--attacks=clean,aa",
                    "--num_images=12", "--n_iter=2", "--n_queries=5", "--n_target_classes=2",
                    "--verbose=0", "--noclasswise")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"Throughput: 12 images in ([\d.]+) s for the whole evaluation "
                         r"\(([\d.]+) images/s\); images/s per attack: aa ([\d.]+)", last)
    assert match, last
    total, rate, aa_rate = map(float, match.groups())
    # The seconds are printed to 0.01 s: a quick run's rate is only known to that rounding.
    assert 12 / (total + 0.005) - 0.01 <= rate <= 12 / max(total - 0.005, 1e-3) + 0.01
    report = json.loads((tmp_path / "eval_m.json").read_text())
    assert aa_rate == pytest.approx(12 / report["attacks"]["aa"]["seconds"], rel=0.05)
    assert total >= report["attacks"]["aa"]["seconds"]
