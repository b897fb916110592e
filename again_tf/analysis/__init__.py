"""Analyses: class-wise robustness, gradient-masking checks, channel activations,
memorization scores (and attribution maps, `again_tf.analysis.attribution`)."""

from again_tf.analysis import attribution, channels, classwise, heads, memorization, sanity

__all__ = ["attribution", "channels", "classwise", "heads", "memorization", "sanity"]
