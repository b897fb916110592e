"""Adversarial weight perturbation (Wu et al., NeurIPS 2020) as a `Modifier` of any objective."""

import keras
import tensorflow as tf

from again_tf.defenses.base import Modifier
from again_tf.distribute import num_replicas, scale_for_replicas, sum_over_replicas

# The official `diff_in_weights`: ‖w‖ / (‖d‖ + 1e-20) · d.
_EPS = 1e-20


@keras.saving.register_keras_serializable(package="again_tf")
class AWP(Modifier):
    """Takes each gradient at adversarially perturbed weights w + v, then removes v exactly.

    Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
    NeurIPS 2020. Each train step, for every weight tensor w of rank ≥ 2 of the model
    (convolution and dense kernels, those of inserted layers included; biases and
    BatchNorm parameters, rank 1, are not perturbed, as the official `diff_in_weights`
    skips tensors with `dim() <= 1`):

        d = η · ∇_w L(w)                          (one SGD ascent step of a proxy, lr η)
        v = γ · ‖w‖ / (‖d‖ + 1e-20) · d            (‖·‖: Frobenius norm of that tensor)
        w ← w + v;  g = ∇_w [L(w + v)];  w ← w (restored by assignment, bit for bit);
        optimizer.apply(g)

    where L is the objective's batch loss (the official code's loss on the proxy: CE on
    x_adv for PGD-AT, the TRADES loss for TRADES). The official code copies the model into
    a proxy, takes one `SGD(lr=η)` step on −L and uses the weight difference d = proxy − w;
    here d is computed directly as η·∇L on the same weights — mathematically identical,
    the proxy step being plain SGD with no momentum or decay — and the model's BatchNorm
    statistics, which the proxy's training-mode forward pass would move only in the
    discarded copy, are saved and restored around it. So after a train step the weights
    are exactly `w − update(g)`. Coupled weight decay, if any, sees w + v, as torch's
    `SGD(weight_decay)` does when it steps the perturbed weights.

    The perturbation starts at epoch `awp_warmup` (0-based): the epoch comes from the
    `AdversarialModel`'s epoch callback (`AdversarialModel.fit` adds it), and is stored in
    this layer's `epoch` variable so it is checkpointed.

    Args:
        gamma: γ, the relative size of the perturbation. Default 0.01 (official AT-AWP
            `--awp-gamma`; TRADES-AWP uses 0.005, the `trades_awp` default).
        awp_warmup: number of initial epochs trained without AWP. Default 0 (official
            AT-AWP `--awp-warmup 0`). The official TRADES-AWP code counts epochs from 1
            and perturbs when `epoch >= 10`, i.e. after 9 epochs: `awp_warmup=9`.
        proxy_lr: η, the proxy's SGD learning rate. Default 0.01 (official AT-AWP); it only
            scales d, so it changes v only through the 1e-20 guard.

    Example:
        adv = AdversarialModel(model, defense="trades", modifiers=[AWP(gamma=0.005)])
        # the same as AdversarialModel(model, defense="trades_awp", awp_warmup=0)
    """

    name = "awp"

    def __init__(self, gamma=0.01, awp_warmup=0, proxy_lr=0.01, **kwargs):
        super().__init__(**kwargs)
        if float(gamma) < 0:
            raise ValueError(f"Expected `gamma` >= 0. Received: gamma={gamma}")
        if int(awp_warmup) != awp_warmup or awp_warmup < 0:
            raise ValueError(f"Expected `awp_warmup` to be an integer >= 0 (epochs). "
                             f"Received: awp_warmup={awp_warmup}")
        if float(proxy_lr) <= 0:
            raise ValueError(f"Expected `proxy_lr` > 0. Received: proxy_lr={proxy_lr}")
        self.gamma = float(gamma)
        self.awp_warmup = int(awp_warmup)
        self.proxy_lr = float(proxy_lr)
        self.epoch = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                     trainable=False, name="epoch")

    def set_epoch(self, epoch):
        """Called at each epoch's start by the `AdversarialModel`'s callback."""
        self.epoch.assign(int(epoch))

    @staticmethod
    def perturbed_variables(adv_model):
        """The model's trainable tensors of rank ≥ 2."""
        return [v for v in adv_model.model.trainable_variables if len(v.shape) >= 2]

    def perturbation(self, adv_model, loss_fn, variables):
        """v for each of `variables`, from one ascent step on `loss_fn()` at the current w,
        and whether that step's gradient was finite (v is zero where it was not)."""
        state = adv_model.model.non_trainable_weights + adv_model.objective.non_trainable_weights
        saved_state = [tf.identity(s) for s in state]
        with tf.GradientTape() as tape:
            # The global batch's gradient on every replica, so all apply the same v; the
            # loss scale (mixed float16) keeps the gradient from underflowing, and cancels in v.
            loss = adv_model.optimizer.scale_loss(scale_for_replicas(loss_fn()))
        grads = sum_over_replicas(tape.gradient(loss, variables))
        reached = [g for g in grads if g is not None]
        # Under a dynamic loss scale the scaled gradient overflows now and then (trades_awp's
        # first step did, the scale starting at 2^15): v would be NaN, and the forward pass at
        # w + v would write NaN into the BatchNorm moving statistics for good.
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in reached])
        with tf.control_dependencies(reached):
            restored = [s.assign(v) for s, v in zip(state, saved_state)]
        with tf.control_dependencies(restored):
            deltas = []
            for w, g in zip(variables, grads):
                if g is None:
                    deltas.append(tf.zeros_like(w))
                    continue
                d = self.proxy_lr * tf.cast(g, w.dtype)
                v = self.gamma * tf.norm(w) / (tf.norm(d) + _EPS) * d
                deltas.append(tf.where(finite, v, tf.zeros_like(v)))
            return deltas, finite

    def gradients(self, adv_model, loss_fn, take_gradients):
        """`take_gradients()` at w + v; w is put back (by assignment, bit for bit) once
        the gradients are taken, before anything else reads the weights."""
        variables = self.perturbed_variables(adv_model)
        saved = [tf.identity(v) for v in variables]
        with tf.control_dependencies(saved):
            if num_replicas() > 1:  # a cross-replica sum cannot sit inside tf.cond
                on = self.epoch >= self.awp_warmup
                deltas, finite = self.perturbation(adv_model, loss_fn, variables)
                deltas = [tf.where(on, d, tf.zeros_like(d)) for d in deltas]
                finite = tf.logical_or(tf.logical_not(on), finite)
            else:
                deltas, finite = tf.cond(self.epoch >= self.awp_warmup,
                                         lambda: self.perturbation(adv_model, loss_fn, variables),
                                         lambda: ([tf.zeros_like(v) for v in variables],
                                                  tf.constant(True)))
        perturbed = [v.assign_add(d) for v, d in zip(variables, deltas)]
        with tf.control_dependencies(perturbed):
            grads, logs = take_gradients()
        taken = [g for g in tf.nest.flatten((grads, logs)) if g is not None]
        with tf.control_dependencies(taken):
            restored = [v.assign(s) for v, s in zip(variables, saved)]
        with tf.control_dependencies(restored):
            # A step whose v could not be computed is not taken: its gradient is made
            # non-finite, so a LossScaleOptimizer skips it and lowers the scale, exactly as
            # for an overflow of the step's own gradient.
            grads = [None if g is None else tf.where(finite, g, tf.constant(float("nan"), g.dtype))
                     for g in grads]
            return grads, tf.nest.map_structure(tf.identity, logs)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "awp_warmup": self.awp_warmup,
                "proxy_lr": self.proxy_lr}
