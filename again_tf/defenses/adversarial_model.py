"""`AdversarialModel`: any Keras classifier, trained by `fit` on adversarial examples."""

import functools
import warnings

import keras
import numpy as np
import tensorflow as tf

from again_tf import heads, onednn
from again_tf.attacks import losses
from again_tf.attacks.base import (PROBABILITIES_WARNING, check_images, check_labels,
                                   looks_like_probabilities)
from again_tf.attacks.pgd import PGD
from again_tf.defenses import registry
from again_tf.defenses.base import Objective
from again_tf.distribute import scale_for_replicas, step_logs
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


def _already_inserted(model, layers):
    """True if `model` holds, at every point of `layers`, a layer of the same class and
    configuration: the classifier of a saved AdversarialModel comes back with them."""
    def setting(config):  # without a built sub-layer's input shape and Keras' saving ids
        if isinstance(config, dict):
            return {k: setting(v) for k, v in config.items()
                    if k not in ("build_config", "shared_object_id")}
        if isinstance(config, (list, tuple)):
            return [setting(v) for v in config]
        return config

    existing = getattr(model, "inserts", None) or {}
    return all(point in existing and type(existing[point]) is type(layer)
               and setting(existing[point].get_config()) == setting(layer.get_config())
               for point, layer in layers.items())


