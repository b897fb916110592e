"""Helpers shared by several test files."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def served_in_fresh_process(model, x, tmp_path):
    """Exports `model` (float32 images -> logits), serves `x` from it in a new process."""
    export = str(tmp_path / "saved")
    model.export(export, format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)])
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        served = tf.saved_model.load({export!r})
        np.save({str(tmp_path / 'y.npy')!r}, served.serve(np.load({str(tmp_path / 'x.npy')!r})).numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return np.load(tmp_path / "y.npy")
