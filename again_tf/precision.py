"""Mixed precision: the Keras dtype policy a model is built under.

    with again_tf.precision.policy("float16"):     # "mixed_float16": GPUs with tensor cores
        net = again_tf.models.build("resnet18", 10)
        adv = again_tf.AdversarialModel(net, defense="pgd_at")
        adv.compile(optimizer="sgd")               # Keras wraps it in a LossScaleOptimizer

Layers take the global policy when they are created, so only the model built inside the
`with` computes in half precision; variables stay float32, and the models' final Dense
(`fc`) is float32, so logits and every loss are float32. Under "float16" Keras wraps the
optimizer in a `LossScaleOptimizer` (dynamic loss scaling, Micikevicius et al., ICLR
2018); the attacks' input gradients are loss-scaled per example
(`attacks.base.scaled_input_gradient`); AWP's proxy gradient uses the optimizer's scale.
"bfloat16" needs no loss scaling (float32's exponent range) and is what a CPU or a TPU
supports; on a CPU without bfloat16 units it is slower than float32 (tests only).
"""

import contextlib

import keras

MODES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def check(mode):
    """Raises ValueError (one line) unless `mode` is one of `MODES`."""
    if mode not in MODES:
        raise ValueError(f"--mixed_precision={mode!r} is unknown. Expected one of: "
                         f"{', '.join(MODES)}")


@contextlib.contextmanager
def policy(mode):
    """Sets Keras' global dtype policy for `mode` ("off", "float16", "bfloat16") inside
    the `with`, and restores the previous one after it."""
    check(mode)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(MODES[mode])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
