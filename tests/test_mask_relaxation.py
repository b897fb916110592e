"""The attack through the mask choice: straight-through softmax relaxation of the argmax."""

import numpy as np
import pytest
import tensorflow as tf

from again_tf import evaluation, layers, models
from again_tf.attacks import objectives


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_straight_through(h, kernel, bias, weights, temperature):
    """Value and input gradient of sum(weights * h ⊙ mask) with the relaxed mask, in NumPy.

    The straight-through mask is hard(h0) + soft(h) − soft(h0) frozen at h0: its value is
    the hard argmax mask, its derivative that of soft(h) = softmax(GAP(h) W + b / T) Wᵀ.
    The gradient is taken by central finite differences in float64.
    """
    h0 = h.astype(np.float64)
    k, b, r = kernel.astype(np.float64), bias.astype(np.float64), weights.astype(np.float64)

    def logits(x):
        return x.mean(axis=(1, 2)) @ k + b

    hard = k.T[np.argmax(logits(h0), -1)]
    soft0 = softmax(logits(h0) / temperature) @ k.T

    def f(x):
        mask = hard + softmax(logits(x) / temperature) @ k.T - soft0
        return np.sum(r * x * mask[:, None, None, :])

    grad = np.zeros_like(h0)
    step = 1e-6
    for idx in np.ndindex(*h0.shape):
        plus, minus = h0.copy(), h0.copy()
        plus[idx] += step
        minus[idx] -= step
        grad[idx] = (f(plus) - f(minus)) / (2 * step)
    return h0 * hard[:, None, None, :], grad


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_relaxed_mask_keeps_the_value_and_takes_the_softmax_gradient(temperature):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    weights = rng.normal(size=h.shape).astype(np.float32)
    layer = layers.ChannelActivationSuppressing(4)
    layer.build(h.shape)
    layer.kernel.assign(rng.normal(size=(5, 4)).astype(np.float32))
    layer.bias.assign(rng.normal(size=(4,)).astype(np.float32))

    x = tf.constant(h)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        hard_out, _ = layer(x)
        relaxed_out, _ = layer(x, relax=temperature)
        hard_loss = tf.reduce_sum(weights * hard_out)
        relaxed_loss = tf.reduce_sum(weights * relaxed_out)
    value, grad = numpy_straight_through(h, layer.kernel.numpy(), layer.bias.numpy(),
                                         weights, temperature)
    np.testing.assert_allclose(relaxed_out.numpy(), value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hard_out.numpy(), value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(relaxed_loss, x).numpy(), grad, rtol=1e-3,
                               atol=1e-4)
    # Without relaxation the choice gets no gradient: only the masked-input term remains.
    hard_grad = tape.gradient(hard_loss, x).numpy()
    assert not np.allclose(hard_grad, grad, atol=1e-4)


def test_relaxation_reaches_inserted_sequences_and_classifiers():
    """forward(..., relax_masks=T) changes the input gradient, never the logits."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(size=(4, 8, 8, 1)).astype(np.float32))
    y = tf.constant([0, 1, 2, 0])
    point = layers.InsertedSequence([layers.HybridFeatureFusion(),
                                     layers.AttributionSpanEnlargement(3)])
    model = models.SmallCNN(3, width=4, hidden=8, inserts={"penultimate": point})
    model.build((None, 8, 8, 1))
    plain = objectives.objective_fn(model, "main")
    relaxed = objectives.objective_fn(model, "main", relax_masks=1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = plain(x, y), relaxed(x, y)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert not np.allclose(tape.gradient(a, x).numpy(), tape.gradient(b, x).numpy())


def test_relaxed_objectives_are_registered_for_evaluation():
    for name in ("main_relaxed", "combined_relaxed"):
        assert name in evaluation.OBJECTIVES and name in evaluation.loss_modes()