@keras.saving.register_keras_serializable(package="again_tf")
class AdversarialModel(keras.Model):
    """Wraps a classifier so that `fit` trains it with a defense and `evaluate` attacks it.

    `train_step` crafts adversarial examples for each batch with the defense's attack
    and takes one optimizer step on the defense's loss; `test_step` reports clean
    `accuracy`, `loss` and the PGD `robust_accuracy`, so `fit(validation_data=...)` logs
    `val_robust_accuracy` for ModelCheckpoint/EarlyStopping/CSVLogger/TensorBoard.
    Data are plain `(x, y)` or `(x, y, sample_weight)` batches, x in [0, 1]. A defense
    with a piece whose `uses_index` is True (BAT) reads the third element as each
    example's integer index into the training split instead (`data.load(...,
    with_index=True)`), and that piece's `loss`/`example_weights` receive it as `index=`.

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
        attack_training: BatchNorm mode of the training attack. Default False:
            inference mode, as the TRADES, MART, TRADES-AWP (trades_AWP), CAS, CIFS and
            AGAIN code (`model.eval()` during the attack). True: batch statistics, as the
            AWP repository's AT_AWP/train_cifar10.py (its PGD-AT and AT-AWP), which calls
            `model.train()` only after `attack_pgd` (`--attack_training` in their
            recipes). The attack leaves the model's running statistics as they were
            unless `attack_updates_statistics`.
        attack_updates_statistics: with `attack_training`, let every attack iterate's
            forward pass update the BatchNorm running statistics, as the official
            train-mode attack does (the statistics then average the clean-ish early
            iterates with the adversarial ones, and depend on the number of steps).
            Default False; the AWP repository's recipes set it.
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
                 attack_updates_statistics=False, weight_decay=0.0, modifiers=(), seed=None,
                 **hparams):
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
        self.objective.attach(model)
        self._insert_layers()
        self.hparams = dict(hparams)
        self.eps, self.steps, self.norm, self.seed = float(eps), int(steps), norm, seed
        self.step_size = float(step_size) if step_size else self.eps / 4
        self.eval_steps = int(eval_steps)
        self.eval_step_size = float(eval_step_size) if eval_step_size else self.step_size
        self.attack_training = bool(attack_training)
        if attack_updates_statistics and not self.attack_training:
            raise ValueError("AdversarialModel: `attack_updates_statistics=True` needs "
                             "`attack_training=True` (an inference-mode attack writes no "
                             "statistics)")
        self.attack_updates_statistics = bool(attack_updates_statistics)
        self.weight_decay = float(weight_decay)
        self.attack = self.objective.make_attack(model, self.eps, self.step_size, self.steps, norm=norm,
                                  training=self.attack_training, seed=seed,
                                  update_statistics=self.attack_updates_statistics,
                                  **self.objective.attack_options)
        self.eval_attack = None
        if self.eval_steps > 0:
            self.eval_attack = PGD(model, self.eps, self.eval_step_size, self.eval_steps,
                                   norm=norm, seed=None if seed is None else seed + 1)
        trained_on = "adv_accuracy" if self.objective.uses_attack else "accuracy"
        if getattr(model, "inserts", None):
            # Label-conditioned masks (ASE, CAS) see the true labels while training, so this
            # number runs near 1.0 and is no robustness: the name says so. The inference-path
            # robust accuracy is val_robust_accuracy.
            trained_on += "_label_masked"
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name=trained_on)
        self.val_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.robust_accuracy = keras.metrics.SparseCategoricalAccuracy(name="robust_accuracy")

    def _insert_layers(self):
        for m in self.modifiers:
            layers = m.inserts(self.model)
            if not layers:
                continue
            if _already_inserted(self.model, layers):
                continue  # a reloaded model (load_model, from_config) holds them already
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
        if isinstance(self.model, Classifier) and self.model.inserts:
            # Saved with the classifier: evaluation attacks the loss it was trained on.
            self.model.aux_weight = getattr(self.objective, "aux_weight", None)

    @property
    def uses_index(self):
        """True if a piece of the defense (e.g. BAT) reads a third batch element as an index."""
        return any(p.uses_index for p in [self.objective] + self.modifiers)

    def callbacks(self, validation_data=None):
        """The Keras callbacks the defense needs (its epoch schedules); `fit` adds them.

        Each piece's `make_callbacks(adv_model, validation_data)` adds its own
        (e.g. the class-wise defense's epoch-end update on the held-out data).
        """
        pieces = [self.objective] + self.modifiers
        out = [EpochCallback(pieces)]
        for p in pieces:
            out += list(p.make_callbacks(self, validation_data))
        return out

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """`keras.Model.compile` for the optimizer (and `jit_compile`, ...). The defense
        owns the loss and the logged accuracies, so `loss`, `metrics` and
        `weighted_metrics` are refused rather than silently unused."""
        given = [name for name, value in (("loss", loss), ("metrics", metrics),
                                          ("weighted_metrics", kwargs.get("weighted_metrics")))
                 if value is not None]
        if given:
            raise ValueError(
                f"AdversarialModel.compile: {', '.join(given)} would not be used: the defense "
                f"({self.defense_name!r}) owns the loss and logs its own accuracies; pass only "
                f"the optimizer (choose the loss with `defense=`)")
        super().compile(optimizer=optimizer, **kwargs)

    def get_compile_config(self):
        return super().get_compile_config()

    def compile_from_config(self, config):
        """Compiles a loaded model as it was saved (Keras skips this for a model whose
        `compile` is overridden unless these two are too)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        """`keras.Model.fit`, with `callbacks()` added unless an `EpochCallback` is given.

        They run before the caller's callbacks, so that a checkpoint or logger called at an
        epoch's end sees the defense's state after that epoch (e.g. updated class weights).
        """
        if isinstance(x, tf.data.Dataset):
            # A dataset shuffles itself (`data.pipeline`); Keras' default shuffle=True
            # would only warn that it is ignored.
            kwargs.setdefault("shuffle", False)
        self._check_fit_inputs(x, y)
        self._build_before_tracing(x)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, EpochCallback) for c in callbacks):
            callbacks = self.callbacks(kwargs.get("validation_data")) + callbacks
        return super().fit(x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                           callbacks=callbacks, **kwargs)

    def make_train_function(self, force=False):
        """Keras' train function; two compiled steps for an objective's periodic update.

        With `objective.periodic_interval` set (LAS-AT), the steps where the update is due
        and the others are traced separately and picked on the host from the objective's
        `step` counter, one step per call (`steps_per_execution=1`).
        """
        interval = self.objective.periodic_interval
        if (not interval or self.steps_per_execution != 1
                or not hasattr(self, "_make_function")):
            return super().make_train_function(force)
        if self.train_function is not None and not force:
            return self.train_function

        # No public hook compiles a step of our own: `make_train_function` is public, but
        # Keras' private `_make_function` is what wraps a step in its tf.function, its
        # distribution (`strategy.run` and the reduction of the logs) and
        # `steps_per_execution`; writing those again would copy Keras. Without it (another
        # Keras version) we fall back to one step function (checked above); the due and
        # other steps are tested to match one device in tests/test_distribution.py.
        def traced_with(due):
            def step(data):
                self.objective.periodic_due = due
                try:
                    return self.train_step(data)
                finally:
                    self.objective.periodic_due = None
            return self._make_function(step)

        due_fn, other_fn = traced_with(True), traced_with(False)

        def train_function(iterator):
            due = (int(self.objective.step.numpy()) + 1) % interval == 0
            return (due_fn if due else other_fn)(iterator)

        self.train_function = train_function
        return train_function

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker, self.val_accuracy, self.robust_accuracy]

    def num_classes(self):
        """The classifier's number of logits, or None where it cannot be read statically."""
        n = getattr(self.model, "num_classes", None)
        if n is None:
            try:
                n = self.model.output_shape[-1]
            except (AttributeError, ValueError, TypeError, IndexError):
                return None
        return int(n) if n else None

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, with the model built first (see `fit`)."""
        self._build_before_tracing(x)
        return super().evaluate(x, y, *args, **kwargs)

    def _build_before_tracing(self, x):
        """Builds the network, the pieces' variables and the optimizer's slots eagerly
        when the input shape is known (NumPy arrays or a `tf.data.Dataset`).

        Without a distribution strategy Keras defers building to the first trace of the
        step; a `tf.function` whose first trace creates variables is traced a second time,
        which nearly doubled the time before the first step. Other inputs (generators,
        `PyDataset`) keep Keras' way.
        """
        if self.built and (self.optimizer is None or self.optimizer.built):
            return
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            spec = spec[0] if isinstance(spec, (tuple, list)) else spec
            shape = spec.shape if isinstance(spec, tf.TensorSpec) else None
        else:
            shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or any(d is None for d in tuple(shape)[1:]):
            return
        with self.distribute_strategy.scope():
            if not self.built:
                self.build((None,) + tuple(shape)[1:])
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)

    def _check_fit_inputs(self, x, y):
        """Before training, on the host: NumPy images and labels are checked whole (a
        dataset is checked batch by batch in the steps), and a model whose outputs look
        like probabilities is reported once."""
        if isinstance(x, np.ndarray) and self._attacks_inputs():
            check_images(x)
            if y is not None:
                check_labels(y, self.num_classes())
        shape = getattr(self, "_checked_input_shape", None)
        if (shape is not None and all(isinstance(d, int) for d in shape)
                and not getattr(self, "_probabilities_checked", False)):
            self._probabilities_checked = True
            probe = np.random.default_rng(0).uniform(size=(4,) + tuple(shape)).astype("float32")
            if looks_like_probabilities(forward(self.model, probe, training=False)["logits"]):
                warnings.warn(f"AdversarialModel: {PROBABILITIES_WARNING}", stacklevel=3)

    def _attacks_inputs(self):
        # The attacks clip to [0, 1]; without one (`none`, no validation attack) the inputs
        # may be any finite features, as for a plain Keras model.
        return self.objective.uses_attack or self.eval_attack is not None

    def _checked_batch(self, x, y):
        """The batch, after in-graph checks: images finite (and in [0, 1] when they are
        attacked) and labels in [0, classes). A few reductions per step, outside the
        attack loop; the dtype is checked at trace time. (Under XLA, TensorFlow drops the
        assertions.)"""
        if not x.dtype.is_floating:
            raise ValueError(f"AdversarialModel received {x.dtype.name} images; expected float "
                             f"images in [0, 1] (divide by 255)")
        x = tf.cast(x, tf.float32)
        checks = [
            tf.debugging.assert_all_finite(
                x, "AdversarialModel: the images hold NaN or infinite values; expected "
                   "finite images in [0, 1]")]
        if self._attacks_inputs():
            checks += [
                tf.debugging.assert_less_equal(
                    tf.reduce_max(x), 1.0, message="AdversarialModel: the images hold values "
                    "above 1; expected images in [0, 1] (divide by 255)"),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(x), 0.0, message="AdversarialModel: the images hold "
                    "negative values; expected images in [0, 1] (normalization belongs in "
                    "the model)"),
            ]
        classes = self.num_classes()
        if classes:
            labels = tf.cast(y, tf.int64)
            checks.append(tf.debugging.assert_non_negative(
                labels, message="AdversarialModel: negative labels; expected labels in "
                f"[0, {classes})"))
            checks.append(tf.debugging.assert_less(
                labels, tf.constant(classes, tf.int64), message="AdversarialModel: labels "
                f"of {classes} or more; the model has {classes} classes"))
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def build(self, input_shape):
        self._checked_input_shape = tuple(input_shape)[1:]
        if not self.model.built:
            self.model.build(input_shape)
        onednn.check_model(self.model)
        for piece in [self.objective] + self.modifiers:
            if not piece.built:
                piece.build(input_shape)
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # A private Keras method, overridden because no public hook runs at this point:
        # `fit` calls it before the first step, and `build` cannot stop it. Under a
        # strategy Keras builds the model from the first batch averaged over the
        # replicas, which MultiWorkerMirroredStrategy cannot do eagerly; a built model
        # needs no batch (only its optimizer is left to build). Tested by the multi-worker
        # run in tests/test_distribution.py.
        compiled = [getattr(self, "_compile_metrics", None), getattr(self, "_compile_loss", None)]
        if (iterator is not None and self._distribute_strategy is not None
                and all(layer.built for layer in self._flatten_layers())
                and all(c is None or c.built for c in compiled)):
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=None)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def call(self, x, training=False):
        return self.model(x, training=training)

    def batch_loss(self, x, x_adv, y, sample_weight=None, index=None):
        """The replica's contribution to the global mean loss, and the logged logits."""
        def indexed(piece):  # pieces that use the index (BAT) receive it
            return {"index": index} if piece.uses_index else {}

        per_example, logits = self.objective.loss(self.model, x, x_adv, y,
                                                  **indexed(self.objective))
        weights = sample_weight
        for m in self.modifiers:
            w = m.example_weights(self, x, x_adv, y, **indexed(m))
            if w is not None:
                weights = w if weights is None else weights * w
        if weights is not None:
            per_example = per_example * tf.cast(weights, per_example.dtype)
        return tf.reduce_mean(per_example), logits

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        index = None
        if self.uses_index:  # the third element is each example's index, not a weight
            index, sample_weight = sample_weight, None
            if index is None:
                raise ValueError(f"Defense {self.defense_name!r} needs (x, y, index) batches "
                                 f"(again_tf.data.load(..., with_index=True)); received (x, y)")
        x = self._checked_batch(tf.convert_to_tensor(x), y)
        if not self.built:  # Keras builds on the first trace when no strategy is set
            self.build(tuple(x.shape))
        self.objective.before_attack(self, x, y)
        x_adv = self.objective.adversarial_examples(self.model, self.attack, x, y)
        variables = self.trainable_variables

        def loss_fn():
            return self.batch_loss(x, x_adv, y, sample_weight, index)[0]

        def take_gradients():
            with tf.GradientTape() as tape:
                loss, logits = self.batch_loss(x, x_adv, y, sample_weight, index)
                total = loss
                if self.weight_decay:
                    # d/dw of wd/2·‖w‖² is wd·w: torch's coupled decay, correct under
                    # replicas and loss scaling because it goes the same path as the loss.
                    decayed = self.model.trainable_variables + list(
                        self.objective.decayed_variables)
                    total += 0.5 * self.weight_decay * tf.add_n(
                        [tf.reduce_sum(tf.square(v)) for v in decayed])
                scaled = self.optimizer.scale_loss(scale_for_replicas(total))
            return tape.gradient(scaled, variables), (loss, logits)

        for m in reversed(self.modifiers):  # the first modifier outermost
            take_gradients = functools.partial(m.gradients, self, loss_fn, take_gradients)
        grads, (loss, logits) = take_gradients()
        if not self.optimizer.built:  # on all of them, as a resumed run builds it
            self.optimizer.build(variables)
        # Variables the loss does not reach (e.g. a strategy net trained its own way).
        grads, variables = zip(*[(g, v) for g, v in zip(grads, variables) if g is not None])
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(y, logits)
        return step_logs((self.loss_tracker, self.accuracy_tracker))

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x = self._checked_batch(tf.convert_to_tensor(x), y)
        if not self.built:
            self.build(tuple(x.shape))
        outputs = forward(self.model, x, training=False)
        logits = outputs["logits"]
        self.loss_tracker.update_state(tf.reduce_mean(losses.cross_entropy(logits, y)))
        self.val_accuracy.update_state(y, logits)
        result = [self.loss_tracker, self.val_accuracy]
        if self.eval_attack is not None and not outputs["aux_logits"]:
            x_adv = self.eval_attack.perturb(x, y)
            self.robust_accuracy.update_state(
                y, forward(self.model, x_adv, training=False)["logits"])
            result.append(self.robust_accuracy)
        elif self.eval_attack is not None:
            # Auxiliary heads (a Python list: known at trace time) pick the channel masks at
            # inference, so the validation attack runs on each of `heads.HEAD_OBJECTIVES`
            # (main, combined, aux) and an example is robust only if correct under all: the
            # logged logits are, per example, those of the first objective that fooled it.
            beta = getattr(self.objective, "aux_weight", heads.DEFAULT_AUX_WEIGHT)
            adv_logits = []
            for name in heads.HEAD_OBJECTIVES:
                loss_fn = heads.objective_fn(self.model, name, self.eval_attack.loss, beta)
                adv_logits.append(forward(self.model, self.eval_attack.perturb(x, y, loss_fn),
                                          training=False)["logits"])
            self.robust_accuracy.update_state(y, heads.worst_logits(adv_logits, y))
            result.append(self.robust_accuracy)
        return step_logs(result)

    def get_config(self):
        """The classifier, the settings, and the defense as its pieces: each objective's
        and modifier's own configuration, so a model built from objects
        (`defense=TRADES(beta=1.0), modifiers=[AWP()]`) comes back the same."""
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            defense=self.defense_name, eps=self.eps, step_size=self.step_size,
            steps=self.steps, norm=self.norm, eval_steps=self.eval_steps,
            eval_step_size=self.eval_step_size, attack_training=self.attack_training,
            attack_updates_statistics=self.attack_updates_statistics,
            weight_decay=self.weight_decay, seed=self.seed,
            pieces={"objective": keras.saving.serialize_keras_object(self.objective),
                    "modifiers": [keras.saving.serialize_keras_object(m)
                                  for m in self.modifiers]})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        pieces = config.pop("pieces", None)
        if pieces is None:  # an older file: the defense's name and its hyper-parameters
            return cls(**config)
        name = config.pop("defense")
        def unbuilt(piece):  # built by this model's build, after `attach` adds its state
            return keras.saving.deserialize_keras_object(
                {k: v for k, v in piece.items() if k != "build_config"})

        objective = unbuilt(pieces["objective"])
        modifiers = [unbuilt(m) for m in pieces["modifiers"]]
        adv = cls(defense=objective, modifiers=modifiers, **config)
        adv.defense_name = name
        return adv
