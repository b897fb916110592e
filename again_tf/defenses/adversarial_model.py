"""`AdversarialModel`: any Keras classifier, trained by `fit` on adversarial examples."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.pgd import PGD
from again_tf.defenses import registry
from again_tf.defenses.base import Objective
from again_tf.models.base import Classifier, forward


class EpochCallback(keras.callbacks.Callback):
    """Calls `set_epoch(epoch)` (0-based) of each defense piece at every epoch's start.

    Epoch schedules (FAT's τ, AWP's warm-up) live in variables of those pieces, so they
    are checkpointed; `AdversarialModel.fit` adds this callback itself.
    """

    def __init__(self, pieces):
        super().__init__()
        self.pieces = list(pieces)

    def on_epoch_begin(self, epoch, logs=None):
        for piece in self.pieces:
            piece.set_epoch(epoch)


def scale_for_replicas(loss):
    """Divides a replica's mean loss by the replica count: Keras sums replica gradients."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / replicas if replicas > 1 else loss


@keras.saving.register_keras_serializable(package="again_tf")
class AdversarialModel(keras.Model):
    """Wraps a classifier so that `fit` trains it with a defense and `evaluate` attacks it.

    `train_step` crafts adversarial examples for each batch with the defense's attack
    and takes one optimizer step on the defense's loss; `test_step` reports clean
    `accuracy`, `loss` and the PGD `robust_accuracy`, so `fit(validation_data=...)` logs
    `val_robust_accuracy` for ModelCheckpoint/EarlyStopping/CSVLogger/TensorBoard.
    Data are plain `(x, y)` or `(x, y, sample_weight)` batches, x in [0, 1].

    Args:
        model: the classifier (logits out). An `again_tf.models.Classifier` also gives
            auxiliary heads and features to the defenses that use them.
        defense: a defense name (see `again_tf.defenses.names()`) or an `Objective`.
        eps: ε of the training attack and of the validation attack, pixel units.
        step_size: PGD step α. Default ε/4.
        steps: PGD steps of the training attack. Default 10.
        norm: "linf" or "l2".
        eval_steps: PGD steps of the validation attack (0 disables it). Default 10.
        eval_step_size: its step. Default `step_size`.
        attack_training: BatchNorm mode of the training attack (default inference mode,
            as in the AWP and TRADES code's `model.eval()` during the attack); the
            model's statistics are never changed by the attack either way.
        weight_decay: coupled L2 decay added to every gradient, `g + wd·w`, for all
            trainable variables of `model`, as `torch.optim.SGD(weight_decay=...)` in the papers'
            code does (Keras' own optimizer `weight_decay` is decoupled, a different
            quantity under momentum). Default 0.
        modifiers: extra `Modifier`s, after those the defense name brings.
        seed: seed of the attacks' random starts.
        **hparams: the defense's hyper-parameters (e.g. `beta=6.0` for TRADES).

    Example:
        adv = AdversarialModel(model, defense="pgd_at", eps=0.1, step_size=0.01)
        adv.compile(optimizer=keras.optimizers.Adam(1e-3))
        adv.fit(train_ds, validation_data=test_ds, epochs=5)
    """

    def __init__(self, model, defense="pgd_at", eps=8 / 255, step_size=None, steps=10,
                 norm="linf", eval_steps=10, eval_step_size=None, attack_training=False,
                 weight_decay=0.0, modifiers=(), seed=None, **hparams):
        name = hparams.pop("name", None)
        super().__init__(name=name, **{k: hparams.pop(k) for k in ("dtype", "trainable")
                                       if k in hparams})
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        self.model = model
        if isinstance(defense, Objective):
            self.objective, self.modifiers = defense, list(modifiers)
            self.defense_name = defense.name
        else:
            self.objective, self.modifiers = registry.get(defense, **hparams)
            self.modifiers += list(modifiers)
            self.defense_name = defense
        if hasattr(self.objective, "attach"):  # e.g. LBGAT creates its teacher from `model`
            self.objective.attach(model)
        self._insert_layers()
        self.hparams = dict(hparams)
        self.eps, self.steps, self.norm, self.seed = float(eps), int(steps), norm, seed
        self.step_size = float(step_size) if step_size else self.eps / 4
        self.eval_steps = int(eval_steps)
        self.eval_step_size = float(eval_step_size) if eval_step_size else self.step_size
        self.attack_training = bool(attack_training)
        self.weight_decay = float(weight_decay)
        make_attack = getattr(self.objective, "make_attack", PGD)  # FAT: early-stopped PGD
        self.attack = make_attack(model, self.eps, self.step_size, self.steps, norm=norm,
                                  training=self.attack_training, seed=seed,
                                  **self.objective.attack_options)
        self.eval_attack = None
        if self.eval_steps > 0:
            self.eval_attack = PGD(model, self.eps, self.eval_step_size, self.eval_steps,
                                   norm=norm, seed=None if seed is None else seed + 1)
        trained_on = "adv_accuracy" if self.objective.uses_attack else "accuracy"
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name=trained_on)
        self.val_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.robust_accuracy = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")

    def _insert_layers(self):
        for m in self.modifiers:
            layers = m.inserts(self.model)
            if not layers:
                continue
            if not isinstance(self.model, Classifier) or self.model.built:
                raise ValueError(
                    f"Modifier {m.name!r} inserts layers, which needs an unbuilt "
                    f"again_tf.models.Classifier; received a built {type(self.model).__name__}")
            clash = set(layers) & set(self.model.inserts)
            if clash:
                raise ValueError(f"Modifier {m.name!r} inserts at {sorted(clash)}, where the "
                                 f"model already has a layer")
            self.model.inserts.update(layers)
            self.model._check_inserts()

    def callbacks(self):
        """The Keras callbacks the defense needs (its epoch schedules); `fit` adds them."""
        pieces = [p for p in [self.objective] + self.modifiers if hasattr(p, "set_epoch")]
        return [EpochCallback(pieces)] if pieces else []

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        """`keras.Model.fit`, with `callbacks()` added unless an `EpochCallback` is given."""
        callbacks = list(callbacks or [])
        if not any(isinstance(c, EpochCallback) for c in callbacks):
            callbacks += self.callbacks()
        return super().fit(x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                           callbacks=callbacks, **kwargs)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker, self.val_accuracy, self.robust_accuracy]

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        for piece in [self.objective] + self.modifiers:
            if not piece.built:
                piece.build(input_shape)
        self.built = True

    def call(self, x, training=False):
        return self.model(x, training=training)

    def batch_loss(self, x, x_adv, y, sample_weight=None):
        """The replica's contribution to the global mean loss, and the logged logits."""
        per_example, logits = self.objective.loss(self.model, x, x_adv, y)
        weights = sample_weight
        for m in self.modifiers:
            w = m.example_weights(self, x, x_adv, y)
            if w is not None:
                weights = w if weights is None else weights * w
        if weights is not None:
            per_example = per_example * tf.cast(weights, per_example.dtype)
        return tf.reduce_mean(per_example), logits

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.convert_to_tensor(x, tf.float32)
        if not self.built:  # Keras builds on the first trace when no strategy is set
            self.build(tuple(x.shape))
        if hasattr(self.objective, "before_attack"):  # e.g. LAS-AT's policy update
            self.objective.before_attack(self, x, y)
        x_adv = self.objective.adversarial_examples(self.model, self.attack, x, y)
        for m in self.modifiers:
            m.before_gradient(self, lambda: self.batch_loss(x, x_adv, y, sample_weight)[0])
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, logits = self.batch_loss(x, x_adv, y, sample_weight)
            total = loss
            if self.weight_decay:
                # d/dw of wd/2·‖w‖² is wd·w: torch's coupled decay, correct under replicas
                # and loss scaling because it goes through the same path as the loss.
                decayed = self.model.trainable_variables + list(
                    getattr(self.objective, "decayed_variables", []))  # e.g. LBGAT's teacher
                total += 0.5 * self.weight_decay * tf.add_n(
                    [tf.reduce_sum(tf.square(v)) for v in decayed])
            scaled = self.optimizer.scale_loss(scale_for_replicas(total))
        grads = tape.gradient(scaled, variables)
        if not self.optimizer.built:  # on all of them, as a resumed run builds it
            self.optimizer.build(variables)
        # Variables the loss does not reach (e.g. a strategy net trained its own way).
        grads, variables = zip(*[(g, v) for g, v in zip(grads, variables) if g is not None])
        for m in reversed(self.modifiers):
            m.after_gradient(self)
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(y, logits)
        return {m.name: m.result() for m in (self.loss_tracker, self.accuracy_tracker)}

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.convert_to_tensor(x, tf.float32)
        if not self.built:
            self.build(tuple(x.shape))
        logits = forward(self.model, x, training=False)["logits"]
        self.loss_tracker.update_state(tf.reduce_mean(losses.cross_entropy(logits, y)))
        self.val_accuracy.update_state(y, logits)
        result = [self.loss_tracker, self.val_accuracy]
        if self.eval_attack is not None:
            x_adv = self.eval_attack.perturb(x, y)
            self.robust_accuracy.update_state(
                y, forward(self.model, x_adv, training=False)["logits"])
            result.append(self.robust_accuracy)
        return {m.name: m.result() for m in result}

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            defense=self.defense_name, eps=self.eps, step_size=self.step_size,
            steps=self.steps, norm=self.norm, eval_steps=self.eval_steps,
            eval_step_size=self.eval_step_size, attack_training=self.attack_training,
            weight_decay=self.weight_decay, seed=self.seed, **self.hparams)
        return config
