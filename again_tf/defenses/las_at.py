"""LAS-AT (Jia et al., CVPR 2022): a strategy network picks each example's attack."""

import keras
import tensorflow as tf
from keras import ops

from again_tf import models
from again_tf.attacks import losses
from again_tf.attacks.policy_pgd import PolicyPGD, restart_pgd
from again_tf.defenses.base import Objective
from again_tf.heads import head_loss
from again_tf.distribute import (mean_over_replicas, scale_for_replicas,
                                 sum_over_replicas)
from again_tf.models.base import Classifier, forward


def parse_range(value, name):
    """`(3, 14)`, `[3, 14]` or `"3:14"` -> an inclusive `(low, high)` pair of ints >= 0."""
    parts = value.split(":") if isinstance(value, str) else list(value)
    try:
        low, high = (int(p) for p in parts)
    except (TypeError, ValueError):
        low = high = None
    if low is None or not 0 <= low <= high:
        raise ValueError(f"Expected `{name}` to be an inclusive range low:high of integers, "
                         f"0 <= low <= high, such as '3:14'. Received: {name}={value!r}")
    return low, high


def smoothed_cross_entropy(factor):
    """Cross-entropy with soft labels: `factor` on the label, (1 − factor)/(C − 1) elsewhere.

    The official LAS-AT `_label_smoothing` + `LabelSmoothLoss`, per example.
    """
    def loss(logits, labels):
        logits = tf.cast(logits, tf.float32)
        classes = tf.shape(logits)[-1]
        onehot = tf.one_hot(tf.cast(labels, tf.int32), classes)
        other = (1.0 - factor) / tf.cast(classes - 1, tf.float32)
        target = onehot * factor + (1.0 - onehot) * other
        return -tf.reduce_sum(target * tf.nn.log_softmax(logits, axis=-1), axis=-1)
    return loss


