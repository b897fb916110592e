"""Benign adversarial training (BAT, Xu et al. 2021): memorization-aware PGD-AT.

Each training example carries its index into the training split; the defense looks up
the example's memorization score mem(x_i) (Feldman & Zhang 2020, see
`again_tf.analysis.memorization`) in a non-trainable variable it holds, and

- down-weights atypical examples (mem > t) that the model misclassifies after the attack,
  the more the more confidently it prefers a wrong class;
- adds a discrimination loss that pulls together the penultimate features of typical
  examples (mem < t) of a class and pushes them away from other classes' typical ones.

How the index reaches the loss: batches are `(x, y, index)` (`again_tf.data.load(...,
with_index=True)` gives them; `train.py --defense=bat --memorization_scores=path` loads
the data that way). Keras would read a third element as a sample weight; `BAT.uses_index`
tells `AdversarialModel.train_step` that it is an index instead, and the model hands it
to `BAT.loss(..., index=index)`. Every other defense keeps `(x, y[, sample_weight])`.
"""

import keras
import numpy as np
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.heads import head_loss
from again_tf.defenses.pgd_at import PGDAT

# Stands in for −∞ in masked log-sum-exps, so that no inf or NaN reaches a gradient.
_NEG = -1e9


def benign_weights(logits, labels, memorization, alpha=2.0, threshold=0.15):
    """BAT's per-example weights, `(batch,)`, held constant (no gradient flows through them).

        w_i = exp(−α · q(x_i)) if mem(x_i) > t and argmax_k F_k(x_i) ≠ y_i, else 1,
        q(x_i) = max_{k ≠ y_i} softmax(F(x_i))_k,

    with F(x_i) the logits of the (adversarial) training input. A NaN score (an example
    the estimate could not score) is neither above nor below t: weight 1.

    Args:
        logits: `(batch, classes)` logits F(x^adv).
        labels: `(batch,)` integer labels y.
        memorization: `(batch,)` scores mem(x_i).
        alpha: α. Default 2.0 (see `BAT`).
        threshold: t. Default 0.15 (the paper's).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    probs = tf.nn.softmax(logits, axis=-1)
    true = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    q = tf.reduce_max(tf.where(true, -1.0, probs), axis=-1)
    wrong = tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
    atypical = tf.cast(memorization, tf.float32) > threshold
    weights = tf.where(atypical & wrong, tf.exp(-alpha * q), 1.0)
    return tf.stop_gradient(weights)


def discrimination_loss(features, labels, typical, temperature=0.1, normalize=True,
                        include_positive=True):
    """BAT's discrimination loss L_DL over the typical examples of a batch (a scalar).

    For each typical anchor i with at least one typical positive j (same class, j ≠ i)
    and one typical negative b (another class), with s_ij = h_i·h_j / τ:

        ℓ_ij = −log( exp(s_ij) / (exp(s_ij) + Σ_b exp(s_ib)) )    (include_positive)
        ℓ_ij = −log( exp(s_ij) / Σ_b exp(s_ib) )                   (otherwise)

    ℓ_i is the mean of ℓ_ij over i's positives and L_DL the mean of ℓ_i over those
    anchors (0 when the batch has none).

    The paper's form (Xu et al. 2021, the discrimination loss as written) is
    `normalize=False, include_positive=False`: raw features, s_ij = h_i·h_j/τ, and only
    the negatives in the denominator. Our defaults differ on purpose: including the
    positive (the InfoNCE / supervised-contrastive form, Khosla et al. 2020) keeps ℓ ≥ 0
    and makes it a log-softmax, and unit-norm h bound the similarities by 1/τ. The paper's
    form is unbounded below on raw features: with h scaled by c, ℓ_ij ≈ c²·(max_b s_ib −
    s_ij) for large c, so an anchor whose positive beats all its negatives drives L_DL to
    −∞ as ‖h‖ grows. The official code, linked from the paper at anonymous.4open.science and
    not on GitHub, was not available to us, so τ's value is not known either.

    Args:
        features: `(batch, dim)` penultimate features h.
        labels: `(batch,)` integer labels.
        typical: `(batch,)` bool, which examples are typical (mem < t).
        temperature: τ > 0. Default 0.1 (our choice: the supervised-contrastive default
            for unit-norm features; the BAT paper's value is not in our sources).
        normalize: L2-normalize h first (cosine similarities). Default True (ours; the
            paper: False).
        include_positive: whether the positive is in the denominator. Default True (ours;
            the paper: False).
    """
    h = tf.cast(features, tf.float32)
    if normalize:
        h = tf.math.l2_normalize(h, axis=-1)
    sim = tf.matmul(h, h, transpose_b=True) / temperature
    labels = tf.reshape(labels, [-1])
    typical = tf.cast(tf.reshape(typical, [-1]), tf.bool)
    both = typical[:, None] & typical[None, :]
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.cast(tf.eye(tf.shape(sim)[0]), tf.bool)
    positive = both & same & ~eye
    negative = both & ~same
    neg_lse = tf.reduce_logsumexp(tf.where(negative, sim, _NEG), axis=1, keepdims=True)
    if include_positive:
        denominator = tf.reduce_logsumexp(
            tf.stack([sim, tf.broadcast_to(neg_lse, tf.shape(sim))]), axis=0)
    else:
        denominator = neg_lse
    pair = tf.where(positive, denominator - sim, 0.0)
    n_pos = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
    has_neg = tf.reduce_any(negative, axis=1)
    valid = (n_pos > 0) & has_neg
    anchor = tf.reduce_sum(pair, axis=1) / tf.maximum(n_pos, 1.0)
    anchor = tf.where(valid, anchor, 0.0)
    return tf.reduce_sum(anchor) / tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0)


def _global_sum(value):
    """Sum of `value` over the replicas in sync (itself outside a distribution strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


@keras.saving.register_keras_serializable(package="again_tf")
class BAT(PGDAT):
    """Benign adversarial training: memorization-aware PGD-AT. Name: `bat`.

    Xu, Liu, Wang, Ding, Wu, Liu, Jain & Tang, "Towards the Memorization Effect of Neural
    Networks in Adversarial Training", arXiv:2106.04794, 2021. On PGD adversarial examples
    x_i^adv (the `AdversarialModel`'s attack, as `pgd_at`), with mem(x_i) the example's
    memorization score, t the threshold and `benign_weights`' w_i:

        L = Σ_i w_i · CE(F(x_i^adv), y_i) / Σ_i w_i  +  β · L_DL,

    where L_DL is `discrimination_loss` on the penultimate features h of the typical
    examples (mem < t) of the batch, computed on the same training-mode forward pass of
    x^adv as the logits (the weights use those logits too, held constant).

    Under `tf.distribute` the Σ_i w_i of the normalization is the global batch's (an
    all-reduce across replicas), so the weighted mean is exactly the one-device value;
    L_DL is computed within each replica's batch (its positives and negatives are that
    replica's typical examples) and averaged over replicas.

    The scores live in a non-trainable variable `scores` (saved with the weights); the
    data carry each example's index into it (module docstring). An example whose score
    is NaN (e.g. never held out by the estimate) counts as neither typical nor atypical.

    Args:
        memorization_scores: per-example scores indexed by position in the training
            split: a `.npy`/`.npz` path (`again_tf.analysis.memorization.load_scores`;
            Feldman & Zhang's `cifar100_infl_matrix.npz` gives its `tr_mem`) or an array.
            Required unless `num_examples` is given (then the scores start at 0 and come
            from a checkpoint).
        num_examples: the size of the score table when no scores are given.
        alpha: α of the weights. Default 2.0: the paper uses α ∈ {1, 2}; we take 2 because
            with q ≤ 1, α = 1 can at most reduce a harmful example's weight to e^-1 ≈ 0.37
            of a normal one, while α = 2 reaches e^-2 ≈ 0.14, closer to the paper's aim of
            not fitting harmful atypical examples.
        beta: β, the weight of L_DL. Default 0.2 (the paper's).
        threshold: t, the memorization threshold between typical and atypical. Default
            0.15 (the paper's).
        temperature: τ of L_DL. Default 0.1 (our choice, see `discrimination_loss`).
        normalize_features: L2-normalize h in L_DL. Default True (our choice: bounded
            similarities, so τ means the same for every architecture); False is the
            paper's raw h·h.
        include_positive: whether L_DL's denominator includes the positive. Default True
            (ours); False is the paper's negatives-only denominator. The paper's L_DL is
            `normalize_features=False, include_positive=False` (`--defense_params=
            normalize_features=0,include_positive=0`); see `discrimination_loss` for why
            it is not the default.
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        ds, info = again_tf.data.load("fashion_mnist", "train", with_index=True)
        adv = AdversarialModel(model, defense="bat", memorization_scores="mem.npy", eps=0.1)
        adv.compile(optimizer="adam")
        adv.fit(again_tf.data.pipeline(ds, 128, training=True), epochs=4)
    """

    name = "bat"
    uses_index = True

    def __init__(self, memorization_scores=None, num_examples=None, alpha=2.0, beta=0.2,
                 threshold=0.15, temperature=0.1, normalize_features=True,
                 include_positive=True, aux_weight=2.0, **kwargs):
        super().__init__(aux_weight=aux_weight, **kwargs)
        for arg, value in (("alpha", alpha), ("beta", beta)):
            if float(value) < 0:
                raise ValueError(f"Expected `{arg}` >= 0. Received: {arg}={value}")
        if float(temperature) <= 0:
            raise ValueError(f"Expected `temperature` > 0. Received: temperature={temperature}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.threshold, self.temperature = float(threshold), float(temperature)
        self.normalize_features = as_bool(normalize_features, "normalize_features")
        self.include_positive = as_bool(include_positive, "include_positive")
        scores = None
        if memorization_scores is not None:
            if isinstance(memorization_scores, str):
                from again_tf.analysis.memorization import load_scores

                scores = load_scores(memorization_scores)
            else:
                scores = np.asarray(memorization_scores, np.float32).reshape(-1)
            if num_examples is not None and int(num_examples) != len(scores):
                raise ValueError(f"Expected `num_examples` to match the {len(scores)} scores. "
                                 f"Received: num_examples={num_examples}")
        elif num_examples is None:
            raise ValueError("Expected `memorization_scores` (a .npy/.npz path or an array "
                             "of per-example scores, e.g. from again_tf.analysis.memorization)"
                             " for defense 'bat'. Received: memorization_scores=None")
        self.num_examples = len(scores) if scores is not None else int(num_examples)
        if self.num_examples < 1:
            raise ValueError(f"Expected at least one memorization score. Received: "
                             f"num_examples={self.num_examples}")
        self.scores = self.add_weight(shape=(self.num_examples,), dtype="float32",
                                      initializer="zeros", trainable=False,
                                      name="memorization_scores")
        if scores is not None:
            self.scores.assign(scores)

    def loss(self, model, x, x_adv, y, index=None):
        if index is None:
            raise ValueError("Defense 'bat' needs each example's index into the memorization "
                             "scores: feed (x, y, index) batches, e.g. again_tf.data.load(..., "
                             "with_index=True). Received: index=None")
        outputs = self.outputs(model, x_adv, y, training=True, partner=x)
        logits = outputs["logits"]
        index = tf.cast(tf.reshape(index, [-1]), tf.int32)
        mem = tf.gather(self.scores, index)
        weights = benign_weights(logits, y, mem, self.alpha, self.threshold)
        # Σ_i w_i·CE_i / Σ_global w: `AdversarialModel` averages this vector over the
        # replica's batch and divides by the replica count, hence the factor n·R.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local = tf.cast(tf.shape(weights)[0], tf.float32)
        scale = local * replicas / _global_sum(tf.reduce_sum(weights))
        per_example = head_loss(outputs, y, losses.cross_entropy, self.aux_weight)
        per_example = tf.cast(per_example, tf.float32) * weights * tf.stop_gradient(scale)
        if self.beta:
            if outputs["features"] is None:
                raise ValueError("Defense 'bat' with beta > 0 needs penultimate features: use "
                                 "an again_tf.models.Classifier, or beta=0. Received a "
                                 f"{type(model).__name__}")
            typical = mem < self.threshold
            per_example += self.beta * discrimination_loss(
                outputs["features"], y, typical, self.temperature, self.normalize_features,
                self.include_positive)
        return per_example, logits

    def get_config(self):
        return {**super().get_config(), "memorization_scores": None,
                "num_examples": self.num_examples, "alpha": self.alpha, "beta": self.beta,
                "threshold": self.threshold, "temperature": self.temperature,
                "normalize_features": self.normalize_features,
                "include_positive": self.include_positive}


def as_bool(value, arg):
    """Accepts booleans and the strings/numbers `--defense_params` produces."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
    elif value in (0, 1):
        return bool(value)
    raise ValueError(f"Expected `{arg}` to be true or false. Received: {arg}={value!r}")
