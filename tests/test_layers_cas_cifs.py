"""Tests of the CAS and CIFS layers, their modifiers and the cas*/cifs defenses."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import layers, models
from again_tf.attacks import losses
from again_tf.defenses import AdversarialModel, registry
from again_tf.defenses.base import head_loss
from again_tf.defenses.cas import CAS
from again_tf.defenses.cifs import CIFS
from again_tf.models import forward
from helpers import served_in_fresh_process

N, H, W, C, K = 5, 3, 2, 6, 4
LABELS = np.array([2, 0, 3, 1, 2])


def features(seed=0):
    return np.random.default_rng(seed).uniform(0.5, 1.5, (N, H, W, C)).astype("float32")


def read_mask(h, out):
    ratio = np.asarray(out) / h
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :], ratio.shape),
                               rtol=1e-5, atol=1e-6)
    return ratio[:, 0, 0, :]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- CAS


@pytest.mark.parametrize("training,labels", [(True, LABELS), (False, LABELS), (False, None),
                                             (True, None)])
def test_cas_mask_is_the_label_column_in_training_and_the_predicted_one_otherwise(
        training, labels):
    layer = layers.ChannelActivationSuppressing(K)
    h = features()
    layer.build(h.shape)
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(C, K)).astype("float32"), rng.normal(size=K).astype("float32")
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    out, aux = layer(h, labels=labels, training=training)
    logits = h.mean(axis=(1, 2)) @ kernel + bias
    np.testing.assert_allclose(aux, logits, rtol=1e-5, atol=1e-5)
    chosen = LABELS if (training and labels is not None) else logits.argmax(-1)
    np.testing.assert_allclose(read_mask(h, out), kernel[:, chosen].T, atol=1e-5)


def test_cas_mask_is_not_detached():
    layer = layers.ChannelActivationSuppressing(K)
    h = tf.constant(features())
    layer.build(h.shape)
    with tf.GradientTape() as tape:
        out, _ = layer(h, labels=LABELS, training=True)
        total = tf.reduce_sum(out)
    grad = tape.gradient(total, layer.kernel).numpy()
    # d/dW[c, k] of Σ h ⊙ W[:, y] = Σ_{n: y_n = k} Σ_hw h[n, :, :, c]
    expected = np.zeros((C, K))
    for n, k in enumerate(LABELS):
        expected[:, k] += features()[n].sum(axis=(0, 1))
    np.testing.assert_allclose(grad, expected, rtol=1e-5)


# ---------------------------------------------------------------------------- CIFS


def np_probe(pooled, layer):
    """The probe on pooled features, in float64 NumPy."""
    p = pooled.astype(np.float64)
    if layer.hidden is not None:
        z = p @ np.asarray(layer.hidden.kernel, np.float64) + np.asarray(layer.hidden.bias)
        p = np.logaddexp(0.0, layer.softplus_beta * z) / layer.softplus_beta
    return p @ np.asarray(layer.logits.kernel, np.float64) + np.asarray(layer.logits.bias)


def np_importance(h, layer, first):
    """g = ∂s/∂pooled by central differences (= Σ_hw ∂s/∂f, the probe reading GAP(f))."""
    pooled = h.mean(axis=(1, 2)).astype(np.float64)
    second = np.argsort(-np_probe(pooled, layer), axis=-1)[:, 1]
    rows = np.arange(len(h))

    def score(p):
        z = np_probe(p, layer)
        return z[rows, first] + z[rows, second]  # per example: examples are independent

    grad = np.zeros_like(pooled)
    step = 1e-5
    for c in range(pooled.shape[1]):
        up, down = pooled.copy(), pooled.copy()
        up[:, c] += step
        down[:, c] -= step
        grad[:, c] = (score(up) - score(down)) / (2 * step)
    return grad


@pytest.mark.parametrize("hidden", [None, 7])
@pytest.mark.parametrize("training", [True, False])
def test_cifs_mask_is_softmax_of_finite_difference_importance(hidden, training):
    layer = layers.ChannelImportanceFeatureSelection(K, hidden_units=hidden, mask_scale=2.0)
    h = features(seed=3)
    layer.build(h.shape)
    out, aux = layer(h, labels=LABELS, training=training)
    logits = np_probe(h.mean(axis=(1, 2)), layer)
    np.testing.assert_allclose(aux, logits, rtol=1e-4, atol=1e-5)
    first = LABELS if training else logits.argmax(-1)
    g = np_importance(h, layer, first)
    np.testing.assert_allclose(layer.importance(tf.constant(h), LABELS, training), g,
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(read_mask(h, out), 2.0 * softmax(g), rtol=1e-3, atol=1e-5)


def test_cifs_linear_probe_importance_is_the_sum_of_two_kernel_columns():
    layer = layers.ChannelImportanceFeatureSelection(K)
    h = features(seed=4)
    layer.build(h.shape)
    kernel = np.asarray(layer.logits.kernel)
    logits = h.mean(axis=(1, 2)) @ kernel + np.asarray(layer.logits.bias)
    top = np.argsort(-logits, axis=-1)
    g = np.asarray(layer.importance(tf.constant(h), None, False))
    np.testing.assert_allclose(g, kernel[:, top[:, 0]].T + kernel[:, top[:, 1]].T, atol=1e-5)


def test_cifs_mask_is_second_order_in_the_probe_and_constant_in_the_input():
    layer = layers.ChannelImportanceFeatureSelection(K, hidden_units=5)
    h = tf.constant(features(seed=5))
    layer.build(h.shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(h)
        out, _ = layer(h, labels=LABELS, training=True)
        total = tf.reduce_sum(out)
    # Only the mask path reaches the probe (the aux logits are not in `total`): every
    # weight that shapes ∂s/∂f gets a gradient; the output bias, which does not, none.
    shaping = [layer.hidden.kernel, layer.hidden.bias, layer.logits.kernel]
    for g in tape.gradient(total, shaping):
        assert g is not None and np.abs(np.asarray(g)).sum() > 0
    bias_grad = tape.gradient(total, layer.logits.bias)
    assert bias_grad is None or not np.asarray(bias_grad).any()
    # No gradient reaches the input through the mask: d/dh Σ h ⊙ m = m.
    mask = np.asarray(layer.mask(h, LABELS, True))
    np.testing.assert_allclose(tape.gradient(total, h),
                               np.broadcast_to(mask[:, None, None, :], h.shape), rtol=1e-5)


def test_cifs_modifier_probes_points_and_loss_scale():
    small = models.SmallCNN(10, width=4, hidden=16)
    assert CIFS().inserts(small)["penultimate"].hidden_units == 128  # its one default point
    inserted = CIFS(points="stage1+penultimate").inserts(small)
    assert (inserted["stage1"].hidden_units, inserted["penultimate"].hidden_units) == (128, None)
    assert CIFS().inserts(models.WideResNet(16, 1))["stage3.block0"].hidden_units == 240
    assert list(CIFS().inserts(models.ResNet18(10))) == ["stage4.block0", "penultimate"]
    # [CE + (β/K) Σ CE_k] · 3/(β + 1): with β = 1 the example weight is 3/2.
    keras.utils.set_random_seed(0)
    adv = AdversarialModel(models.SmallCNN(10, width=4, hidden=16), defense="cifs",
                           eps=0.1, steps=1, eval_steps=0, aux_weight=1.0)
    adv.build((None, 28, 28, 1))
    x = tf.constant(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype("float32"))
    y = tf.constant([1, 2, 3, 4])
    loss, _ = adv.batch_loss(x, x, y)
    out = forward(adv.model, x, training=True, labels=y)
    expected = 1.5 * tf.reduce_mean(head_loss(out, y, losses.cross_entropy, 1.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="probe_hidden"):
        CIFS(probe_hidden=0)


def test_cas_modifier_points():
    assert list(CAS().inserts(models.ResNet18(10))) == ["stage4.block0", "penultimate"]
    assert list(CAS().inserts(models.PreActResNet18(10))) == ["stage4.block0", "penultimate"]
    assert list(CAS().inserts(models.SmallCNN(10))) == ["penultimate"]
    assert list(CAS(points=["stage2"]).inserts(models.SmallCNN(10))) == ["stage2"]


# ----------------------------------------------------------- saving and export


def test_cifs_and_cas_models_survive_keras_file_and_saved_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.SmallCNN(10, width=4, hidden=16, mean=(0.286,), std=(0.353,), inserts={
        "stage1": layers.ChannelActivationSuppressing(10),
        "penultimate": layers.ChannelImportanceFeatureSelection(10, hidden_units=8)})
    model.build((None, 28, 28, 1))
    config = model.inserts["penultimate"].get_config()
    assert layers.ChannelImportanceFeatureSelection.from_config(config).hidden_units == 8
    x = np.random.default_rng(1).uniform(size=(12, 28, 28, 1)).astype("float32")
    expected = np.asarray(model(x, training=False))
    path = str(tmp_path / "cifs.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x, training=False), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served_in_fresh_process(model, x, tmp_path), expected,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- the cas*/cifs names


@pytest.mark.parametrize("name", ["cas", "cas_trades", "cas_mart", "cifs"])
def test_defenses_train_and_reach_the_aux_heads(name):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).uniform(size=(16, 28, 28, 1)).astype("float32")
    y = np.arange(16) % 10
    adv = AdversarialModel(models.SmallCNN(10, width=4, hidden=16), defense=name, eps=0.1,
                           steps=2, eval_steps=0, points="stage1+penultimate")
    adv.build((None, 28, 28, 1))
    heads = [adv.model.inserts["stage1"], adv.model.inserts["penultimate"]]
    before = [[np.asarray(v).copy() for v in h.trainable_variables] for h in heads]
    adv.compile(optimizer=keras.optimizers.SGD(0.05))
    logs = adv.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1])
    for head, old in zip(heads, before):
        for v, o in zip(head.trainable_variables, old):
            assert not np.allclose(np.asarray(v), o), v.name  # gradient reached the head
    aux = forward(adv.model, x, training=False)["aux_logits"]
    assert len(aux) == 2 and all(np.isfinite(np.asarray(a)).all() for a in aux)


def test_cas_names_and_defaults():
    objective, modifiers = registry.get("cas_trades")
    assert (type(objective).__name__, objective.beta, objective.aux_weight) == ("TRADES", 4.0, 2.0)
    assert registry.get("cas_mart")[0].beta == 5.0
    assert registry.get("cas_mart", beta=6.0)[0].beta == 6.0
    assert [type(m).__name__ for m in registry.get("cifs")[1]] == ["CIFS"]
