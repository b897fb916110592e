"""The Carlini-Wagner L2 attack (Carlini & Wagner, IEEE S&P 2017), untargeted.

C&W-∞ as the robustness papers report it (PGD on the C&W margin loss) is `PGD(loss="cw")`,
`evaluation.parse_attack("cw")`; this module is the original L2 optimization attack.
"""

import tensorflow as tf

from again_tf.attacks.apgd import SubsetAttack
from again_tf.attacks.geometry import batch_norm, per_example

_NONE = 1e10


class CWL2(SubsetAttack):
    """C&W-L2: minimal-L2 adversarial examples by optimization in tanh space.

    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P
    2017; defaults from their code (carlini/nn_robust_attacks `l2_attack.py`). With
    x' = (tanh(w) + 1)/2 (always in [0, 1]) it minimizes, with Adam over w,

        ‖x' − x‖₂² + c · max(z_y(x') − max_{i≠y} z_i(x') + κ, 0)

    and runs a binary search over c per example: after a search step, c is halved
    towards the last failure if an adversarial example was found, otherwise multiplied
    by 10 (or bisected once an upper bound is known). The result is, per example, the
    adversarial example of smallest L2 norm found over all steps; examples never fooled
    get their clean input. With `eps` set, an example whose best adversarial example is
    farther than `eps` (in the threat model's `norm`) also gets its clean input, so the
    attack is an ε-bounded evaluation.

    Args:
        model: a Keras classifier mapping [0, 1] images to logits.
        eps: radius of the threat model the result is filtered by, or None (default)
            for the pure minimal-norm attack.
        norm: norm of that threat model, "l2" (default) or "linf"; the optimization is
            always L2.
        confidence: κ. Default 0 (official).
        initial_const: first c. Default 1e-3 (official).
        binary_search_steps: Default 9 (official).
        max_iterations: Adam steps per search step. Default 10000 (official; the
            `cwl2` evaluation uses 1000).
        learning_rate: Default 1e-2 (official).
        abort_early: stop a search step when the loss has not decreased by 0.01 %
            over a tenth of the iterations. Default True (official). The first check
            compares with +∞ (the official `prev = np.inf`, since carlini/nn_robust_attacks
            e87e2d2; the older `prev = 1e6` aborted at once any batch whose summed loss
            started above 10⁶, e.g. with a large `initial_const`).
        seed, training: see `Attack` (the attack itself is deterministic).

    Example:
        x_adv = CWL2(model, binary_search_steps=5, max_iterations=200)(x, y)
        norms = tf.norm(tf.reshape(x_adv - x, (len(x), -1)), axis=1)
    """

    name = "cwl2"

    def __init__(self, model, eps=None, norm="l2", confidence=0.0, initial_const=1e-3,
                 binary_search_steps=9, max_iterations=10000, learning_rate=1e-2,
                 abort_early=True, seed=None, training=False):
        super().__init__(model, 1.0 if eps is None else eps, norm=norm, seed=seed,
                         training=training)
        self.eps = None if eps is None else float(eps)
        for arg, value in (("binary_search_steps", binary_search_steps),
                           ("max_iterations", max_iterations)):
            if int(value) < 1:
                raise ValueError(f"Expected `{arg}` >= 1. Received: {arg}={value}")
        if float(initial_const) <= 0 or float(learning_rate) <= 0:
            raise ValueError(f"Expected `initial_const` > 0 and `learning_rate` > 0. Received: "
                             f"initial_const={initial_const}, learning_rate={learning_rate}")
        self.confidence = float(confidence)
        self.initial_const = float(initial_const)
        self.binary_search_steps = int(binary_search_steps)
        self.max_iterations = int(max_iterations)
        self.learning_rate = float(learning_rate)
        self.abort_early = bool(abort_early)

    def succeeded(self, logits, y):
        """Misclassified with margin κ: z_y + κ < max_{i≠y} z_i (argmax after z_y += κ)."""
        boost = tf.one_hot(y, tf.shape(logits)[-1]) * self.confidence
        return tf.not_equal(tf.argmax(logits + boost, -1, output_type=tf.int32), y)

    def search_step(self, x0, w0, y, const):
        """One Adam optimization at constants `const`; returns (best L2², best point)."""
        check_every = max(self.max_iterations // 10, 1)
        batch = tf.shape(y)[0]
        lr, b1, b2, tiny = self.learning_rate, 0.9, 0.999, 1e-8

        def body(i, mod, m, v, prev, stop, best_l2, best_adv):
            with tf.GradientTape() as tape:
                tape.watch(mod)
                new = (tf.tanh(mod + w0) + 1.0) / 2.0
                logits = self.logits(new)
                onehot = tf.one_hot(y, tf.shape(logits)[-1])
                l2 = tf.reduce_sum(tf.square(tf.reshape(new - x0, (batch, -1))), 1)
                real = tf.reduce_sum(onehot * logits, 1)
                other = tf.reduce_max((1.0 - onehot) * logits - onehot * 10000.0, 1)
                loss1 = tf.maximum(real - other + self.confidence, 0.0)
                loss = tf.reduce_sum(const * loss1) + tf.reduce_sum(l2)
            grad = tape.gradient(loss, mod)
            at_check = tf.equal(i % check_every, 0)
            abort = tf.logical_and(tf.logical_and(at_check, self.abort_early), loss > prev * 0.9999)
            prev = tf.where(tf.logical_and(at_check, tf.logical_not(abort)), loss, prev)
            keep = tf.logical_and(tf.logical_not(abort),
                                  tf.logical_and(self.succeeded(logits, y), l2 < best_l2))
            best_l2 = tf.where(keep, l2, best_l2)
            best_adv = tf.where(per_example(keep, new), new, best_adv)
            # Adam (TF1 AdamOptimizer's update), skipped on the aborting iteration.
            t = tf.cast(i + 1, tf.float32)
            m_new = b1 * m + (1 - b1) * grad
            v_new = b2 * v + (1 - b2) * tf.square(grad)
            lr_t = lr * tf.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            mod_new = mod - lr_t * m_new / (tf.sqrt(v_new) + tiny)
            mod, m, v = (tf.where(abort, a, b) for a, b in ((mod, mod_new), (m, m_new),
                                                            (v, v_new)))
            return i + 1, mod, m, v, prev, abort, best_l2, best_adv

        zeros = tf.zeros_like(x0)
        out = tf.while_loop(
            lambda i, *s: tf.logical_and(i < self.max_iterations, tf.logical_not(s[4])), body,
            (tf.constant(0), zeros, zeros, zeros, tf.constant(float("inf")), tf.constant(False),
             tf.fill([batch], _NONE), x0))
        return out[-2], out[-1]

    def minimal(self, x, y):
        """(best adversarial points or x, their squared L2 distance or 1e10) per example."""
        x = tf.clip_by_value(x, 0.0, 1.0)
        w0 = tf.atanh((2.0 * x - 1.0) * 0.999999)
        x0 = (tf.tanh(w0) + 1.0) / 2.0  # the clean image as the tanh space represents it
        batch = tf.shape(y)[0]
        repeat = self.binary_search_steps >= 10

        def body(step, lower, upper, const, o_l2, o_adv):
            if repeat:  # the official last step retries at the upper bound
                const = tf.where(tf.equal(step, self.binary_search_steps - 1), upper, const)
            best_l2, best_adv = self.search_step(x0, w0, y, const)
            success = best_l2 < _NONE
            better = best_l2 < o_l2
            o_l2 = tf.where(better, best_l2, o_l2)
            o_adv = tf.where(per_example(better, x), best_adv, o_adv)
            upper = tf.where(success, tf.minimum(upper, const), upper)
            lower = tf.where(success, lower, tf.maximum(lower, const))
            const = tf.where(upper < 1e9, (lower + upper) / 2.0,
                             tf.where(success, const, const * 10.0))
            return step + 1, lower, upper, const, o_l2, o_adv

        out = tf.while_loop(
            lambda step, *_: step < self.binary_search_steps, body,
            (tf.constant(0), tf.zeros([batch]), tf.fill([batch], _NONE),
             tf.fill([batch], self.initial_const), tf.fill([batch], _NONE), x))
        return out[-1], out[-2]

    def _perturb(self, x, y, loss_fn):
        del loss_fn  # the C&W objective is fixed
        y = tf.cast(y, tf.int32)
        adv, l2sq = self.minimal(x, y)
        found = l2sq < _NONE
        if self.eps is not None:
            found = tf.logical_and(found, batch_norm(adv - x, self.norm) <= self.eps)
        return tf.where(per_example(found, x), adv, x)

    def __repr__(self):
        return (f"CWL2(eps={self.eps}, binary_search_steps={self.binary_search_steps}, "
                f"max_iterations={self.max_iterations}, confidence={self.confidence:g})")
