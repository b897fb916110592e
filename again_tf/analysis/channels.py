"""Channel-wise activations of natural and adversarial inputs (the CAS and CIFS figures).

Bai et al., "Improving Adversarial Robustness via Channel-wise Activation Suppressing"
(CAS, ICLR 2021) and Yan et al., "CIFS: Improving Adversarial Robustness of CNNs via
Channel-wise Importance-based Feature Selection" (ICML 2021) look at a late layer's
channels: the mean magnitude of each channel, with channels sorted by their natural
magnitude, is higher and spread over more channels for adversarial inputs than for
natural ones; and per class, adversarial inputs switch on channels that natural inputs of
that class rarely use. This module measures both:

    acts = channels.channel_activations(model, x)                      # (N, C)
    result = channels.natural_vs_adversarial(model, x, y, attacks.PGD(model, eps=0.1))
    freq = channels.channel_frequency(acts, y, num_classes=10, top_k=8)  # (10, C)
    active = channels.active_frequency(acts, y, num_classes=10)  # the CAS script's rule
    channels.channels_for_share(result["natural"], 0.9)  # channels holding 90% of it

`benchmarks/channel_analysis.py` runs them on a saved model and draws the figures.
"""

import numpy as np
import tensorflow as tf

from again_tf.models.base import PENULTIMATE, Classifier

DEFAULT_BATCH_SIZE = 256


def _check_classifier(model):
    if not isinstance(model, Classifier):
        raise TypeError(f"Expected `model` to be an again_tf.models.Classifier (it needs named "
                        f"insertion points). Received: {type(model).__name__}")


def feature_map_at(model, x, point=PENULTIMATE):
    """The feature map at insertion point `point` (after any layer inserted there).

    `"penultimate"` is `model.feature_map(x)`; a block's point re-runs the normalizer, the
    stem and the blocks up to and including that block, each followed by its inserted
    layer (on the inference path: `training=False`, `labels=None`).

    Args:
        model: an `again_tf.models.Classifier`.
        x: images `(batch, height, width, channels)` in [0, 1].
        point: one of `model.points`. Default "penultimate".

    Returns: the `(batch, h, w, c)` feature map as a tensor.
    """
    _check_classifier(model)
    if point not in model.points:
        raise ValueError(f"Unknown `point` {point!r} for {type(model).__name__}. "
                         f"Expected one of: {', '.join(model.points)}")
    x = tf.convert_to_tensor(x, tf.float32)
    if point == PENULTIMATE:
        return model.feature_map(x, training=False)[0]
    aux = []
    h = model.stem(model.normalizer(x), training=False)
    for name, block in zip(model.block_names, model.blocks):
        h = model._insert(name, block(h, training=False), None, False, aux)
        if name == point:
            return h
    raise AssertionError(f"point {point!r} not reached")  # unreachable: checked above


def channel_activations(model, x, point=PENULTIMATE, batch_size=DEFAULT_BATCH_SIZE):
    """Per-example, per-channel mean absolute activation at `point`, shape `(N, C)`.

    The channel magnitude of CAS (Bai et al., ICLR 2021, Sec. 3) and CIFS (Yan et al.,
    ICML 2021, Sec. 3):  a[n, c] = 1/(H·W) Σ_{i,j} |f(x_n)[i, j, c]|, where f is the
    feature map at the insertion point (`feature_map_at`; for "penultimate", the map
    after the last block, the neck and any inserted layer, as the model uses it).

    Args:
        model: an `again_tf.models.Classifier`.
        x: images `(N, height, width, channels)` in [0, 1] (NumPy or tensor).
        point: one of `model.points`. Default "penultimate" (the late layer both papers
            plot).
        batch_size: images per forward pass. Default 256 (memory only; no effect on
            the result).

    Returns: float32 NumPy array `(N, C)`.

    Example:
        acts = channel_activations(model, x_test[:500])         # (500, C)
        acts1 = channel_activations(model, x_test[:500], "stage1")
    """
    _check_classifier(model)
    if int(batch_size) < 1:
        raise ValueError(f"Expected `batch_size` >= 1. Received: batch_size={batch_size}")
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"Expected `x` of shape (N, height, width, channels). "
                         f"Received: shape {x.shape}")
    out = []
    for start in range(0, len(x), int(batch_size)):
        h = feature_map_at(model, x[start:start + int(batch_size)], point)
        if len(h.shape) != 4:
            raise ValueError(f"The feature map at point {point!r} has shape {tuple(h.shape)}; "
                             f"expected (batch, height, width, channels)")
        out.append(tf.reduce_mean(tf.abs(tf.cast(h, tf.float32)), axis=(1, 2)).numpy())
    if not out:
        raise ValueError("Expected at least one image in `x`. Received: 0 images")
    return np.concatenate(out, 0)