@keras.saving.register_keras_serializable(package="again_tf")
class StrategyNet(keras.layers.Layer):
    """A classifier backbone's pooled features followed by one Dense head per choice.

    The LAS-AT strategy network (official `ResNet18_Strategy`: a ResNet-18 trunk with a
    linear head per searched attack hyper-parameter).

    Args:
        backbone: an `again_tf.models.Classifier` (its `features` are used, its own
            classification head is not).
        head_sizes: the number of choices of each head, e.g. (12, 11, 4).

    Input shape: images `(batch, h, w, c)` in [0, 1]. Output: a list of logits
    `(batch, head_sizes[i])`.

    Example:
        net = StrategyNet(models.build("resnet18", 2), (12, 11, 4))
    """

    def __init__(self, backbone, head_sizes, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if not isinstance(backbone, Classifier):
            raise ValueError(f"Expected `backbone` to be an again_tf.models.Classifier. "
                             f"Received: {type(backbone).__name__}")
        self.backbone = backbone
        self.head_sizes = tuple(int(s) for s in head_sizes)
        self.heads = [keras.layers.Dense(s, name=f"head{i}") for i, s in enumerate(self.head_sizes)]

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(tuple(input_shape))
        features = self.backbone.forward(ops.zeros((1,) + tuple(input_shape[1:])))["features"]
        for head in self.heads:
            head.build((None, features.shape[-1]))

    def call(self, x, training=False):
        features = self.backbone.forward(x, training=training)["features"]
        return [head(features) for head in self.heads]

    def get_config(self):
        return {**super().get_config(), "head_sizes": self.head_sizes,
                "backbone": keras.saving.serialize_keras_object(self.backbone)}


@keras.saving.register_keras_serializable(package="again_tf")
class LASAT(Objective):
    """Learnable attack strategy adversarial training (LAS-PGD-AT). Name: `las_at`.

    Jia et al., "LAS-AT: Adversarial Training with Learnable Attack Strategy", CVPR 2022
    (official `LAS_PGD_AT/LAS_AT_train_cifar10.py`). A strategy network g looks at each
    clean image and samples, from softmax distributions, its attack's ε_i, step count
    K_i and step α_i from discrete ranges; the target model is trained on those
    `PolicyPGD` examples (g in inference mode) with label-smoothed cross-entropy (label
    weight `label_factor`, the rest shared by the other classes). Every `interval`-th
    train step, before the batch's attack, g is updated by REINFORCE (g in training
    mode): with actions a sampled for the batch,

        R1 = clip(mean CE(f(x_a), y), 0, 10)            x_a: the policy's examples, f eval
        f' = f after one SGD step on x_a (label-smoothed CE, the current lr, coupled
             weight decay, training mode: the official deep copy with a fresh
             SGD(momentum=0.9))
        R2 = clip(r2_scale · acc(f', PGD-10 with 2 restarts at ε, α = ε/4), −10, 10)
        R3 = clip(r3_scale · acc(f', x), −10, 10)
        R  = r1_weight·R1 + r2_weight·R2 + r3_weight·R3
        θ_g ← θ_g − policy_lr · clip_norm_{clip_norm}(∇ −R · Σ_heads mean_i log π(a_i))

    f' is made in place on f's own variables and restored bit for bit (variables and
    BatchNorm statistics) afterwards; the reward's PGD runs f' in training mode, keeps
    moving only examples it still classifies correctly and stops once none is, as the
    official `attack_pgd` does. Under tf.distribute every replica takes the same policy
    step: R1, R2, R3, f's step and the policy gradient are the global batch's
    (all-reduced), as on one device. The official search also has an "attack method" head
    with a single choice (IFGSM); its log-probability is always 0, so it is left out.

    Ranges are inclusive and, for ε and α, in units of ε/8 (the `AdversarialModel`'s ε),
    so that at ε = 8/255 they are the official values in /255. Only the L∞ threat model.
    The `AdversarialModel`'s `steps` is not used by the training attack (the policy
    chooses), its `step_size` only by its validation attack.

    Args:
        strategy: the strategy network's backbone, a name of `again_tf.models.MODELS`.
            Default "resnet18" (official `ResNet18_Strategy`).
        eps_range: ε choices, default "3:14" (official `--epsilon_types range(3, 15)`).
        steps_range: K choices, default "3:13" (official `--attack_iters_types
            range(3, 14)`).
        step_range: α choices, default "1:4" (official `--step_size_types range(1, 5)`).
        interval: strategy update every this many train steps. Default 20 (official
            `--interval_num`).
        policy_lr: the strategy network's SGD learning rate (no momentum). Default 1e-4
            (official `--policy_model_lr`, `SGD_without_momentum`; its milestone schedule
            is stepped once per update and never reaches a milestone).
        clip_norm: global gradient-norm clip of the strategy update. Default 1.0
            (official `--clip_grad_norm`).
        label_factor: label weight of the smoothed CE. Default 0.7 (official `--factor`).
        r1_weight, r2_weight, r3_weight: a, b, c. Default 1.0 each (official `--a/--b/--c`).
        r2_scale: Default 4.0 (official `--R2_param`). r3_scale: Default 2.0 (`--R3_param`).
        reward_steps: steps of the reward's PGD. Default 10. reward_restarts: its
            restarts. Default 2 (official `attack_pgd(..., 10, 2)`).
        seed: seed of the action sampling and of the reward PGD's starts.
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(wrn, defense="las_at", eps=8/255, weight_decay=5e-4)
    """

    name = "las_at"

    def __init__(self, strategy="resnet18", eps_range="3:14", steps_range="3:13",
                 step_range="1:4", interval=20, policy_lr=1e-4, clip_norm=1.0,
                 label_factor=0.7, r1_weight=1.0, r2_weight=1.0, r3_weight=1.0,
                 r2_scale=4.0, r3_scale=2.0, reward_steps=10, reward_restarts=2, seed=None,
                 aux_weight=2.0, **kwargs):
        super().__init__(aux_weight=aux_weight, **kwargs)
        if strategy not in models.MODELS:
            raise ValueError(f"Unknown strategy={strategy!r}. Expected one of: "
                             f"{', '.join(models.MODELS)}")
        self.strategy_name = strategy
        self.eps_range = parse_range(eps_range, "eps_range")
        self.steps_range = parse_range(steps_range, "steps_range")
        self.step_range = parse_range(step_range, "step_range")
        for name, value in (("interval", interval), ("reward_steps", reward_steps),
                            ("reward_restarts", reward_restarts)):
            if int(value) != value or value < 1:
                raise ValueError(f"Expected `{name}` to be an integer >= 1. "
                                 f"Received: {name}={value}")
        if not 0.0 < float(label_factor) <= 1.0:
            raise ValueError(f"Expected `label_factor` in (0, 1]. Received: "
                             f"label_factor={label_factor}")
        if float(policy_lr) <= 0 or float(clip_norm) <= 0:
            raise ValueError(f"Expected `policy_lr` > 0 and `clip_norm` > 0. Received: "
                             f"policy_lr={policy_lr}, clip_norm={clip_norm}")
        self.interval = int(interval)
        self.policy_lr, self.clip_norm = float(policy_lr), float(clip_norm)
        self.label_factor = float(label_factor)
        self.r1_weight, self.r2_weight, self.r3_weight = (
            float(r1_weight), float(r2_weight), float(r3_weight))
        self.r2_scale, self.r3_scale = float(r2_scale), float(r3_scale)
        self.reward_steps, self.reward_restarts = int(reward_steps), int(reward_restarts)
        self.seed = seed
        self.strategy = None
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.step = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                    trainable=False, name="step")
        self.target_loss = smoothed_cross_entropy(self.label_factor)

    # --- set-up: the AdversarialModel calls these --------------------------------------

    def attach(self, model):
        """Creates the strategy network for the target `model`."""
        mean, std = ((model.mean, model.std) if isinstance(model, Classifier)
                     else ((0.0,), (1.0,)))
        # Its BatchNorm follows the classifier's (synchronized or not under a strategy).
        backbone = models.build(self.strategy_name, 2, mean=mean, std=std,
                                sync_batchnorm=getattr(model, "sync_batchnorm", False))
        sizes = [high - low + 1 for low, high in (self.eps_range, self.steps_range,
                                                  self.step_range)]
        self.strategy = StrategyNet(backbone, sizes, name="strategy")

    def build(self, input_shape):
        if self.strategy is not None and not self.strategy.built:
            self.strategy.build(tuple(input_shape))
        self.built = True

    def make_attack(self, model, eps, step_size, steps, norm="linf", **kwargs):
        if norm != "linf":
            raise ValueError(f"LAS-AT searches L-inf attacks only. Received: norm={norm!r}")
        return PolicyPGD(model, eps, step_size, steps, norm=norm, **kwargs)

    # --- the policy -------------------------------------------------------------------

    def sample(self, head_logits):
        """One action index per example and head, sampled from softmax(logits)."""
        return [tf.cast(keras.random.categorical(tf.cast(l, tf.float32), 1,
                                                 seed=self.seed_generator)[:, 0], tf.int32)
                for l in head_logits]

    def policy_values(self, actions, eps):
        """(ε_i, α_i in pixel units, K_i) of the sampled `actions` (eps, steps, step heads)."""
        unit = eps / 8.0
        eps_i = unit * tf.cast(self.eps_range[0] + actions[0], tf.float32)
        steps_i = self.steps_range[0] + actions[1]
        alpha_i = unit * tf.cast(self.step_range[0] + actions[2], tf.float32)
        return eps_i, alpha_i, steps_i

    def adversarial_examples(self, model, attack, x, y):
        actions = self.sample(self.strategy(x, training=False))
        eps_i, alpha_i, steps_i = self.policy_values(actions, attack.eps)
        return attack.perturb_policy(x, y, eps_i, alpha_i, steps_i, self.attack_loss(model, x, y))

    def loss(self, model, x, x_adv, y):
        outputs = self.outputs(model, x_adv, y, training=True, partner=x)
        return head_loss(outputs, y, self.target_loss, self.aux_weight), outputs["logits"]

    # --- the strategy update (REINFORCE) ------------------------------------------------

    @property
    def periodic_interval(self):
        return self.interval

    def before_attack(self, adv_model, x, y):
        """Every `interval`-th call, one REINFORCE step of the strategy network."""
        step = self.step.assign_add(1)
        if self.periodic_due is None:  # traced outside `fit`: decided in-graph
            tf.cond(tf.equal(step % self.interval, 0),
                    lambda: self.update_strategy(adv_model, x, y), lambda: tf.constant(0.0))
        elif self.periodic_due:
            with tf.control_dependencies([step]):
                self.update_strategy(adv_model, x, y)

    def update_strategy(self, adv_model, x, y):
        """Samples actions for `(x, y)`, scores them, takes one policy-gradient step.

        Returns the reward R.
        """
        variables = self.strategy.trainable_variables
        with tf.GradientTape() as tape:
            head_logits = self.strategy(x, training=True)
            actions = [tf.stop_gradient(a) for a in self.sample(head_logits)]
            log_prob = tf.add_n([
                -tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=a, logits=tf.cast(l, tf.float32)))
                for a, l in zip(actions, head_logits)])
            log_prob = scale_for_replicas(log_prob)
        reward = tf.stop_gradient(self.reward(adv_model, x, y, actions))
        # every replica takes the same step: the global batch's gradient and reward
        grads = sum_over_replicas(tape.gradient(log_prob, variables))
        pairs = [(-reward * g, v) for g, v in zip(grads, variables) if g is not None]
        clipped, _ = tf.clip_by_global_norm([g for g, _ in pairs], self.clip_norm)
        for g, (_, v) in zip(clipped, pairs):
            v.assign_sub(self.policy_lr * g)
        return reward

    def reward(self, adv_model, x, y, actions):
        """R = a·R1 + b·R2 + c·R3 of the batch for `actions` (see the class docstring)."""
        model, attack = adv_model.model, adv_model.attack
        labels = tf.cast(y, tf.int64)
        eps_i, alpha_i, steps_i = self.policy_values(actions, attack.eps)
        x_policy = attack.perturb_policy(x, y, eps_i, alpha_i, steps_i)
        policy_logits = forward(model, x_policy, training=False)["logits"]
        r1 = tf.clip_by_value(mean_over_replicas(tf.reduce_mean(
            losses.cross_entropy(policy_logits, y))), 0.0, 10.0)

        variables = model.trainable_variables
        state = model.non_trainable_weights
        saved = [tf.identity(v) for v in variables + state]
        with tf.control_dependencies(saved + [r1]):
            with tf.GradientTape() as tape:
                logits = forward(model, x_policy, training=True)["logits"]
                step_loss = scale_for_replicas(tf.reduce_mean(self.target_loss(logits, y)))
            grads = sum_over_replicas(tape.gradient(step_loss, variables))
            lr = tf.cast(adv_model.optimizer.learning_rate, tf.float32)
            updates = [v.assign_sub(lr * (g + adv_model.weight_decay * v))
                       for g, v in zip(grads, variables) if g is not None]
        with tf.control_dependencies(updates):
            x_pgd = self.reward_pgd(model, x, y, attack.eps)
            robust = mean_over_replicas(tf.reduce_mean(tf.cast(tf.equal(tf.argmax(
                forward(model, x_pgd, training=False)["logits"], -1), labels), tf.float32)))
            clean = mean_over_replicas(tf.reduce_mean(tf.cast(tf.equal(tf.argmax(
                forward(model, x, training=False)["logits"], -1), labels), tf.float32)))
        with tf.control_dependencies([robust, clean]):
            restored = [v.assign(s) for v, s in zip(variables + state, saved)]
        with tf.control_dependencies(restored):
            r2 = tf.clip_by_value(robust * self.r2_scale, -10.0, 10.0)
            r3 = tf.clip_by_value(clean * self.r3_scale, -10.0, 10.0)
            return self.r1_weight * r1 + self.r2_weight * r2 + self.r3_weight * r3

    def reward_pgd(self, model, x, y, eps):
        """The official `attack_pgd` (`attacks.policy_pgd.restart_pgd`): PGD on CE with the
        model in training mode, ε/4 steps, `reward_restarts` restarts from `reward_start`."""
        return restart_pgd(model, x, y, eps, self.reward_steps, self.reward_restarts,
                           lambda z: self.reward_start(z, eps))

    def reward_start(self, x, eps):
        """A random start of the reward's PGD: uniform in the ε-ball, in [0, 1]."""
        noise = keras.random.uniform(tf.shape(x), -eps, eps, seed=self.seed_generator)
        return tf.clip_by_value(x + noise, 0.0, 1.0)

    def get_config(self):
        def joined(pair):
            return f"{pair[0]}:{pair[1]}"
        return {**super().get_config(), "strategy": self.strategy_name,
                "eps_range": joined(self.eps_range), "steps_range": joined(self.steps_range),
                "step_range": joined(self.step_range), "interval": self.interval,
                "policy_lr": self.policy_lr, "clip_norm": self.clip_norm,
                "label_factor": self.label_factor, "r1_weight": self.r1_weight,
                "r2_weight": self.r2_weight, "r3_weight": self.r3_weight,
                "r2_scale": self.r2_scale, "r3_scale": self.r3_scale,
                "reward_steps": self.reward_steps, "reward_restarts": self.reward_restarts,
                "seed": self.seed}
