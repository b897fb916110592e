"""Channel-wise activation analysis (CAS / CIFS figures): formulas, attack effect, script."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from again_tf import attacks, models
from again_tf.analysis import channels
from tests.conftest import fashion
from tests.helpers import ROOT, run_main


@pytest.fixture(scope="module")
def tiny_data():
    x, y = fashion("train[:2000]")
    return x, y


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    """SmallCNN(width=4, hidden=16) trained 3 quick epochs on 2,000 images (well above chance)."""
    keras.utils.set_random_seed(1)
    model = models.SmallCNN(10, width=4, hidden=16, mean=(0.286,), std=(0.353,))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = tiny_data
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


def test_channel_activations_match_numpy_on_feature_map(tiny_model, tiny_data):
    x = tiny_data[0][:37]
    fmap = np.asarray(tiny_model.feature_map(x, training=False)[0])
    expected = np.abs(fmap).mean(axis=(1, 2))
    # batch_size 10 splits 37 images unevenly: batching must not change anything
    got = channels.channel_activations(tiny_model, x, batch_size=10)
    assert got.shape == (37, 8)  # stage2 has 2 * width channels
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # SmallCNN has no neck and nothing inserted: stage2's map is the penultimate one
    np.testing.assert_allclose(channels.channel_activations(tiny_model, x, "stage2"),
                               expected, rtol=1e-5, atol=1e-6)


def test_channel_activations_at_an_earlier_point(tiny_model, tiny_data):
    x = tiny_data[0][:9]
    h = tiny_model.blocks[0](tiny_model.normalizer(x), training=False)
    expected = np.abs(np.asarray(h)).mean(axis=(1, 2))
    got = channels.channel_activations(tiny_model, x, "stage1")
    assert got.shape == (9, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="point"):
        channels.channel_activations(tiny_model, x, "stage7")
    with pytest.raises(TypeError, match="Classifier"):
        channels.channel_activations(keras.Sequential([keras.layers.Flatten()]), x)


def test_channel_activations_see_inserted_layers(tiny_data):
    """A layer inserted at the measured point is part of the measured map, and the
    magnitude is |h| (the negated map of the insert has the same magnitudes, doubled)."""

    class Double(keras.layers.Layer):
        def call(self, h, labels=None, training=None):
            return -2.0 * h

    keras.utils.set_random_seed(2)
    plain = models.SmallCNN(10, width=4, hidden=16)
    plain(np.zeros((1, 28, 28, 1), np.float32))
    doubled = models.SmallCNN(10, width=4, hidden=16, inserts={"stage1": Double()})
    doubled(np.zeros((1, 28, 28, 1), np.float32))
    doubled.set_weights(plain.get_weights())
    x = tiny_data[0][:5]
    got = channels.channel_activations(doubled, x, "stage1")
    assert got.min() >= 0
    np.testing.assert_allclose(got, 2.0 * channels.channel_activations(plain, x, "stage1"),
                               rtol=1e-5, atol=1e-6)
    # at the penultimate map, the insert's effect propagated through stage2 is measured
    fmap = np.asarray(doubled.feature_map(x)[0])
    np.testing.assert_allclose(channels.channel_activations(doubled, x),
                               np.abs(fmap).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def _frequency_reference(acts, y, num_classes, k):
    out = np.zeros((num_classes, acts.shape[1]))
    for c in range(num_classes):
        rows = acts[y == c]
        for row in rows:
            kth = np.sort(row)[::-1][k - 1]
            out[c] += row >= kth  # values are distinct: exactly k channels
        if len(rows):
            out[c] /= len(rows)
    return out


def test_channel_frequency_matches_numpy():
    rng = np.random.default_rng(0)
    acts = rng.random((60, 12))
    y = rng.integers(0, 4, size=60)
    y[y == 2] = 1  # class 2 has no example: its row stays 0
    for k in (1, 3, 12):
        freq = channels.channel_frequency(acts, y, num_classes=5, top_k=k)
        np.testing.assert_allclose(freq, _frequency_reference(acts, y, 5, k))
        counts = np.bincount(y, minlength=5)
        np.testing.assert_allclose(freq.sum(1), np.where(counts > 0, k, 0))
    # default: a quarter of the 12 channels
    np.testing.assert_allclose(channels.channel_frequency(acts, y, 5),
                               _frequency_reference(acts, y, 5, 3))


def test_channel_frequency_hand_made_and_ties():
    acts = np.array([[0.0, 5.0, 1.0, 2.0],
                     [3.0, 0.0, 9.0, 1.0],
                     [1.0, 1.0, 0.0, 0.5]])   # a tie: channel 0 is kept, 1 dropped
    y = np.array([0, 0, 1])
    freq = channels.channel_frequency(acts, y, num_classes=2, top_k=1)
    np.testing.assert_allclose(freq, [[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="top_k"):
        channels.channel_frequency(acts, y, 2, top_k=5)
    with pytest.raises(ValueError, match="labels"):
        channels.channel_frequency(acts, np.array([0, 0, 3]), 2, top_k=1)


def test_channels_for_share_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = rng.random(rng.integers(1, 30)) ** 3
        share = float(rng.uniform(0.05, 1.0))
        s = np.sort(m)[::-1]
        brute = next(i for i in range(1, len(s) + 1)
                     if s[:i].sum() >= share * s.sum() * (1 - 1e-12))
        assert channels.channels_for_share(rng.permutation(m), share) == brute
    assert channels.channels_for_share(np.array([5.0, 3.0, 1.0, 1.0]), 0.8) == 2
    with pytest.raises(ValueError, match="share"):
        channels.channels_for_share(np.ones(3), 1.5)


def test_natural_vs_adversarial_sorted_and_different(tiny_model):
    x, y = fashion("test[:64]")
    attack = attacks.PGD(tiny_model, eps=0.1, step_size=0.025, steps=5, seed=0)
    r = channels.natural_vs_adversarial(tiny_model, x, y, attack, batch_size=32)
    nat, adv = r["natural_activations"], r["adversarial_activations"]
    assert nat.shape == adv.shape == (64, 8)
    assert sorted(r["order"].tolist()) == list(range(8))
    assert np.all(np.diff(r["natural"]) <= 0)  # decreasing natural magnitude
    np.testing.assert_allclose(r["natural"], nat.mean(0)[r["order"]], rtol=1e-6)
    np.testing.assert_allclose(r["adversarial"], adv.mean(0)[r["order"]], rtol=1e-6)
    # the adversarial inputs are real attacks inside the ball, and they move the channels
    assert np.abs(r["x_adv"] - x).max() <= 0.1 + 1e-6
    clean = (np.asarray(tiny_model(x)).argmax(1) == y).mean()
    robust = (np.asarray(tiny_model(r["x_adv"])).argmax(1) == y).mean()
    print(f"clean {clean:.3f} PGD {robust:.3f}")
    assert clean > 0.5 and robust < clean - 0.2
    assert np.abs(adv - nat).mean() > 1e-3 * nat.mean()


def _run_script(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "channel_analysis.py"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_script_end_to_end(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tiny_model.save(run_dir / "model.keras")
    proc = _run_script(f"--model_path={run_dir}", "--num_images=40", "--steps=3",
                       "--batch_size=16", "--top_k=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run_dir / "channels"  # default: next to the model
    for name in ("channels_magnitude.png", "channels_frequency.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "channels.json").read_text())
    assert report["channels"] == 8 and report["num_images"] == 40 and report["top_k"] == 3
    assert report["eps"] == pytest.approx(0.1)  # Fashion-MNIST's default budget
    assert report["pgd_accuracy"] < report["clean_accuracy"]
    assert np.all(np.diff(report["natural"]) <= 0)
    np.testing.assert_allclose(np.sum(report["frequency_natural"], 1), 3.0)
    assert "channels holding 90% of the magnitude" in proc.stdout

    bad = run_main(os.path.join("benchmarks", "channel_analysis.py"),
                   f"--model_path={tmp_path / 'missing.keras'}")
    assert bad.returncode == 2
    assert "--model_path=" in bad.stderr.strip().splitlines()[-1]
