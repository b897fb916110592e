"""Friendly adversarial training (Zhang et al., ICML 2020): early-stopped PGD."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.early_stopped_pgd import EarlyStoppedPGD
from again_tf.defenses.pgd_at import PGDAT
from again_tf.defenses.trades import TRADES, fixed, kl_divergence
from again_tf.heads import head_loss, paired_head_loss


def parse_milestones(value, name="tau_milestones"):
    """`(50, 90)`, `[50, 90]`, `"50:90"`, `50` or `""`/`"none"` -> a sorted tuple of ints."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    if isinstance(value, str):
        parts = value.replace(",", ":").split(":")
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        out = None
    if out is None or any(m < 0 for m in out):
        raise ValueError(f"Expected `{name}` to be epochs >= 0 such as (50, 90) or '50:90'. "
                         f"Received: {name}={value!r}")
    return tuple(sorted(out))


class _TauSchedule:
    """FAT's epoch-dependent τ, shared by `FAT` and `FATTRADES` (mixed into Objectives)."""

    def _init_schedule(self, tau, tau_milestones, omega):
        if int(tau) != tau or tau < 0:
            raise ValueError(f"Expected `tau` to be an integer >= 0. Received: tau={tau}")
        if float(omega) < 0:
            raise ValueError(f"Expected `omega` >= 0. Received: omega={omega}")
        self.tau = int(tau)
        self.tau_milestones = parse_milestones(tau_milestones)
        self.omega = float(omega)
        self.epoch = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                     trainable=False, name="epoch")

    def set_epoch(self, epoch):
        """Called at each epoch's start by the `AdversarialModel`'s callback."""
        self.epoch.assign(int(epoch))

    def current_tau(self):
        """τ + #{milestones m : epoch + 1 > m} (the official `adjust_tau(epoch + 1)`)."""
        tau = tf.constant(self.tau, tf.int32)
        if self.tau_milestones:
            passed = self.epoch + 1 > tf.constant(self.tau_milestones, tf.int32)
            tau += tf.reduce_sum(tf.cast(passed, tf.int32))
        return tau

    def make_attack(self, model, eps, step_size, steps, **kwargs):
        """The `AdversarialModel`'s training attack: early-stopped PGD at the current τ."""
        return EarlyStoppedPGD(model, eps, step_size, steps, tau=self.current_tau,
                               omega=self.omega, **kwargs)

    def schedule_config(self):
        return {"tau": self.tau, "tau_milestones": list(self.tau_milestones),
                "omega": self.omega}


@keras.saving.register_keras_serializable(package="again_tf")
class FAT(_TauSchedule, PGDAT):
    """Friendly adversarial training for PGD-AT: CE on early-stopped PGD examples. Name: `fat`.

    Zhang et al., "Attacks Which Do Not Kill Training Make Adversarial Learning
    Stronger", ICML 2020 (official `FAT.py`). The loss is PGD-AT's, CE(f(x_adv), y);
    x_adv comes from `EarlyStoppedPGD` on CE from a uniform random start with noise ω
    per step, and τ grows with the epoch: τ(e) = `tau` + #{m in `tau_milestones` :
    e > m}, e counted from 1 (official dynamic τ: 0 up to epoch 50, 1 up to 90, 2 after).
    The epoch is this layer's `epoch` variable, set by the `AdversarialModel`'s epoch
    callback and checkpointed.

    Args:
        tau: τ before the first milestone. Default 0 (official `--tau`).
        tau_milestones: epochs after which τ grows by one, as a tuple or a string "50:90"
            ("" for a constant τ). Default (50, 90) (official `adjust_tau` of `FAT.py`).
        omega: ω of `EarlyStoppedPGD`. Default 0.001 (official `FAT.py --omega`).
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(model, defense="fat", eps=8/255, step_size=0.007, steps=10)
        adv.compile(optimizer="sgd"); adv.fit(train_ds, epochs=120)   # τ follows the epochs
    """

    name = "fat"

    def __init__(self, tau=0, tau_milestones=(50, 90), omega=0.001, aux_weight=2.0, **kwargs):
        super().__init__(aux_weight=aux_weight, **kwargs)
        self._init_schedule(tau, tau_milestones, omega)

    def attack_loss(self, model, x, y):
        """CE of all heads and the main logits, from one forward pass."""
        def loss_fn(x_adv, labels):
            outputs = self.outputs(model, x_adv, labels, training=False)
            return (head_loss(outputs, labels, losses.cross_entropy, self.aux_weight),
                    outputs["logits"])
        return loss_fn

    def get_config(self):
        return {**super().get_config(), **self.schedule_config()}


@keras.saving.register_keras_serializable(package="again_tf")
class FATTRADES(_TauSchedule, TRADES):
    """Friendly adversarial training for TRADES. Name: `fat_trades`.

    Zhang et al., ICML 2020 (official `FAT_for_TRADES.py`): the TRADES loss (see
    `TRADES`) on x_adv from `EarlyStoppedPGD` maximizing KL(f(x) ‖ f(x_adv)) with the
    clean outputs fixed, started at x + 0.001·N(0, I), τ following the epoch as in `FAT`.

    Args:
        beta: β of TRADES. Default 6.0 (official `FAT_for_TRADES.py --beta`).
        tau: τ before the first milestone. Default 0.
        tau_milestones: default (30, 50, 70) (official `adjust_tau` of
            `FAT_for_TRADES.py`: τ = 0 up to epoch 30, 1 up to 50, 2 up to 70, then 3).
        omega: default 0.0 (official `FAT_for_TRADES.py --omega`).
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(model, defense="fat_trades", beta=6.0)
    """

    name = "fat_trades"

    def __init__(self, beta=6.0, tau=0, tau_milestones=(30, 50, 70), omega=0.0, aux_weight=2.0,
                 **kwargs):
        super().__init__(beta=beta, aux_weight=aux_weight, **kwargs)
        self._init_schedule(tau, tau_milestones, omega)

    def attack_loss(self, model, x, y):
        """KL(f(x) ‖ f(x_adv)) of all heads, clean outputs fixed, and the main logits."""
        clean = fixed(self.outputs(model, x, y, training=False))

        def loss_fn(x_adv, labels):
            adversarial = self.outputs(model, x_adv, labels, training=False)
            kl = paired_head_loss(clean, adversarial, labels,
                                  lambda p, q, _: kl_divergence(p, q), self.aux_weight)
            return kl, adversarial["logits"]
        return loss_fn

    def get_config(self):
        return {**super().get_config(), **self.schedule_config()}
