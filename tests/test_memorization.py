"""Memorization scores: the estimator finds planted mislabeled examples, resumes from its
checkpoints, loads published formats, and splits evaluations into typical and atypical."""

import json
import os

import keras
import numpy as np
import pytest

from again_tf import models
from again_tf.analysis import memorization
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = [0, 1, 2]


def easy_problem(n=300, dim=64, seed=0):
    """Two Gaussian classes in 64-D, well separated; the first three labels are flipped."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(2, dim))
    y = rng.integers(0, 2, n)
    x = (protos[y] + rng.normal(size=(n, dim))).astype(np.float32)
    observed = y.copy()
    observed[PLANTED] = 1 - y[PLANTED]
    return x, observed


def linear():
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(2)])


def test_scores_from_runs_matches_the_definition():
    masks = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]], bool)
    correct = np.array([[1, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]], bool)
    scores, n_in, n_out = memorization.scores_from_runs(masks, correct)
    # Example 0: in runs 0, 2 (right, right), out 1, 3 (wrong, right): 1 − 0.5.
    # Example 1: in 2, 3 (right, wrong), out 0, 1 (right, wrong): 0.5 − 0.5. Example 2: never out.
    np.testing.assert_allclose(scores[:2], [0.5, 0.0])
    assert np.isnan(scores[2]) and n_in.tolist() == [2, 2, 4] and n_out.tolist() == [2, 2, 0]
    mask = memorization.subset_mask(10, 0.7, seed=3, k=1)
    assert mask.sum() == 7 and (mask == memorization.subset_mask(10, 0.7, 3, 1)).all()
    assert not (mask == memorization.subset_mask(10, 0.7, 3, 2)).all()


def test_planted_mislabeled_examples_are_memorized_and_typical_ones_not(tmp_path):
    x, y = easy_problem()
    result = memorization.estimate(x, y, num_models=12, model=linear, epochs=30, batch_size=64,
                                   lr=0.05, seed=0, verbose=0,
                                   checkpoint_dir=str(tmp_path / "runs"))
    scores = result["scores"]
    assert result["models_trained"] == 12 and scores.shape == (300,)
    others = scores[3:][~np.isnan(scores[3:])]
    assert (scores[PLANTED] >= 0.75).all(), scores[PLANTED]
    assert np.mean(others) < 0.05 and np.mean(others > memorization.DEFAULT_THRESHOLD) < 0.05
    # Resumable: a rerun with one more model trains only that one, from the saved runs.
    more = memorization.estimate(x, y, num_models=13, model=linear, epochs=30, batch_size=64,
                                 lr=0.05, seed=0, verbose=0, checkpoint_dir=str(tmp_path / "runs"))
    assert more["models_trained"] == 1 and len(list((tmp_path / "runs").glob("model_*.npz"))) == 13
    saved = [np.load(tmp_path / "runs" / f"model_{k:04d}.npz") for k in range(13)]
    recomputed, _, _ = memorization.scores_from_runs([s["mask"] for s in saved],
                                                     [s["correct"] for s in saved])
    np.testing.assert_array_equal(np.nan_to_num(more["scores"], nan=9),
                                  np.nan_to_num(recomputed, nan=9))
    with pytest.raises(ValueError, match="other options"):
        memorization.estimate(x, y, num_models=13, model=linear, epochs=5, verbose=0,
                              checkpoint_dir=str(tmp_path / "runs"))


def bright_or_dark(n=60, seed=0):
    """Class 0 dark, class 1 bright images: easy clean, and PGD with ε = 0.4 flips them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.clip(0.25 + 0.5 * y[:, None, None, None] + rng.normal(0, 0.05, (n, 8, 8, 1)), 0, 1)
    return x.astype(np.float32), y


def tiny_cnn():
    return models.SmallCNN(2, width=2, hidden=8)


def test_adversarial_recipe_measures_on_adversarial_inputs_by_default(tmp_path):
    x, y = bright_or_dark()
    memorization.estimate(x, y, num_models=1, model=tiny_cnn, epochs=3, batch_size=20, lr=1e-2,
                          defense="pgd_at", eps=0.05, step_size=0.02, attack_steps=2,
                          verbose=0, checkpoint_dir=str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["measure"] == "adversarial"
    assert np.load(tmp_path / "model_0000.npz")["correct"].mean() > 0.8
    with pytest.raises(ValueError, match="needs `eps`"):
        memorization.estimate(x, y, num_models=1, defense="pgd_at", verbose=0)
    with pytest.raises(ValueError, match="measure"):
        memorization.estimate(x, y, num_models=1, measure="robust", verbose=0)


def flat_linear():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])


