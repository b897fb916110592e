"""Attribution maps of a classifier and their span (the figure of merit of AGAIN).

Yin et al., "AGAIN: Adversarial Training with Attribution Span Enlargement and Hybrid
Feature Fusion" (CVPR 2023) argue that adversarial training generalizes better when the
model's attribution covers more of the input. This module computes per-pixel attribution
maps of the true (or predicted) class logit and measures how spread out they are:

    g = attribution.input_gradient(model, x, y)             # (N, H, W)
    ig = attribution.integrated_gradients(model, x, y)      # (N, H, W), signed
    spans = attribution.attribution_span(ig, share=0.9)     # (N,), in (0, 1]
    attribution.mean_span(ig, share=0.9)

`benchmarks/attribution_span.py` compares saved models with it.
"""

import numpy as np
import tensorflow as tf

from again_tf.models.base import forward

DEFAULT_BATCH_SIZE = 128


def _labels(model, x, y, batch_size):
    if y is not None:
        y = np.asarray(y).astype(np.int64).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"Expected one label per image in `y` ({x.shape[0]}). "
                             f"Received: y with {y.shape[0]} entries")
        return y
    logits = [np.asarray(forward(model, x[i:i + batch_size], training=False)["logits"])
              for i in range(0, len(x), batch_size)]
    return np.concatenate(logits).argmax(1).astype(np.int64)


def _check(x, batch_size):
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"Expected `x` of shape (N, H, W, C). Received: shape {x.shape}")
    if int(batch_size) < 1:
        raise ValueError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    return x


def _class_logit(model, x, y):
    logits = forward(model, x, training=False)["logits"]
    return tf.gather(tf.cast(logits, tf.float32), y, axis=1, batch_dims=1)


