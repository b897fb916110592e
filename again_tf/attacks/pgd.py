"""Projected gradient descent (Madry et al., ICLR 2018) and FGSM (Goodfellow et al., 2015)."""

import keras
import tensorflow as tf

from again_tf.attacks.base import Attack
from again_tf.attacks.geometry import TINY, l2_norm_keepdims, project

STARTS = ("uniform", "normal", "none")


class PGD(Attack):
    """Projected gradient descent in an L∞ or L2 ball.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018. Each step, for L∞:  x ← Π_{B∞(x0, ε) ∩ [0,1]}(x + α·sign(∇ₓ L));
    for L2:  x ← Π_{B2(x0, ε) ∩ [0,1]}(x + α·∇ₓL / ‖∇ₓL‖₂). Targeted attacks step
    against the gradient of the target's loss.

    Args (beyond `Attack`'s):
        step_size: α, in pixel units. Default 2/255 (the CIFAR recipes of Madry et al.,
            TRADES, MART and AWP use ε=8/255, α=2/255).
        steps: number of steps. Default 10.
        random_start: "uniform" (uniform in the L∞ box, or a uniform direction at a
            radius uniform in [0, ε] for L2; Madry et al.), "normal" (x + init_std·N(0, 1),
            the TRADES attack's start), or "none". True/False mean "uniform"/"none".
        init_std: standard deviation of the "normal" start. Default 0.001 (TRADES).

    Example:
        attack = PGD(model, eps=8/255, step_size=2/255, steps=10)
        x_adv = attack(x, y)
    """

    def __init__(self, model, eps=8 / 255, step_size=2 / 255, steps=10, random_start=True,
                 init_std=0.001, **kwargs):
        super().__init__(model, eps, **kwargs)
        if random_start is True:
            random_start = "uniform"
        elif random_start is False:
            random_start = "none"
        if random_start not in STARTS:
            raise ValueError(f"Unknown random_start {random_start!r}. "
                             f"Expected one of: {', '.join(STARTS)}")
        if int(steps) < 1:
            raise ValueError(f"Expected `steps` >= 1. Received: steps={steps}")
        if float(step_size) <= 0:
            raise ValueError(f"Expected `step_size` > 0. Received: step_size={step_size}")
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = random_start
        self.init_std = float(init_std)

    def start(self, x):
        """The first iterate: `x` plus the random start, inside the ball and the box."""
        if self.random_start == "none":
            return x
        shape = tf.shape(x)
        if self.random_start == "normal":
            noise = self.init_std * keras.random.normal(shape, seed=self.seed_generator)
        elif self.norm == "linf":
            noise = keras.random.uniform(shape, -self.eps, self.eps, seed=self.seed_generator)
        else:
            direction = keras.random.normal(shape, seed=self.seed_generator)
            direction /= l2_norm_keepdims(direction) + TINY
            radius = keras.random.uniform(tf.concat([shape[:1], tf.ones_like(shape[1:])], 0),
                                          0.0, self.eps, seed=self.seed_generator)
            noise = direction * radius
        return project(x + noise, x, self.eps, self.norm)

    def step(self, x_adv, grad):
        """One ascent step (descent when targeted), before projection."""
        if self.targeted:
            grad = -grad
        if self.norm == "linf":
            return x_adv + self.step_size * tf.sign(grad)
        return x_adv + self.step_size * grad / (l2_norm_keepdims(grad) + TINY)

    def _perturb(self, x, y, loss_fn):
        def body(i, x_adv):
            grad, _ = self.input_gradient(x_adv, y, loss_fn)
            return i + 1, project(self.step(x_adv, grad), x, self.eps, self.norm)

        # An explicit loop: Keras runs train_step without autograph.
        _, x_adv = tf.while_loop(lambda i, _: i < self.steps, body,
                                 (tf.constant(0), self.start(x)))
        return x_adv

    def __repr__(self):
        return (f"PGD(eps={self.eps:g}, step_size={self.step_size:g}, steps={self.steps}, "
                f"norm={self.norm!r}, random_start={self.random_start!r})")


class FGSM(PGD):
    """Fast gradient sign method: one step of size ε (Goodfellow et al., ICLR 2015).

    `x_adv = clip(x + ε·sign(∇ₓ L(x, y)), 0, 1)`; with `norm="l2"` the fast gradient
    method, `x + ε·∇/‖∇‖₂`. `random_start=True` gives FGSM-RS (Wong et al., ICLR 2020),
    which then needs `step_size` (their 1.25·ε) to be passed.

    Example:
        x_adv = FGSM(model, eps=0.1)(x, y)
    """

    def __init__(self, model, eps=8 / 255, step_size=None, random_start=False, **kwargs):
        super().__init__(model, eps, step_size=step_size or eps, steps=1,
                         random_start=random_start, **kwargs)
