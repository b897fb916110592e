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


def _sorted_logits(logits):
    """Logits sorted in ascending order along the class axis (z_π1 is the last column)."""
    return tf.sort(tf.cast(logits, tf.float32), axis=-1, direction="ASCENDING")


def dlr(logits, labels):
    """Difference of Logits Ratio (Croce & Hein, ICML 2020), to be maximized.

    DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12), where π sorts the logits
    in decreasing order. Invariant to shifting and rescaling the logits, so it does not
    saturate the way cross-entropy does on over-confident models. Needs ≥ 3 classes.
    """
    logits = tf.cast(logits, tf.float32)
    z_sorted = _sorted_logits(logits)
    true = tf.gather(logits, tf.cast(labels, tf.int32), axis=-1, batch_dims=1)
    return -(true - other_max(logits, labels)) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def targeted_dlr(logits, labels, targets):
    """Targeted DLR loss of APGD-T (Croce & Hein, ICML 2020), to be maximized.

    DLR_t(z, y, t) = −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12). Needs ≥ 4 classes.
    Maximizing it pushes the target logit z_t above the true logit z_y.
    """
    logits = tf.cast(logits, tf.float32)
    z_sorted = _sorted_logits(logits)
    true = tf.gather(logits, tf.cast(labels, tf.int32), axis=-1, batch_dims=1)
    target = tf.gather(logits, tf.cast(targets, tf.int32), axis=-1, batch_dims=1)
    scale = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
    return -(true - target) / scale


def margin(logits, labels):
    """z_y − max_{i≠y} z_i: positive while the example is classified correctly.

    The margin the Square attack (Andriushchenko et al., ECCV 2020) minimizes.
    """
    logits = tf.cast(logits, tf.float32)
    true = tf.gather(logits, tf.cast(labels, tf.int32), axis=-1, batch_dims=1)
    return true - other_max(logits, labels)


def temperature_cross_entropy(logits, labels, temperature=1.0):
    """Cross-entropy of the temperature-scaled confidence, −log softmax(z / T)_y.

    The loss of Temperature-PGD (Tian et al., "Analysis and Applications of Class-wise
    Robustness in Adversarial Training", KDD 2021). T = 1 is the plain cross-entropy.
    """
    return cross_entropy(tf.cast(logits, tf.float32) / temperature, labels)


LOSSES["dlr"] = dlr
