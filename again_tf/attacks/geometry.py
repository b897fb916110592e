"""The geometry every attack shares: per-example norms, projections onto the threat model.

Images are batch-first tensors in [0, 1]; ε is in pixel units; `norm` is "linf" or "l2".
Two projections, because two bodies of official code write them differently and our
attacks follow each bit for bit: `project` (PGD and the training attacks: clip δ to
[−ε, ε] or scale it by min(1, ε/‖δ‖)) and `project_ball` (AutoAttack's APGD:
x + δ/‖δ‖ · min(ε, ‖δ‖)); both end clipped to [0, 1].
"""

import tensorflow as tf

TINY = 1e-12  # the official codes' guard against division by a zero norm


def per_example(v, like):
    """Reshapes a `(batch,)` vector to broadcast against `like` (batch, ...)."""
    return tf.reshape(v, tf.concat([tf.shape(v), tf.ones([tf.rank(like) - 1], tf.int32)], 0))


def batch_norm(t, norm):
    """Per-example L∞ or L2 norm of `t` (batch first), shape `(batch,)`."""
    flat = tf.reshape(t, (tf.shape(t)[0], -1))
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def l2_norm_keepdims(t):
    """Per-example L2 norm of `t`, shaped to broadcast against it: `(batch, 1, ..., 1)`."""
    return per_example(batch_norm(t, "l2"), t)


def normalize(t, norm):
    """`t / (‖t‖ + 1e-12)` per example, as in the official APGD code."""
    return t / per_example(batch_norm(t, norm) + TINY, t)


def project(x_adv, x, eps, norm):
    """Projects `x_adv` onto the ε-ball around `x` (L∞ or L2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta *= tf.minimum(1.0, eps / (l2_norm_keepdims(delta) + TINY))
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def project_ball(x_adv, x, eps, norm):
    """AutoAttack's projection: onto the ε-ball around `x`, then clipped to [0, 1].

    L∞: clip to [x − ε, x + ε]; L2: `x + δ/‖δ‖ · min(ε, ‖δ‖)` (δ = x_adv − x).
    """
    if norm == "linf":
        return tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)
    delta = x_adv - x
    length = per_example(batch_norm(delta, "l2"), delta)
    return tf.clip_by_value(x + delta / (length + TINY) * tf.minimum(eps, length), 0.0, 1.0)
