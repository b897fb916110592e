"""Analyses: class-wise robustness, gradient-masking checks, channel activations,
memorization scores (and attribution maps, `again_tf.analysis.attribution`)."""

from again_tf.analysis import channels, classwise, memorization, sanity

__all__ = ["channels", "classwise", "memorization", "sanity"]