def test_measure_adversarial_uses_pgd(tmp_path):
    """The same standardly trained model (same seed): right at ε = 0.01, wrong at ε = 0.4."""
    x, y = bright_or_dark()
    result = {}
    for eps in (0.01, 0.4):
        folder = tmp_path / str(eps)
        memorization.estimate(x, y, num_models=1, model=flat_linear, epochs=20, batch_size=20,
                              lr=0.05, eps=eps, measure="adversarial", eval_steps=10, verbose=0,
                              checkpoint_dir=str(folder))
        result[eps] = np.load(folder / "model_0000.npz")["correct"].mean()
    assert result[0.01] > 0.9 and result[0.4] < 0.2, result


def test_load_scores_formats_and_errors(tmp_path):
    scores = np.linspace(-0.2, 1.0, 7).astype(np.float32)
    np.save(tmp_path / "s.npy", scores)
    np.savez(tmp_path / "infl.npz", tr_mem=scores.astype(np.float64), tt_infl=np.zeros((2, 3)))
    np.savez(tmp_path / "one.npz", anything=scores)
    np.testing.assert_array_equal(memorization.load_scores(tmp_path / "s.npy"), scores)
    np.testing.assert_array_equal(memorization.load_scores(str(tmp_path / "infl.npz")), scores)
    np.testing.assert_array_equal(memorization.load_scores(tmp_path / "one.npz"), scores)
    with pytest.raises(ValueError, match="does not exist"):
        memorization.load_scores(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="shape"):
        memorization.load_scores(tmp_path / "infl.npz", key="tt_infl")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable"):
        memorization.load_scores(tmp_path / "bad.npy")


def test_split_results_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-0.2, 0.8, 50)
    scores[[3, 7]] = np.nan
    results = {"clean": {"correct": rng.uniform(size=50) < 0.8},
               "pgd20": {"correct": rng.uniform(size=50) < 0.4}}
    rep = memorization.split_results(results, scores, 0.15)
    valid = ~np.isnan(scores)
    atypical = valid & (np.nan_to_num(scores) > 0.15)
    typical = valid & ~atypical
    assert rep["unscored"] == 2
    assert rep["typical"]["count"] == typical.sum() and rep["atypical"]["count"] == atypical.sum()
    for name in results:
        c = results[name]["correct"]
        assert rep["typical"]["accuracy"][name] == pytest.approx(c[typical].mean())
        assert rep["atypical"]["accuracy"][name] == pytest.approx(c[atypical].mean())
    assert "atypical (mem > 0.15)" in memorization.format_split(rep)


def test_evaluate_py_splits_by_memorization(tmp_path, trained_cnn):
    path = tmp_path / "model.keras"
    trained_cnn.save(path)
    scores = np.where(np.arange(64) % 4 == 0, 0.9, 0.0).astype(np.float32)
    np.save(tmp_path / "mem.npy", scores)
    for split in ("test", "train"):
        report = tmp_path / f"eval_{split}.json"
        run = run_main("evaluate.py", f"--model_path={path}", "--attacks=clean,pgd5",
                       "--num_images=64", "--noclasswise", "--verbose=0", f"--report={report}",
                       f"--memorization_scores={tmp_path / 'mem.npy'}",
                       "--split_by_memorization", f"--memorization_split={split}")
        assert run.returncode == 0, run.stderr[-3000:]
        rep = json.loads(report.read_text())["memorization"]
        assert rep["typical"]["count"] == 48 and rep["atypical"]["count"] == 16
        if split == "test":  # the main evaluation's per-example results, split
            main = json.loads(report.read_text())["attacks"]
            overall = (48 * rep["typical"]["accuracy"]["clean"]
                       + 16 * rep["atypical"]["accuracy"]["clean"]) / 64
            assert overall == pytest.approx(main["clean"]["accuracy"])
        assert "By memorization" in run.stdout
    run = run_main("evaluate.py", f"--model_path={path}", "--split_by_memorization")
    assert run.returncode != 0 and "--memorization_scores" in run.stderr