def adversarial_examples(attack, x, y, batch_size=DEFAULT_BATCH_SIZE):
    """`attack(x, y)` batch by batch, as a float32 NumPy array like `x`."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    return np.concatenate([np.asarray(attack(x[i:i + batch_size], y[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)], 0)


def natural_vs_adversarial(model, x, y, attack, point=PENULTIMATE,
                           batch_size=DEFAULT_BATCH_SIZE):
    """Mean channel magnitudes of natural and adversarial inputs, sorted by the natural ones.

    The first figure of CAS (Bai et al., ICLR 2021, Fig. 1) and of CIFS (Yan et al.,
    ICML 2021, Fig. 1): m_nat[c] = mean_n a(x_n)[c] and m_adv[c] = mean_n a(x'_n)[c],
    with a = `channel_activations` and x' = attack(x, y), both listed in the order of
    decreasing m_nat (ties: lower channel index first). (CAS's official script divides a
    channel's summed activation by the number of examples where it is active, see
    `active_frequency`, and sorts the natural and adversarial bars each by itself; here
    both are means over all examples in one channel order.)

    Args:
        model: an `again_tf.models.Classifier`.
        x: natural images `(N, height, width, channels)` in [0, 1].
        y: their labels `(N,)`.
        attack: an attack bound to `model`, e.g. `again_tf.attacks.PGD(model, eps=0.1)`
            (called as `attack(x, y)`).
        point: the insertion point measured. Default "penultimate".
        batch_size: images per attack/forward batch. Default 256.

    Returns: a dict with "order" (channel indices, by decreasing natural magnitude),
    "natural" and "adversarial" (the mean magnitudes `(C,)` in that order),
    "natural_activations" and "adversarial_activations" (`(N, C)`, original channel
    order) and "x_adv" (the adversarial images).

    Example:
        r = natural_vs_adversarial(model, x, y, PGD(model, eps=0.1, step_size=0.025))
        plt.bar(range(len(r["order"])), r["adversarial"]); plt.bar(..., r["natural"])
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if len(y) != len(x):
        raise ValueError(f"Expected as many labels as images. Received: {len(x)} images, "
                         f"{len(y)} labels")
    x_adv = adversarial_examples(attack, x, y, batch_size)
    natural = channel_activations(model, x, point, batch_size)
    adversarial = channel_activations(model, x_adv, point, batch_size)
    m_nat, m_adv = natural.mean(0), adversarial.mean(0)
    order = np.argsort(-m_nat, kind="stable")
    return {"order": order, "natural": m_nat[order], "adversarial": m_adv[order],
            "natural_activations": natural, "adversarial_activations": adversarial,
            "x_adv": x_adv}


def default_top_k(num_channels):
    """A quarter of the channels, at least 1 (this library's choice; the papers plot
    frequencies without fixing a k that fits every width)."""
    return max(1, int(num_channels) // 4)


def _check_acts_labels(acts, y, num_classes):
    """(acts as float64 (N, C), labels as int64 (N,), num_classes) or a one-line error."""
    acts = np.asarray(acts, np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if acts.ndim != 2:
        raise ValueError(f"Expected `acts` of shape (N, C). Received: shape {acts.shape}")
    if len(y) != len(acts):
        raise ValueError(f"Expected one label per row of `acts`. Received: {len(acts)} rows, "
                         f"{len(y)} labels")
    num_classes = int(num_classes)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"Expected labels in [0, {num_classes}). Received: labels in "
                         f"[{y.min()}, {y.max()}]")
    return acts, y, num_classes


def _per_class_fraction(selected, y, num_classes):
    """Row k: the mean of `selected` (N, C) over the examples of class k (zeros if none)."""
    counts = np.zeros((num_classes, selected.shape[1]))
    np.add.at(counts, y, selected)
    per_class = np.bincount(y, minlength=num_classes).astype(np.float64)
    return counts / np.maximum(per_class, 1.0)[:, None]


def active_frequency(acts, y, num_classes, threshold=0.01):
    """Per class, the fraction of its examples in which channel c is active (the CAS code).

    The rule of CAS's official `ActivationAnalysis/freq_dis_resnet18_base.py` (Bai et al.,
    ICLR 2021, Fig. 2; github.com/bymavis/CAS_ICLR2021): channel c is active in example n
    when its spatially averaged activation exceeds `threshold` times the example's largest
    one, a_n[c] > threshold · max_c′ a_n[c′] (strictly; 1e-2 there), and

        F[k, c] = |{n : y_n = k, c active in n}| / |{n : y_n = k}|.

    The official script counts (it plots the counts of class 0's test images); dividing
    by the class size gives the same bars on a [0, 1] scale. It averages the raw
    post-ReLU map; `channel_activations` averages |f|, the same on a non-negative map.
    An example whose largest activation is ≤ 0 has no active channel; a class with no
    example gets a row of zeros.

    Args:
        acts: channel magnitudes `(N, C)` (`channel_activations`).
        y: labels `(N,)` in [0, num_classes).
        num_classes: number of rows.
        threshold: the fraction of the example's largest activation, in [0, 1). Default
            0.01 (official).

    Returns: float NumPy array `(num_classes, C)` in [0, 1].

    Example:
        freq = active_frequency(acts, y, 10)   # freq[3, c]: share of class 3 with c on
    """
    acts, y, num_classes = _check_acts_labels(acts, y, num_classes)
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"Expected `threshold` in [0, 1). Received: threshold={threshold}")
    largest = acts.max(axis=1, keepdims=True) if acts.shape[1] else np.zeros((len(acts), 1))
    selected = (acts > float(threshold) * largest) & (largest > 0)
    return _per_class_fraction(selected.astype(np.float64), y, num_classes)


def channel_frequency(acts, y, num_classes, top_k=None):
    """Per class, the fraction of its examples whose top-k activated channels include c.

    The per-class channel-importance frequency of CAS (Bai et al., ICLR 2021, Fig. 2) and
    CIFS (Yan et al., ICML 2021), with a top-k rule of this library's choosing:
    F[k, c] = |{n : y_n = k, c ∈ topk(a_n)}| / |{n : y_n = k}|, where topk(a_n) are the
    `top_k` channels of largest a_n[c] (ties: lower channel index first). Each row sums
    to `top_k`; a class with no example gets a row of zeros. CAS's official script counts
    a channel when it is above 1 % of the example's largest activation instead
    (`active_frequency`); top-k keeps the number of counted channels fixed, so the maps
    of differently wide models and of natural and adversarial inputs compare directly.

    Args:
        acts: channel magnitudes `(N, C)` (`channel_activations`).
        y: labels `(N,)` in [0, num_classes).
        num_classes: number of rows.
        top_k: channels counted per example, in [1, C]. Default None: `default_top_k(C)`,
            a quarter of the channels.

    Returns: float NumPy array `(num_classes, C)` in [0, 1].

    Example:
        freq = channel_frequency(acts, y, 10, top_k=16)   # freq[3, c]: class 3 uses c
    """
    acts, y, num_classes = _check_acts_labels(acts, y, num_classes)
    channels = acts.shape[1]
    k = default_top_k(channels) if top_k is None else int(top_k)
    if not 1 <= k <= channels:
        raise ValueError(f"Expected `top_k` in [1, {channels}] (the channel count). "
                         f"Received: top_k={top_k}")
    top = np.argsort(-acts, axis=1, kind="stable")[:, :k]
    selected = np.zeros(acts.shape, np.float64)
    np.put_along_axis(selected, top, 1.0, axis=1)
    return _per_class_fraction(selected, y, num_classes)


def channels_for_share(magnitudes, share=0.9):
    """How many of the largest channels hold `share` of the total magnitude.

    The smallest m with Σ_{i<m} s_i ≥ share · Σ_i s_i, where s is `magnitudes` sorted in
    decreasing order; a small m means few channels carry the activation (natural inputs in
    CAS, Bai et al., ICLR 2021), a large one that it is spread out (adversarial inputs).

    Args:
        magnitudes: non-negative mean channel magnitudes `(C,)`.
        share: the fraction of the total, in (0, 1]. Default 0.9.

    Example:
        channels_for_share(np.array([5.0, 3.0, 1.0, 1.0]), 0.8)   # -> 2
    """
    s = np.sort(np.asarray(magnitudes, np.float64).reshape(-1))[::-1]
    if not 0.0 < float(share) <= 1.0:
        raise ValueError(f"Expected `share` in (0, 1]. Received: share={share}")
    if s.size == 0 or s.sum() <= 0:
        return 0
    cumulative = np.cumsum(s)
    # tolerance: float rounding must not push share=1.0 past the last channel
    return int(min(np.searchsorted(cumulative, share * cumulative[-1] * (1 - 1e-12)) + 1,
                   s.size))