def input_gradient(model, x, y=None, batch_size=DEFAULT_BATCH_SIZE):
    """Saliency map: |∂ logit_y / ∂x| summed over the channels, per image.

    Simonyan et al., "Deep Inside Convolutional Networks" (ICLR workshop 2014), applied to
    the class *logit* (not the softmax probability or the loss):

        S[n, i, j] = Σ_c |∂ z_y(x_n) / ∂x_n[i, j, c]|,   z = model logits (inference mode).

    Args:
        model: any Keras classifier of [0, 1] images (run with
            `again_tf.models.forward(model, x)["logits"]`, `training=False`).
        x: images `(N, H, W, C)` in [0, 1].
        y: class per image `(N,)`. Default None: the model's predicted class.
        batch_size: images per gradient pass. Default 128 (memory only).

    Returns: float32 NumPy array `(N, H, W)`, non-negative.

    Example:
        maps = input_gradient(model, x_test[:100], y_test[:100])
    """
    x = _check(x, batch_size)
    y = _labels(model, x, y, batch_size)
    spec = (tf.TensorSpec((None,) + x.shape[1:], tf.float32), tf.TensorSpec((None,), tf.int64))

    @tf.function(input_signature=spec)
    def grad(xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            z = _class_logit(model, xb, yb)
        return tf.reduce_sum(tf.abs(tape.gradient(z, xb)), axis=-1)

    return np.concatenate([grad(x[i:i + batch_size], y[i:i + batch_size]).numpy()
                           for i in range(0, len(x), batch_size)])


def integrated_gradients(model, x, y=None, baseline=None, steps=32,
                         batch_size=DEFAULT_BATCH_SIZE):
    """Integrated Gradients of the class logit, summed over the channels (signed).

    Sundararajan et al., "Axiomatic Attribution for Deep Networks" (ICML 2017), Eq. 3
    (right Riemann sum):

        IG[n, i, j] = Σ_c (x − x′)[i, j, c] · (1/m) Σ_{k=1..m} ∂z_y(x′ + k/m·(x − x′)) / ∂x[i, j, c]

    By completeness, Σ_{i,j} IG ≈ z_y(x) − z_y(x′). The map is signed; take its absolute
    value for a saliency picture (`attribution_span` does).

    Args:
        model: any Keras classifier of [0, 1] images (inference mode, see `input_gradient`).
        x: images `(N, H, W, C)` in [0, 1].
        y: class per image `(N,)`. Default None: the model's predicted class.
        baseline: x′, an array broadcastable to `x`. Default None: the black image (zeros),
            the paper's choice for images.
        steps: m, points of the Riemann sum. Default 32 (the paper finds 20-300 enough).
        batch_size: images per pass (each pass runs `steps` gradients). Default 128.

    Returns: float32 NumPy array `(N, H, W)`.

    Example:
        ig = integrated_gradients(model, x_test[:100], y_test[:100], steps=64)
    """
    x = _check(x, batch_size)
    if int(steps) < 1:
        raise ValueError(f"Expected `steps` >= 1. Received: steps={steps}")
    steps = int(steps)
    y = _labels(model, x, y, batch_size)
    base = np.zeros_like(x) if baseline is None else np.asarray(baseline, np.float32)
    try:
        base = np.ascontiguousarray(np.broadcast_to(base, x.shape))
    except ValueError:
        raise ValueError(f"Expected `baseline` broadcastable to x's shape {x.shape}. "
                         f"Received: shape {base.shape}") from None
    image = tf.TensorSpec((None,) + x.shape[1:], tf.float32)

    @tf.function(input_signature=(image, image, tf.TensorSpec((None,), tf.int64)))
    def ig(xb, bb, yb):
        diff = xb - bb

        def body(k, total):
            point = bb + tf.cast(k, tf.float32) / steps * diff
            with tf.GradientTape() as tape:
                tape.watch(point)
                z = _class_logit(model, point, yb)
            return k + 1, total + tape.gradient(z, point)

        _, total = tf.while_loop(lambda k, _: k <= steps, body,
                                 (tf.constant(1), tf.zeros_like(xb)))
        return tf.reduce_sum(diff * total / steps, axis=-1)

    return np.concatenate([
        ig(x[i:i + batch_size], base[i:i + batch_size], y[i:i + batch_size]).numpy()
        for i in range(0, len(x), batch_size)])


def attribution_span(maps, share=0.9):
    """Fraction of the pixels needed to hold `share` of each map's total |attribution|.

    Our figure of merit for AGAIN's claim (Yin et al., CVPR 2023): the larger the span,
    the more of the input the attribution is spread over. Per map a:

        v = sort(|a|.flatten(), descending),   k = min{k : Σ_{t≤k} v_t ≥ share · Σ_t v_t}
        span = k / (H·W)

    A one-hot map has span 1/(H·W); a uniform map has span ⌈share·H·W⌉/(H·W) ≈ share; an
    all-zero map has span 0.

    Args:
        maps: attribution maps `(N, H, W)` (or `(N, ...)`; every non-batch axis is a pixel).
        share: fraction of the total absolute attribution, in (0, 1]. Default 0.9.

    Returns: float32 NumPy array `(N,)` in [0, 1].

    Example:
        spans = attribution_span(input_gradient(model, x, y), share=0.5)
    """
    if not 0.0 < float(share) <= 1.0:
        raise ValueError(f"Expected `share` in (0, 1]. Received: share={share}")
    a = np.abs(np.asarray(maps, np.float64))
    if a.ndim < 2:
        raise ValueError(f"Expected `maps` of shape (N, H, W). Received: shape {a.shape}")
    a = a.reshape(a.shape[0], -1)
    v = -np.sort(-a, axis=1)
    cum = np.cumsum(v, axis=1)
    total = cum[:, -1:]
    # the relative slack keeps float rounding from adding a pixel on exact ties
    count = np.minimum((cum < share * total * (1.0 - 1e-9)).sum(axis=1) + 1, a.shape[1])
    span = np.where(total[:, 0] > 0, count / a.shape[1], 0.0)
    return span.astype(np.float32)


def mean_span(maps, share=0.9):
    """Mean of `attribution_span(maps, share)` over the images, as a Python float."""
    return float(attribution_span(maps, share).mean())
