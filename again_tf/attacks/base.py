"""What every attack shares: the model, the ε-ball, the [0, 1] box, BatchNorm mode, seeds."""

import functools
import warnings

import keras
import numpy as np
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.geometry import project  # noqa: F401 (attacks.base.project, as before)
from again_tf.models.base import forward

NORMS = ("linf", "l2")


def _host_array(t):
    """`t` as a NumPy array, or None for a symbolic tensor (inside a `tf.function`)."""
    if isinstance(t, np.ndarray):
        return t
    if tf.is_tensor(t):
        return t.numpy() if hasattr(t, "numpy") and tf.executing_eagerly() else None
    return np.asarray(t)


def check_images(x, name="x"):
    """Refuses images that are not finite floats in [0, 1]: one line naming the problem.

    A host-side check of a batch before an attack or a training step: uint8 images or
    images in 0..255 would otherwise be clipped to [0, 1] without a word. Symbolic
    tensors (inside a `tf.function`) are left to the caller's in-graph checks.
    """
    a = _host_array(x)
    if a is None:
        return
    if a.dtype.kind in "uib":
        raise ValueError(f"`{name}` holds {a.dtype} images; expected float images in [0, 1] "
                         f"(divide by 255)")
    if a.dtype.kind != "f":
        raise ValueError(f"`{name}` holds {a.dtype} values; expected float images in [0, 1]")
    if not a.size:
        return
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}` holds {int(np.size(a) - np.isfinite(a).sum())} NaN or "
                         f"infinite pixel values; expected finite images in [0, 1]")
    low, high = float(a.min()), float(a.max())
    if high > 1.0:
        raise ValueError(f"`{name}` holds values up to {high:g}; expected images in [0, 1]"
                         + (" (divide by 255)" if high > 2.0 else ""))
    if low < 0.0:
        raise ValueError(f"`{name}` holds values down to {low:g}; expected images in [0, 1] "
                         f"(normalization belongs inside the model)")


def check_labels(y, num_classes, name="y"):
    """Refuses labels that are not integer class indices in [0, num_classes), shape (batch,)."""
    a = _host_array(y)
    if a is None:
        return
    if a.ndim != 1:
        raise ValueError(f"`{name}` has shape {a.shape}; expected class indices of shape "
                         f"(batch,)" + (" (one-hot labels: take their argmax)"
                                        if a.ndim == 2 else ""))
    if a.dtype.kind == "f" and a.size and not np.all(np.floor(a) == a):
        raise ValueError(f"`{name}` holds non-integer values; expected class indices")
    if a.dtype.kind not in "uif":
        raise ValueError(f"`{name}` holds {a.dtype} values; expected integer class indices")
    if a.size and num_classes and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"`{name}` holds labels in [{int(a.min())}, {int(a.max())}]; the "
                         f"model has {num_classes} classes, so expected labels in "
                         f"[0, {num_classes})")


def looks_like_probabilities(outputs):
    """True if every row is in [0, 1] and sums to 1: softmax outputs, not logits."""
    a = np.asarray(outputs, dtype=np.float64)
    return bool(a.ndim == 2 and a.shape[1] > 1 and a.size and a.min() >= 0.0
                and a.max() <= 1.0 and np.allclose(a.sum(axis=1), 1.0, atol=1e-3))


PROBABILITIES_WARNING = (
    "the model's outputs look like probabilities (each row in [0, 1], summing to 1); "
    "again_tf expects logits: remove the final softmax, or attacks and training losses "
    "are computed on the wrong quantity")


def compute_dtype(model):
    """The dtype `model` computes in: "float16" under the "mixed_float16" policy."""
    policy = getattr(model, "dtype_policy", None)
    return getattr(policy, "compute_dtype", "float32")


def scaled_input_gradient(x_adv, y, loss_fn, max_retries=8):
    """∇ₓ Σᵢ Lᵢ for a float16 model, with per-example loss scaling so nothing underflows.

    Mixed-precision loss scaling (Micikevicius et al., "Mixed Precision Training", ICLR
    2018) per example: the backward pass runs from sᵢ·Lᵢ with sᵢ = 2^eᵢ and the gradient is
    divided by sᵢ in float32 afterwards (exact: a power of two). A confidently classified
    example has a tiny loss and a gradient of about the same size (cross-entropy:
    1 − p_y ≈ L), far below float16's smallest subnormal 6e-8 once back-propagated to the
    input, so eᵢ = round(8 − log2 Lᵢ), clipped to [0, 108] (L = 0 in float32 still has a
    gradient), brings the gradient at the logits to about 2^8. An example whose scaled
    gradient overflows (not finite; e.g. a loss whose gradient is much larger than the
    loss, such as a KL divergence near its minimum) is redone with eᵢ lowered by 16, at
    most `max_retries` times (eᵢ = 0 last), each retry one more backward pass of the batch
    taken only when needed. Returns `(gradient float32 like x_adv, per-example loss)`.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_adv)
        loss = loss_fn(x_adv, y)
        loss32 = tf.cast(loss, tf.float32)
    shape = tf.concat([tf.shape(x_adv)[:1], tf.ones([tf.rank(x_adv) - 1], tf.int32)], 0)
    log2 = tf.math.log(tf.maximum(tf.abs(loss32), 2.0 ** -100)) / tf.math.log(2.0)
    exponent = tf.clip_by_value(tf.round(8.0 - log2), 0.0, 108.0)

    def gradient(e):
        scale = tf.pow(2.0, e)
        g = tf.cast(tape.gradient(loss32, x_adv, output_gradients=scale), tf.float32)
        g /= tf.reshape(scale, shape)
        finite = tf.reduce_all(tf.math.is_finite(tf.reshape(g, [tf.shape(g)[0], -1])), -1)
        return g, finite | tf.equal(e, 0.0)  # unscaled: nothing left to try

    def retry(i, e, g, done):
        lowered = 0.0 if max_retries == 1 else tf.where(
            i + 1 >= max_retries, 0.0, tf.maximum(e - 16.0, 0.0))
        e = tf.where(done, e, lowered)
        g_new, ok = gradient(e)
        g = tf.where(tf.reshape(done, shape), g, g_new)
        return i + 1, e, g, done | ok

    grad, done = gradient(exponent)
    _, _, grad, _ = tf.while_loop(lambda i, e, g, done: ~tf.reduce_all(done), retry,
                                  (tf.constant(0), exponent, grad, done),
                                  maximum_iterations=max_retries)
    return grad, loss


class Attack:
    """Base class of the attacks: a classifier, a threat model and a loss.

    Args:
        model: a Keras classifier mapping images in [0, 1] to logits (an
            `again_tf.models.Classifier` or any Keras model).
        eps: radius of the threat model, in [0, 1] pixel units.
        norm: "linf" or "l2".
        loss: "ce" (cross-entropy), "cw" (C&W margin) or a callable
            `(logits, labels) -> (batch,)`.
        targeted: if True, `labels` passed to the attack are target classes and the
            loss is minimized; otherwise the loss of the true labels is maximized.
        training: the BatchNorm/dropout mode the model runs in during the attack.
            Default False (inference mode). With True, any state the forward pass
            updates (BatchNorm moving statistics) is restored afterwards, so the attack
            never leaks into the model's training statistics, unless
            `update_statistics`.
        update_statistics: with `training=True`, keep what every attack iterate's
            forward pass writes into the model's state (BatchNorm moving statistics), as
            a PyTorch attack run after `model.train()` does (the AWP repository's
            AT_AWP/train_cifar10.py). Default False.
        seed: seed of the attack's `keras.random.SeedGenerator`; every call draws fresh
            noise, also inside a compiled `tf.function` or under XLA.
        jit_compile: compile `__call__` with XLA.

    Call `attack(x, y)` on a batch, or `attack(x, y, loss_fn)` with a custom per-example
    loss `loss_fn(x_adv, y) -> (batch,)` of the adversarial input (e.g.
    `heads.objective_fn(model, "aux")`); labels are required (the attack never
    substitutes the model's own predictions). Both are compiled (`compiled`). Inside a
    `tf.function` (a `train_step`), call `attack.perturb(x, y, loss_fn)`, the same
    attack uncompiled.
    """

    # SubsetAttack's components trace without AutoGraph (their loops are tf.while_loop).
    _autograph = True

    def __init__(self, model, eps, norm="linf", loss="ce", targeted=False, training=False,
                 seed=None, jit_compile=False, update_statistics=False):
        if not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"Expected `eps` in (0, 1] (pixel units). Received: eps={eps}")
        if norm not in NORMS:
            raise ValueError(f"Unknown norm {norm!r}. Expected one of: {', '.join(NORMS)}")
        self.model = model
        self.eps = float(eps)
        self.norm = norm
        self.loss = losses.get(loss)
        self.targeted = bool(targeted)
        self.training = bool(training)
        if update_statistics and not self.training:
            raise ValueError("`update_statistics=True` needs `training=True` (in inference "
                             "mode the attack writes no statistics)")
        self.update_statistics = bool(update_statistics)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.jit_compile = bool(jit_compile)
        self._compiled = {}
        self._num_classes = None

    def check_inputs(self, x, y):
        """Host-side checks of one call's batch (not in the compiled attack loop): images
        finite in [0, 1], labels in [0, classes); warns once if the model outputs
        probabilities. Raises ValueError in one line."""
        if y is None:
            return  # __call__ says why
        check_images(x)
        if self._num_classes is None:
            a = _host_array(x)
            if a is None or not len(a):
                return
            # One image, inference mode: the number of classes, and a softmax at the end?
            out = forward(self.model, tf.convert_to_tensor(a[:1], tf.float32))["logits"]
            self._num_classes = int(out.shape[-1])
            if looks_like_probabilities(out):
                warnings.warn(f"{type(self).__name__}: {PROBABILITIES_WARNING}", stacklevel=3)
        check_labels(y, self._num_classes)

    def logits(self, x):
        return forward(self.model, x, training=self.training)["logits"]

    def default_loss(self, x_adv, y):
        """The attack's own objective: `loss(logits(x_adv), y)` per example."""
        return self.loss(self.logits(x_adv), y)

    def perturb(self, x, y, loss_fn=None):
        """Returns adversarial examples for `(x, y)`; differentiable nowhere (stopped).

        `loss_fn(x_adv, y) -> (batch,)` replaces the attack's own loss; it is
        maximized, or minimized when `targeted`.
        """
        x = tf.convert_to_tensor(x, tf.float32)
        loss_fn = loss_fn or self.default_loss
        if not self.training or self.update_statistics:
            return tf.stop_gradient(self._perturb(x, y, loss_fn))
        state = self.model.non_trainable_variables
        saved = [tf.identity(v) for v in state]
        with tf.control_dependencies(saved):
            x_adv = tf.stop_gradient(self._perturb(x, y, loss_fn))
        with tf.control_dependencies([x_adv]):
            restore = [v.assign(s) for v, s in zip(state, saved)]
        with tf.control_dependencies(restore):
            return tf.identity(x_adv)

    def _perturb(self, x, y, loss_fn):
        raise NotImplementedError

    def input_gradient(self, x_adv, y, loss_fn):
        """Gradient of the summed per-example loss w.r.t. the input, and the losses.

        Under a mixed float16 policy the backward pass runs in float16, where the small
        gradients of confidently classified examples underflow to 0; it is then taken
        with per-example loss scaling (`scaled_input_gradient`).
        """
        if compute_dtype(self.model) == "float16":
            return scaled_input_gradient(x_adv, y, loss_fn)
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = loss_fn(x_adv, y)
            total = tf.reduce_sum(tf.cast(loss, tf.float32))
        grad = tape.gradient(total, x_adv)
        return grad, loss

    def compiled(self, loss_fn=None, image_shape=None):
        """The compiled attack `fn(x, y)` for `loss_fn` (None: the attack's own loss).

        Traced once per `loss_fn` and image shape, for any batch size (the batch
        dimension is left free; labels int32), and kept by the attack: the key is the
        function object itself, so the caller should pass the same object each time.
        """
        key = (loss_fn, None if image_shape is None else tuple(image_shape))
        fn = self._compiled.get(key)
        if fn is None:
            signature = None
            if image_shape is not None:
                signature = [tf.TensorSpec((None,) + tuple(image_shape), tf.float32),
                             tf.TensorSpec((None,), tf.int32)]
            # A partial, not a lambda: TensorFlow's retracing warning keys on the code
            # object, and would count each objective's own function as a retrace.
            fn = tf.function(functools.partial(self.perturb, loss_fn=loss_fn),
                             input_signature=signature,
                             jit_compile=self.jit_compile, autograph=self._autograph,
                             reduce_retracing=signature is None)
            self._compiled[key] = fn
        return fn

    def __call__(self, x, y, loss_fn=None):
        """Adversarial examples for `(x, y)`; `loss_fn(x_adv, y) -> (batch,)` replaces
        the attack's own loss. Inputs checked on the host, then the compiled attack."""
        if y is None:
            raise ValueError("Attacks need the labels `y` (targets when targeted=True); "
                             "they never fall back to the model's predictions.")
        self.check_inputs(x, y)
        x = tf.convert_to_tensor(x, tf.float32)
        y = tf.cast(tf.convert_to_tensor(y), tf.int32)
        return self.compiled(loss_fn, x.shape[1:])(x, y)

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r})"
