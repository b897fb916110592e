"""Analyses of evaluation results: class-wise robustness and gradient-masking checks."""

from again_tf.analysis import classwise, sanity

__all__ = ["classwise", "sanity"]
