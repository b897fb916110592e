"""Attribution maps and their span (AGAIN's figure of merit): axioms, formulas, script."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from again_tf import models
from again_tf.analysis import attribution
from tests.helpers import ROOT, run_main


def _random_images(n, shape=(28, 28, 1), seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def _linear_model(shape, num_classes=5, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(num_classes)])
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(int(np.prod(shape)), num_classes)).astype(np.float32)
    b = rng.normal(size=(num_classes,)).astype(np.float32)
    model.layers[-1].set_weights([w, b])
    return model, w, b


def test_integrated_gradients_completeness_on_small_cnn():
    keras.utils.set_random_seed(3)
    model = models.SmallCNN(num_classes=10, width=4, hidden=16, mean=(0.286,), std=(0.353,))
    x = _random_images(6, seed=1)
    model.build(x.shape)
    y = np.array([0, 3, 9, 1, 5, 7])
    ig = attribution.integrated_gradients(model, x, y, steps=64, batch_size=4)
    assert ig.shape == (6, 28, 28)
    logits = np.asarray(model(x, training=False))
    logits0 = np.asarray(model(np.zeros_like(x), training=False))
    expected = logits[np.arange(6), y] - logits0[np.arange(6), y]
    assert np.abs(expected).min() > 1e-3  # the axiom is not trivially 0 = 0
    np.testing.assert_allclose(ig.sum(axis=(1, 2)), expected,
                               rtol=0.05, atol=0.02 * np.abs(expected).max())
    # a non-zero baseline: completeness holds against that baseline instead
    base = np.full_like(x, 0.5)
    ig_b = attribution.integrated_gradients(model, x, y, baseline=0.5, steps=64)
    logits_b = np.asarray(model(base, training=False))
    expected_b = logits[np.arange(6), y] - logits_b[np.arange(6), y]
    np.testing.assert_allclose(ig_b.sum(axis=(1, 2)), expected_b,
                               rtol=0.05, atol=0.02 * np.abs(expected_b).max())


def test_integrated_gradients_of_linear_model_is_exact():
    shape = (5, 4, 3)
    model, w, _ = _linear_model(shape)
    x = _random_images(4, shape, seed=2)
    y = np.array([0, 4, 2, 2])
    ig = attribution.integrated_gradients(model, x, y, steps=3)
    # linear: IG = x ⊙ W[:, y] exactly, for any number of steps
    expected = (x.reshape(4, -1) * w[:, y].T).reshape((4,) + shape).sum(-1)
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-5)


def test_input_gradient_of_linear_model_matches_weights_and_finite_differences():
    shape = (6, 5, 3)
    model, w, b = _linear_model(shape)
    x = _random_images(7, shape, seed=4)
    y = np.array([0, 1, 2, 3, 4, 0, 2])
    got = attribution.input_gradient(model, x, y, batch_size=3)  # uneven batches
    expected = np.abs(w[:, y].T.reshape((7,) + shape)).sum(-1)
    assert got.shape == (7, 6, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # central finite differences of the NumPy logit (x W + b)_y at a few pixels
    f = lambda img, cls: float(img.reshape(-1).astype(np.float64) @ w[:, cls] + b[cls])
    h = 1e-2
    for n, (i, j) in [(0, (0, 0)), (3, (2, 4)), (6, (5, 1))]:
        total = 0.0
        for c in range(3):
            plus, minus = x[n].astype(np.float64).copy(), x[n].astype(np.float64).copy()
            plus[i, j, c] += h
            minus[i, j, c] -= h
            total += abs((f(plus, y[n]) - f(minus, y[n])) / (2 * h))
        np.testing.assert_allclose(got[n, i, j], total, rtol=1e-3)
    # default y: the predicted class
    pred = (x.reshape(7, -1) @ w + b).argmax(1)
    np.testing.assert_allclose(attribution.input_gradient(model, x),
                               np.abs(w[:, pred].T.reshape((7,) + shape)).sum(-1), rtol=1e-5)


def _span_numpy(m, share):
    v = sorted(np.abs(m).ravel().tolist(), reverse=True)
    total, acc = sum(v), 0.0
    if total == 0:
        return 0.0
    for k, t in enumerate(v, start=1):
        acc += t
        if acc >= share * total - 1e-12 * total:
            return k / len(v)
    return 1.0


def test_attribution_span_on_hand_made_maps():
    h, w = 28, 28
    one_hot = np.zeros((h, w))
    one_hot[10, 3] = -2.5  # the sign does not matter
    uniform = np.ones((h, w))
    half = np.zeros((h, w))
    half[:, :14] = 1.0
    maps = np.stack([one_hot, uniform, half, np.zeros((h, w))])
    for share in (0.5, 0.9, 1.0):
        spans = attribution.attribution_span(maps, share)
        np.testing.assert_allclose(spans[0], 1 / (h * w))
        np.testing.assert_allclose(spans[1], np.ceil(share * h * w) / (h * w), rtol=1e-6)
        np.testing.assert_allclose(spans[2], np.ceil(share * h * w / 2) / (h * w), rtol=1e-6)
        assert spans[3] == 0.0
    assert abs(attribution.attribution_span(uniform[None], 0.9)[0] - 0.9) < 2 / (h * w)
    rng = np.random.default_rng(0)
    rand = rng.normal(size=(5, 9, 7)) * rng.uniform(0, 1, (5, 9, 7)) ** 4
    for share in (0.3, 0.9):
        got = attribution.attribution_span(rand, share)
        np.testing.assert_allclose(got, [_span_numpy(m, share) for m in rand], rtol=1e-6)
        assert attribution.mean_span(rand, share) == pytest.approx(float(got.mean()))
    with pytest.raises(ValueError, match="share"):
        attribution.attribution_span(maps, 1.5)


def test_script_runs_end_to_end(tmp_path):
    paths = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = models.SmallCNN(num_classes=10, width=4, hidden=16, mean=(0.286,),
                                std=(0.353,))
        model.build((None, 28, 28, 1))
        run = tmp_path / f"run{seed}"
        run.mkdir()
        model.save(run / "model.keras")
        paths.append(str(run) if seed == 0 else str(run / "model.keras"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "attribution_span.py"),
         f"--models={','.join(paths)}", "--num_images=8", "--steps=4", "--num_show=3",
         f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for png in ("attribution_maps_grad.png", "attribution_maps_ig.png",
                "attribution_span_hist.png"):
        assert (out / png).stat().st_size > 1000
    rows = json.loads((out / "attribution_span.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("run0", "grad"), ("run0", "ig"), ("run1", "grad"), ("run1", "ig")]
    for r in rows:
        assert 0 < r["span50"] < r["span90"] <= 1
        assert f"{r['span90']:8.4f}" in proc.stdout
    bad = run_main(os.path.join("benchmarks", "attribution_span.py"), f"--models={paths[0]}",
                   "--method=lime", f"--out={out}")
    assert bad.returncode == 2 and "--method=lime" in bad.stderr
