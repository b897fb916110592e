"""Moved to `again_tf.heads` (one module for the auxiliary heads); importable from here as before."""

from again_tf.heads import (DEFAULT_AUX_WEIGHT, HEAD_OBJECTIVES, head_objective,  # noqa: F401
                            num_aux_heads, objective_fn)
