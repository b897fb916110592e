"""BAT: weights, normalization and discrimination loss against NumPy; the index plumbing
through train_step, fit and train.py (the global weight sum under MirroredStrategy:
tests/test_distribution.py)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import models
from again_tf.defenses import BAT, AdversarialModel, registry
from again_tf.defenses.bat import benign_weights, discrimination_loss
from again_tf.models.base import Classifier
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(Classifier):
    """A Classifier without BatchNorm: its training-mode outputs do not depend on state."""

    def __init__(self, num_classes=3, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.stem = keras.layers.Conv2D(4, 3, activation="relu", name="stem")
        self.blocks, self.block_names, self.neck = [], (), None
        self.pool = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(8, "relu")],
                                     name="pool")
        self.fc = keras.layers.Dense(num_classes, name="fc")


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_weights(logits, y, mem, alpha, t):
    p = softmax(logits)
    w = np.ones(len(y))
    for i in range(len(y)):
        q = max(p[i, k] for k in range(logits.shape[1]) if k != y[i])
        if mem[i] > t and np.argmax(logits[i]) != y[i]:
            w[i] = np.exp(-alpha * q)
    return w


def np_dl(h, y, typical, tau, normalize, include_positive):
    if normalize:
        h = h / np.linalg.norm(h, axis=1, keepdims=True)
    s = h @ h.T / tau
    losses = []
    for i in range(len(y)):
        if not typical[i]:
            continue
        pos = [j for j in range(len(y)) if j != i and typical[j] and y[j] == y[i]]
        neg = [b for b in range(len(y)) if typical[b] and y[b] != y[i]]
        if not pos or not neg:
            continue
        terms = []
        for j in pos:
            denom = np.exp(s[i, neg]).sum() + (np.exp(s[i, j]) if include_positive else 0.0)
            terms.append(-np.log(np.exp(s[i, j]) / denom))
        losses.append(np.mean(terms))
    return float(np.mean(losses)) if losses else 0.0


LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 1.5, 0.2], [0.0, 0.0, 3.0], [2.0, 1.0, 0.5],
                   [-0.5, 0.3, 0.2], [3.0, -2.0, 1.0]], np.float32)
LABELS = np.array([0, 0, 1, 1, 2, 2])
MEM = np.array([0.5, 0.9, 0.1, 0.16, np.nan, 0.3], np.float32)


@pytest.mark.parametrize("alpha,t", [(2.0, 0.15), (1.0, 0.2)])
def test_benign_weights_match_numpy(alpha, t):
    w = benign_weights(LOGITS, LABELS, MEM, alpha, t).numpy()
    np.testing.assert_allclose(w, np_weights(LOGITS, LABELS, MEM, alpha, t), rtol=1e-6)
    # Down-weighted: the atypical misclassified examples only (1, 3 at t = 0.15; 5 always).
    assert (w < 1).tolist() == [False, True, False, t < 0.16, False, True]


@pytest.mark.parametrize("normalize,include_positive,tau", [(True, True, 0.1),
                                                            (True, False, 0.5),
                                                            (False, True, 1.0)])
def test_discrimination_loss_matches_numpy(normalize, include_positive, tau):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(10, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2, 1])
    typical = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    got = float(discrimination_loss(h, y, typical, tau, normalize, include_positive))
    want = np_dl(h.astype(np.float64), y, typical, tau, normalize, include_positive)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_discrimination_loss_without_pairs_is_zero_with_finite_gradient():
    h = tf.Variable(np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32))
    with tf.GradientTape() as tape:  # no typical pair of the same class: no anchor
        loss = discrimination_loss(h, np.array([0, 1, 2, 2]), np.array([1, 1, 1, 0], bool))
    grad = tape.gradient(loss, h)
    assert float(loss) == 0.0 and np.isfinite(grad.numpy()).all()


def test_bat_loss_is_weighted_mean_plus_beta_dl():
    """mean_i of BAT's per-example vector = Σ w_i CE_i / Σ w_i + β·L_DL, from the same pass."""
    keras.utils.set_random_seed(0)
    net = TinyNet(3)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(12, 6, 6, 1)).astype(np.float32)
    y = np.array([0, 1, 2] * 4)
    scores = rng.choice([0.0, 0.05, 0.5, 0.9], size=40).astype(np.float32)
    index = rng.permutation(40)[:12]
    bat = BAT(memorization_scores=scores, alpha=2.0, beta=0.7, threshold=0.15)
    per_example, logits = bat.loss(net, x, x, y, index=index)
    out = net.forward(x, training=True)
    z, h = out["logits"].numpy().astype(np.float64), out["features"].numpy().astype(np.float64)
    mem = scores[index]
    w = np_weights(z, y, mem, 2.0, 0.15)
    ce = -np.log(softmax(z)[np.arange(12), y])
    want = (w * ce).sum() / w.sum() + 0.7 * np_dl(h, y, mem < 0.15, 0.1, True, True)
    assert w.min() < 1  # the weights do something here
    np.testing.assert_allclose(float(np.mean(per_example)), want, rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), z, rtol=1e-5, atol=1e-6)


