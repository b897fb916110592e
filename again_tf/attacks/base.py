"""What every attack shares: the model, the ε-ball, the [0, 1] box, BatchNorm mode, seeds."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.models.base import forward

NORMS = ("linf", "l2")
_TINY = 1e-12


def _per_example_norm(t):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=tf.range(1, tf.rank(t)), keepdims=True))


def project(x_adv, x, eps, norm):
    """Projects `x_adv` onto the ε-ball around `x` (L∞ or L2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta *= tf.minimum(1.0, eps / (_per_example_norm(delta) + _TINY))
    return tf.clip_by_value(x + delta, 0.0, 1.0)


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
    del tape
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
            never leaks into the model's training statistics.
        seed: seed of the attack's `keras.random.SeedGenerator`; every call draws fresh
            noise, also inside a compiled `tf.function` or under XLA.
        jit_compile: compile `__call__` with XLA.

    Call `attack(x, y)` on a batch; labels are required (the attack never substitutes
    the model's own predictions). Inside a `tf.function` (a `train_step`), call
    `attack.perturb(x, y, loss_fn)` with a custom per-example loss of the adversarial
    input instead.
    """

    def __init__(self, model, eps, norm="linf", loss="ce", targeted=False, training=False,
                 seed=None, jit_compile=False):
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
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.jit_compile = bool(jit_compile)
        self._compiled = None

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
        if not self.training:
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

    def __call__(self, x, y):
        if y is None:
            raise ValueError("Attacks need the labels `y` (targets when targeted=True); "
                             "they never fall back to the model's predictions.")
        if self._compiled is None:
            self._compiled = tf.function(
                lambda a, b: self.perturb(a, b), jit_compile=self.jit_compile,
                reduce_retracing=True)
        return self._compiled(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y))

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r})"
