"""Hybrid Feature Fusion (HFF), the feature-statistics mixing of AGAIN (Yin et al., CVPR 2023)."""

import math

import keras
import tensorflow as tf
from keras import ops

PAIRINGS = ("shuffle", "clean_adv")


def mean_std(x, epsilon):
    """Per-(example, channel) mean and std over the spatial axes; std = sqrt(unbiased var + ε)."""
    axes = tuple(range(1, len(x.shape) - 1))
    mean = ops.mean(x, axis=axes, keepdims=True)
    count = ops.cast(ops.prod(ops.shape(x)[1:-1]), x.dtype)
    var = ops.sum(ops.square(x - mean), axis=axes, keepdims=True) / (count - 1.0)
    return mean, ops.sqrt(var + epsilon)


@keras.saving.register_keras_serializable(package="again_tf")
class HybridFeatureFusion(keras.layers.Layer):
    """Re-normalizes each feature map to a random mix of its own and a partner's statistics.

    Yin et al., "AGAIN: Adversarial Training with Attribution Span Enlargement and
    Hybrid Feature Fusion", CVPR 2023. For a content map `c` and a style map `s` (per
    example and channel, μ = spatial mean, σ = sqrt(unbiased spatial variance + ε)):

        c→s = σ(s)·(c − μ(c))/σ(c) + μ(s)      s→c = σ(c)·(s − μ(s))/σ(s) + μ(c)
        μ̂ = Σ_i γ_i μ(A_i),  σ̂ = Σ_i γ_i σ(A_i),  A = (c, s, c→s, s→c),
        γ ~ Dirichlet(1, 1, 1, 1)  (one draw per call, shared by the batch)
        HFF(c) = σ̂·(c − μ(c))/σ(c) + μ̂

    as the `HFF(content, style)` function of the official code
    (github.com/InsLin/AGAIN), whose `func1(1, 4)` draws uniform spacings, i.e.
    Dirichlet(1, 1, 1, 1), and whose `calc_mean_std` uses the unbiased variance + 1e-5.
    The official code defines HFF but never calls it.

    Who is the style partner (`pairing`):
        "shuffle" (the layer's default, the only partner a stand-alone layer has): the
            example a random permutation of the batch puts in this example's place,
            as MixStyle pairs examples for the same AdaIN statistics.
        "clean_adv" (AGAIN's choice here, `ase.ASE(hff_pairing=...)`): the batch is
            `concat([a, b])` of two equal halves and example `i` of one half is paired
            with example `i` of the other: the adversarial and the clean features of
            the same image when the objective forwards `concat([x_adv, x])`
            (`Objective.outputs` does so for a model holding a layer with
            `needs_partner`). The paper's text was not available here to settle it;
            the reasons: HFF sits before ASE in the last stage, where mixing in a
            random other example's statistics (about half of them, on average) mixes
            features across classes with the label unchanged, and it cost 12 points of
            clean accuracy in a 2-epoch Fashion-MNIST run (ASE at the last map; 57% vs
            69% with clean/adversarial pairs or without HFF); "hybrid" statistics of
            an image's clean and adversarial features keep the label right.

    HFF acts only when `training` is True; at inference (and in the training attack,
    which runs in inference mode) it is the identity. Gradients flow through every
    statistic, as in the official function.

    Args:
        pairing: "shuffle" or "clean_adv". Default "shuffle" (see above).
        epsilon: ε added to the variance. Default 1e-5 (official code).
        seed: seed of the `SeedGenerator` for γ and the permutation. Default None.

    Input shape: `(batch, height, width, channels)` (any rank ≥ 3; at least two
    spatial positions). Output shape: same as input.

    Example:
        hff = HybridFeatureFusion()
        mixed = hff(features, training=True)      # identity with training=False
    """

    def __init__(self, pairing="shuffle", epsilon=1e-5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if pairing not in PAIRINGS:
            raise ValueError(f"Expected `pairing` in {PAIRINGS}. Received: pairing={pairing!r}")
        if float(epsilon) <= 0:
            raise ValueError(f"Expected `epsilon` > 0. Received: epsilon={epsilon}")
        self.pairing = pairing
        self.epsilon = float(epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    @property
    def needs_partner(self):
        """True if the batch must be `concat([inputs, partner inputs])` in training."""
        return self.pairing == "clean_adv"

    def build(self, input_shape):
        spatial = input_shape[1:-1]
        if not spatial:
            raise ValueError(f"HybridFeatureFusion needs spatial axes. "
                             f"Received: input_shape={tuple(input_shape)}")
        known = [s for s in spatial if s is not None]
        if len(known) == len(spatial) and math.prod(known) < 2:
            raise ValueError(f"HybridFeatureFusion needs at least two spatial positions for "
                             f"the unbiased variance. Received: input_shape={tuple(input_shape)}")

    def partner(self, inputs):
        """The style map of every example."""
        if self.pairing == "shuffle":
            order = keras.random.shuffle(ops.arange(ops.shape(inputs)[0]),
                                         seed=self.seed_generator)
            return ops.take(inputs, order, axis=0)
        size = tf.shape(inputs)[0]
        check = tf.debugging.assert_equal(
            size % 2, 0, message="HybridFeatureFusion(pairing='clean_adv') needs a batch of "
                                 "two equal halves (an even batch size)")
        with tf.control_dependencies([check]):
            half = size // 2
        return tf.concat([inputs[half:], inputs[:half]], axis=0)

    def mixing_weights(self):
        """γ ~ Dirichlet(1, 1, 1, 1), as normalized Gamma(1) draws."""
        g = keras.random.gamma((4,), alpha=1.0, seed=self.seed_generator)
        return ops.cast(g / ops.sum(g), self.compute_dtype)

    def fuse(self, content, style, weights):
        """HFF(content, style) with mixing weights γ = `weights` (4,)."""
        mu_c, sd_c = mean_std(content, self.epsilon)
        mu_s, sd_s = mean_std(style, self.epsilon)
        normalized = (content - mu_c) / sd_c
        c_to_s = normalized * sd_s + mu_s
        s_to_c = (style - mu_s) / sd_s * sd_c + mu_c
        mu_cs, sd_cs = mean_std(c_to_s, self.epsilon)
        mu_sc, sd_sc = mean_std(s_to_c, self.epsilon)
        mu = weights[0] * mu_c + weights[1] * mu_s + weights[2] * mu_cs + weights[3] * mu_sc
        sd = weights[0] * sd_c + weights[1] * sd_s + weights[2] * sd_cs + weights[3] * sd_sc
        return normalized * sd + mu

    def call(self, inputs, labels=None, training=None):
        if not training:
            return inputs
        return self.fuse(inputs, self.partner(inputs), self.mixing_weights())

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "pairing": self.pairing, "epsilon": self.epsilon,
                "seed": self.seed}
