"""Early-stopped PGD (Zhang et al., ICML 2020): FAT's training attack."""

import keras
import tensorflow as tf

from again_tf.attacks.geometry import project
from again_tf.attacks.pgd import PGD


class EarlyStoppedPGD(PGD):
    """PGD in which each example stops once it has been misclassified τ + 1 times.

    Zhang et al., "Attacks Which Do Not Kill Training Make Adversarial Learning Stronger",
    ICML 2020, Algorithm 1, as the official `earlystop` runs it: before each of the K
    steps the current iterate is classified; an example found misclassified with its
    budget at 0 stops there (it is returned as it is), one found misclassified with
    budget > 0 spends one unit and keeps moving, a correctly classified one keeps
    moving. The budget starts at τ, so an example stops at the (τ + 1)-th misclassified
    iterate (not necessarily consecutive), after τ more steps past its first one. Moving
    examples take `x ← Π(x + α·sign(∇ₓL) + ω·N(0, I))`. The loop ends after K steps or
    when no example moves.

    Args (beyond `PGD`'s):
        tau: τ, an int or a callable returning the current τ (an int tensor), read at
            each call (FAT's τ follows an epoch schedule).
        omega: ω, the standard deviation of the Gaussian noise added at each step.
            Default 0.0.

    `perturb(x, y, loss_fn)` takes `loss_fn(x_adv, y) -> (per-example loss, logits)`: the
    loss it ascends and the logits whose argmax decides misclassification, from one
    forward pass (as in the official code).

    Example:
        attack = EarlyStoppedPGD(model, eps=8/255, step_size=2/255, steps=10, tau=1)
        x_adv = attack(x, y)
    """

    def __init__(self, model, eps=8 / 255, step_size=2 / 255, steps=10, tau=0, omega=0.0,
                 **kwargs):
        super().__init__(model, eps, step_size, steps, **kwargs)
        if not callable(tau) and (int(tau) != tau or tau < 0):
            raise ValueError(f"Expected `tau` to be an integer >= 0. Received: tau={tau}")
        if float(omega) < 0:
            raise ValueError(f"Expected `omega` >= 0. Received: omega={omega}")
        self.tau = tau
        self.omega = float(omega)

    def default_loss(self, x_adv, y):
        logits = self.logits(x_adv)
        return self.loss(logits, y), logits

    def _perturb(self, x, y, loss_fn):
        tau = tf.cast(self.tau() if callable(self.tau) else self.tau, tf.int32)
        labels = tf.cast(y, tf.int64)
        n = tf.shape(x)[0]
        per_example = tf.concat([[n], tf.ones([tf.rank(x) - 1], tf.int32)], 0)

        def body(i, x_adv, budget, moving):
            seen = {}

            def loss_only(xa, ya):  # keeps the logits of the same forward pass
                loss, seen["logits"] = loss_fn(xa, ya)
                return loss

            grad, _ = self.input_gradient(x_adv, y, loss_only)  # float16-safe
            logits = seen["logits"]
            wrong = moving & tf.not_equal(tf.argmax(logits, axis=-1), labels)
            stop = wrong & tf.equal(budget, 0)
            budget = tf.where(wrong & ~stop, budget - 1, budget)
            moving = moving & ~stop
            stepped = self.step(x_adv, grad)
            if self.omega:
                stepped += self.omega * keras.random.normal(tf.shape(x), seed=self.seed_generator)
            stepped = project(stepped, x, self.eps, self.norm)
            x_adv = tf.where(tf.reshape(moving, per_example), stepped, x_adv)
            return i + 1, x_adv, budget, moving

        _, x_adv, _, _ = tf.while_loop(
            lambda i, _, __, moving: (i < self.steps) & tf.reduce_any(moving), body,
            (tf.constant(0), self.start(x), tf.fill([n], tau), tf.ones([n], tf.bool)))
        return x_adv

    def __repr__(self):
        return (f"EarlyStoppedPGD(eps={self.eps:g}, step_size={self.step_size:g}, "
                f"steps={self.steps}, omega={self.omega:g})")
