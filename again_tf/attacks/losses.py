"""Per-example losses that attacks maximize (untargeted) or minimize (targeted).

Each takes logits `(batch, classes)` and integer labels `(batch,)` and returns `(batch,)`.
Per-example (not averaged) so that one example's gradient does not depend on the batch.
"""

import tensorflow as tf


def cross_entropy(logits, labels):
    """Softmax cross-entropy, -log softmax(z)_y."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def other_max(logits, labels):
    """max_{k != y} z_k: the largest logit among the classes other than the label."""
    logits = tf.cast(logits, tf.float32)
    is_label = tf.equal(tf.range(tf.shape(logits)[-1])[None, :],
                        tf.cast(labels, tf.int32)[:, None])
    return tf.reduce_max(tf.where(is_label, tf.constant(-float("inf")), logits), axis=-1)


def cw_margin(logits, labels, confidence=50.0):
    """Carlini-Wagner margin, min(max_{k != y} z_k - z_y, confidence).

    Positive once the example is misclassified. The cap `confidence` (50, as in the
    C&W-inf evaluations of the TRADES/MART code) stops the attack from pushing an
    already misclassified example further; it does not change the attack's direction
    before that.
    """
    logits = tf.cast(logits, tf.float32)
    true = tf.gather(logits, tf.cast(labels, tf.int32), axis=-1, batch_dims=1)
    return tf.minimum(other_max(logits, labels) - true, confidence)


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def get(name):
    """Returns the loss called `name` ("ce" or "cw"), or `name` itself if callable."""
    if callable(name):
        return name
    if name not in LOSSES:
        raise ValueError(f"Unknown attack loss {name!r}. Expected one of: {', '.join(LOSSES)}")
    return LOSSES[name]
