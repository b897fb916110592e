"""End-to-end tests of evaluate.py on tiny models saved by the tests: one real subprocess
(the command-line contract, a clean stderr), the other cases through its main() in-process."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's own start-up lines on stderr (C++ logging, before absl is initialized).
TF_NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000")


def run(*args, real=False):
    if real:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
    else:
        proc = run_main("evaluate.py", *args)
    errors = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith(TF_NOISE)]
    return proc, errors


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory, fashion_train):
    """Any Keras classifier of [0, 1] images that outputs logits (not an again_tf model)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*fashion_train, epochs=2, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("plain") / "mlp.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, trained_cnn):
    """A train.py-like run folder: run.json, model.keras and best.keras."""
    folder = tmp_path_factory.mktemp("run")
    trained_cnn.save(folder / "model.keras")
    trained_cnn.save(folder / "best.keras")
    (folder / "run.json").write_text(json.dumps({"dataset": "fashion_mnist", "eps": 0.05,
                                                 "norm": "linf", "step_size": 0.0125}))
    return folder


def test_evaluates_any_keras_classifier(plain_model):
    proc, errors = run(f"--model_path={plain_model}", "--attacks=clean,pgd5,tpgd5,aa",
                       "--eps=8/255", "--num_images=40", "--n_iter=5", "--n_queries=20",
                       "--n_target_classes=2", "--verbose=0", real=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not errors, errors
    base = plain_model.parent / "eval_mlp"
    report = json.loads(base.with_suffix(".json").read_text())
    assert report["eps"] == pytest.approx(8 / 255) and report["num_images"] == 40
    acc = {k: v["accuracy"] for k, v in report["attacks"].items()}
    assert acc["clean"] > 0.5 and acc["aa"] < acc["clean"]
    assert list(report["attacks"]["aa"]["accuracy_after"]) == ["apgd-ce", "apgd-t", "fab-t",
                                                              "square"]
    assert report["worst_case"]["accuracy"] <= min(acc["pgd5"], acc["tpgd5"], acc["aa"])
    markdown = base.with_suffix(".md").read_text()
    assert "| aa |" in markdown and "worst case" in markdown
    pngs = sorted(p.name for p in plain_model.parent.glob("*.png"))
    assert "eval_mlp_classwise_accuracy.png" in pngs
    assert "eval_mlp_classwise_confusion_aa.png" in pngs
    assert "eval_mlp_classwise_weight_norms.png" in pngs  # the last Dense layer's norms
    cw = json.loads((plain_model.parent / "eval_mlp_classwise.json").read_text())
    assert cw["class_names"][0] == "T-shirt/top" and len(cw["weight_norms"]) == 10
    for line in ("clean", "pgd5", "tpgd5", "aa", "worst case"):
        assert line in proc.stdout


def test_run_folder_best_checkpoint_run_json_and_sanity(run_folder):
    proc, errors = run(f"--model_path={run_folder}", "--checkpoint=best",
                       "--attacks=clean,pgd10", "--num_images=60", "--sanity",
                       "--sanity_images=40", "--verbose=0", "--noclasswise")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run_folder / "eval_best.json").read_text())
    assert report["eps"] == 0.05 and report["step_size"] == 0.0125  # from run.json
    assert report["model_path"].endswith("best.keras")
    assert [c["name"] for c in report["sanity"]["checks"]][:2] == [
        "accuracy_falls_with_eps", "large_eps_reaches_zero"]
    assert "Sanity checks" in proc.stdout and "classwise" not in report
    assert not list(run_folder.glob("*.png"))


@pytest.mark.parametrize("args,message", [
    (["--model_path={missing}"], "does not exist"),
    (["--model_path={corrupt}"], "cannot load the model"),
    (["--model_path={folder}"], "without model.keras"),
    (["--model_path={model}", "--attacks=clean,pgd"], "Unknown attack 'pgd'"),
    (["--model_path={model}", "--eps=2"], "outside (0, 1]"),
])
def test_bad_input_gives_one_line(tmp_path, run_folder, args, message):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file" * 10)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    names = dict(missing=tmp_path / "nope.keras", corrupt=corrupt, folder=empty,
                 model=run_folder / "model.keras")
    proc, errors = run(*[a.format(**names) for a in args])
    assert proc.returncode != 0
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("evaluate.py: error: ") and message in errors[0], errors[0]
    assert proc.stdout == ""
    np.testing.assert_equal(list(tmp_path.glob("*.json")), [])