def test_arguments_errors_and_config():
    with pytest.raises(ValueError, match="memorization_scores"):
        BAT()
    with pytest.raises(ValueError, match="temperature"):
        BAT(num_examples=3, temperature=0)
    with pytest.raises(ValueError, match="normalize_features"):
        BAT(num_examples=3, normalize_features="maybe")
    bat = BAT(num_examples=5, alpha=1.0, beta=0.0, include_positive="false")
    config = bat.get_config()
    clone = BAT.from_config(config)
    assert clone.get_config() == config and clone.scores.shape == (5,)
    assert registry.needs("bat", "uses_index") and not registry.needs("pgd_at", "uses_index")


def one_batch_loss(adv, x, y, index):
    """The loss train_step logs for one full batch with a frozen model (SGD lr 0)."""
    adv.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=False)
    ds = tf.data.Dataset.from_tensor_slices((x, y, index)).batch(len(y))
    return adv.fit(ds, epochs=1, verbose=0).history["loss"][0]


def test_train_step_reads_the_third_element_as_an_index():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(16, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    index = np.arange(16)
    scores = np.where(np.arange(16) < 8, 0.9, 0.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    adv = AdversarialModel(TinyNet(3), defense="bat", memorization_scores=scores, eps=0.1,
                           step_size=0.05, steps=2, eval_steps=0)
    adv.attack.random_start = "none"
    logged = one_batch_loss(adv, x, y, index)
    x_adv = adv.attack.perturb(tf.constant(x), tf.constant(y),
                               adv.objective.attack_loss(adv.model, x, y))
    expected = float(np.mean(adv.objective.loss(adv.model, x, x_adv, y, index=index)[0]))
    np.testing.assert_allclose(logged, expected, rtol=1e-5)
    # Other indices, other scores, another loss: the index really selects the scores.
    shifted = one_batch_loss(adv, x, y, (index + 8) % 16)
    assert abs(shifted - logged) > 1e-4
    with pytest.raises(ValueError, match=r"needs \(x, y, index\) batches"):
        adv.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_fit_trains_with_indexed_data_and_plain_arrays():
    keras.utils.set_random_seed(0)
    net = models.SmallCNN(3, width=2, hidden=8)
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    adv = AdversarialModel(net, defense="bat", memorization_scores=rng.uniform(-0.2, 0.6, 32),
                           eps=0.1, steps=2, eval_steps=2)
    adv.compile(optimizer=keras.optimizers.Adam(1e-2))
    adv.build((None, 8, 8, 1))
    start = [v.numpy() for v in net.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((x, y, np.arange(32))).shuffle(32).batch(8)
    history = adv.fit(ds, epochs=2, verbose=0, validation_data=(x, y)).history
    assert np.isfinite(history["loss"]).all() and "val_robust_accuracy" in history
    assert all(np.abs(a - v.numpy()).max() > 0 for a, v in zip(start, net.trainable_variables))
    # Plain arrays: the index goes where Keras takes sample weights.
    history = adv.fit(x, y, sample_weight=np.arange(32), batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def train_py(*args):
    """train.py's command line, run in this process (test_training runs the real one)."""
    return run_main("train.py", "--epochs=1", "--train_size=512", "--val_size=128",
                    "--test_images=64", "--attack_steps=2", "--eval_steps=2",
                    "--model=small_cnn", "--width=4", "--verbose=0", *args)


def test_train_py_runs_bat_with_memorization_scores(tmp_path):
    scores = np.random.default_rng(0).uniform(-0.1, 0.6, 512).astype(np.float32)
    path = tmp_path / "mem.npy"
    np.save(path, scores)
    out = tmp_path / "run"
    run = train_py("--defense=bat", f"--memorization_scores={path}", f"--out_dir={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["defense"] == "bat" and 0.0 <= result["pgd20"] <= result["clean"] <= 1.0
    assert (out / "model.keras").exists()
    assert json.loads((out / "run.json").read_text())["memorization_scores"] == str(path)
    # Missing or too few scores: one line naming the flag, nothing written.
    run = train_py("--defense=bat", f"--out_dir={tmp_path / 'a'}")
    assert run.returncode != 0 and "--memorization_scores" in run.stderr
    np.save(tmp_path / "short.npy", scores[:100])
    run = train_py("--defense=bat", f"--memorization_scores={tmp_path / 'short.npy'}",
                   f"--out_dir={tmp_path / 'b'}")
    assert run.returncode != 0 and "expected at least 384" in run.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
