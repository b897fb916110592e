"""LAS-AT's attacks (Jia et al., CVPR 2022): PGD with a per-example policy, and the
official `attack_pgd` its reward is measured with."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.pgd import PGD
from again_tf.distribute import num_replicas
from again_tf.models.base import forward


class PolicyPGD(PGD):
    """L∞ PGD with a per-example ε_i, step α_i and step count K_i (LAS-AT's attack).

    The official `Attack_policy_batch`: δ starts uniform in [−ε, ε] (ε the threat model's,
    8/255 in the paper) clipped to the [0, 1] box; then for t < max_i K_i, every example
    takes δ ← clip(δ + [t < K_i]·α_i·sign(∇_δ L), −ε_i, ε_i), clipped to the box.
    Without a policy (`perturb`), it is the plain `PGD`.

    Example:
        attack = PolicyPGD(model, eps=8/255)
        x_adv = attack.perturb_policy(x, y, eps_i, alpha_i, steps_i)
    """

    _policy = None

    def perturb_policy(self, x, y, eps, step_size, steps, loss_fn=None):
        """Adversarial examples with per-example `eps`, `step_size` (pixel units), `steps`."""
        self._policy = (eps, step_size, steps)
        try:
            return self.perturb(x, y, loss_fn)
        finally:
            self._policy = None

    def _perturb(self, x, y, loss_fn):
        if self._policy is None:
            return super()._perturb(x, y, loss_fn)
        eps, alpha, steps = self._policy
        per_example = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
        eps = tf.reshape(tf.cast(eps, tf.float32), per_example)
        alpha = tf.reshape(tf.cast(alpha, tf.float32), per_example)
        steps = tf.cast(steps, tf.int32)
        start = self.policy_start(x)

        def body(t, x_adv):
            grad, _ = self.input_gradient(x_adv, y, loss_fn)
            active = tf.reshape(tf.cast(t < steps, tf.float32), per_example)
            delta = tf.clip_by_value(x_adv - x + active * alpha * tf.sign(grad), -eps, eps)
            return t + 1, tf.clip_by_value(x + delta, 0.0, 1.0)

        _, x_adv = tf.while_loop(lambda t, _: t < tf.reduce_max(steps), body,
                                 (tf.constant(0), start))
        return x_adv

    def policy_start(self, x):
        """The policy attack's random start: uniform in the ε-ball (the model's ε)."""
        noise = keras.random.uniform(tf.shape(x), -self.eps, self.eps, seed=self.seed_generator)
        return tf.clip_by_value(x + noise, 0.0, 1.0)


def restart_pgd(model, x, y, eps, steps, restarts, start):
    """The official LAS-AT `attack_pgd`: L∞ PGD on CE with `model` in training mode, step
    ε/4, `restarts` restarts from `start(x)`.

    Only examples still classified correctly move; a restart ends once none is; per
    example, the restart with the larger final loss is kept. Under several replicas the
    loop is unrolled: a synchronized BatchNorm's cross-replica sum cannot sit in a while
    loop (same result: once no example is correct, none moves).
    """
    labels = tf.cast(y, tf.int64)
    per_example = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
    alpha = eps / 4.0
    best_loss = tf.zeros(tf.shape(x)[:1])
    best_delta = tf.zeros_like(x)
    for _ in range(restarts):
        delta = start(x) - x

        def body(i, delta, _):
            with tf.GradientTape() as tape:
                tape.watch(delta)
                logits = forward(model, x + delta, training=True)["logits"]
                loss = tf.reduce_sum(losses.cross_entropy(logits, y))
            grad = tape.gradient(loss, delta)
            correct = tf.equal(tf.argmax(logits, -1), labels)
            moved = tf.clip_by_value(delta + alpha * tf.sign(grad), -eps, eps)
            moved = tf.clip_by_value(x + moved, 0.0, 1.0) - x
            delta = tf.where(tf.reshape(correct, per_example), moved, delta)
            return i + 1, delta, tf.reduce_any(correct)

        if num_replicas() > 1:
            for i in range(steps):
                _, delta, _ = body(i, delta, True)
        else:
            _, delta, _ = tf.while_loop(lambda i, _, go: (i < steps) & go,
                                        body, (tf.constant(0), delta, tf.constant(True)))
        final = losses.cross_entropy(forward(model, x + delta, training=True)["logits"], y)
        take = final >= best_loss
        best_delta = tf.where(tf.reshape(take, per_example), delta, best_delta)
        best_loss = tf.maximum(best_loss, final)
    return x + best_delta
