"""Class-wise robust training and inference: our reading of Tian et al. (KDD 2021).

Tian, Kuang, Jiang, Wu & Wang, "Analysis and Applications of Class-wise Robustness in
Adversarial Training", KDD 2021, find that adversarially trained models are much less
robust on some classes than others, and, in their abstract, "make modifications in the
training and inference phases to improve the robustness of the most vulnerable class".
The paper's text was not available to us; this module is our own principled reading of
that sentence, not a reproduction:

- training (`ClasswiseWeights`): the adversarial loss of class c is weighted by w_c,
  which grows with class c's robust error measured by PGD on held-out data at the end of
  every epoch;
- inference (`tune_logit_offset`): after training, a per-class offset o is added to the
  logits, F(x) + o, tuned on the held-out data to raise the worst class's robust accuracy
  while keeping the overall robust accuracy within a tolerance. The offset is folded into
  the bias of the classifier's final Dense layer (logits = W·h + b + o, exactly), so it is
  part of every saved form of the model (`.keras`, SavedModel) and every attack sees it.

    adv = AdversarialModel(model, defense="classwise", eps=0.1)    # or "classwise_trades"
    adv.compile(optimizer="adam")
    adv.fit(train, validation_data=held_out, epochs=10)   # updates w each epoch, tunes o at the end
"""

import keras
import numpy as np
import tensorflow as tf

from again_tf.attacks.pgd import PGD
from again_tf.defenses.base import Modifier
from again_tf.defenses.bat import as_bool
from again_tf.models.base import Classifier, forward


def weight_targets(errors, power=1.0, weight_min=0.5, weight_max=2.0):
    """The class weights the rule aims at for per-class robust errors `errors` (K,).

        t_c = clip( K · err_c^p / Σ_k err_k^p , w_min, w_max )

    (mean 1 before clipping); all ones when every error is 0. A NaN error (a class absent
    from the held-out data) is replaced by the mean of the others.
    """
    err = np.asarray(errors, np.float64)
    if np.isnan(err).all():
        return np.ones_like(err)
    err = np.where(np.isnan(err), np.nanmean(err), err)
    powered = np.clip(err, 0.0, None) ** power
    total = powered.sum()
    if total <= 0:
        return np.ones_like(err)
    return np.clip(len(err) * powered / total, weight_min, weight_max)


def classifier_head(model):
    """The final Dense layer (with a bias) of `model`: `model.fc` for a `Classifier`."""
    layer = getattr(model, "fc", None) if isinstance(model, Classifier) else None
    if layer is None:
        layers = getattr(model, "layers", None) or []
        layer = layers[-1] if layers else None
    if not isinstance(layer, keras.layers.Dense) or not layer.use_bias:
        raise ValueError(f"The class-wise logit offset needs a model whose logits come from "
                         f"a Dense layer with a bias; received {type(model).__name__} whose "
                         f"last layer is {type(layer).__name__}")
    return layer


def add_logit_offset(model, offset):
    """Adds `offset` (K,) to `model`'s logits for good: the head's bias b ← b + offset."""
    head = classifier_head(model)
    head.bias.assign_add(tf.cast(np.asarray(offset, np.float32), head.bias.dtype))


def per_class_accuracy(predictions, labels, num_classes):
    """(per-class accuracy (K,), NaN for absent classes; overall accuracy)."""
    labels = np.asarray(labels).astype(np.int64)
    correct = np.asarray(predictions) == labels
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return acc, float(correct.mean()) if len(labels) else 0.0


def _key(acc, overall):
    """Ordering of outcomes: higher worst-class accuracy, fewer classes at it, higher overall."""
    worst = np.nanmin(acc)
    return (round(float(worst), 9), -int(np.sum(np.isclose(acc, worst))), round(overall, 9))


def search_offset(logits, labels, floor, max_offset=None, margin=1e-3, max_steps=None):
    """Greedy offset on fixed logits: raises the worst class's accuracy of argmax(Z + o).

    Coordinate ascent: at each step the class c with the lowest accuracy gets the
    smallest increase of o_c, among those that flip one more of its misclassified
    examples (their gap max_{k≠c}(Z+o)_k − (Z+o)_c plus `margin`), that most improves
    `_key` while the overall accuracy stays ≥ `floor`; it stops when no increase does.

    Args:
        logits: `(n, K)` logits Z (e.g. on adversarial examples).
        labels: `(n,)` labels.
        floor: the lowest overall accuracy allowed.
        max_offset: bound on each o_c, a number or one per class (None: no bound).
        margin: added to each flipping gap. Default 1e-3.
        max_steps: default 4·K.

    Returns o, `(K,)` float32 (zeros when nothing helps).
    """
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    k = z.shape[1]
    offset = np.zeros(k)
    acc, overall = per_class_accuracy(np.argmax(z, 1), labels, k)
    best = _key(acc, overall)
    for _ in range(max_steps or 4 * k):
        shifted = z + offset
        pred = np.argmax(shifted, 1)
        acc, _ = per_class_accuracy(pred, labels, k)
        c = int(np.nanargmin(acc))
        wrong = (labels == c) & (pred != c)
        if not wrong.any():
            break
        rivals = np.delete(shifted[wrong], c, axis=1).max(1)
        steps = np.unique(rivals - shifted[wrong, c] + margin)
        if max_offset is not None:
            steps = steps[offset[c] + steps <= np.broadcast_to(max_offset, (k,))[c]]
        choice, choice_key = None, best
        for step in steps:
            trial = shifted.copy()
            trial[:, c] += step
            acc_t, overall_t = per_class_accuracy(np.argmax(trial, 1), labels, k)
            key = _key(acc_t, overall_t)
            if overall_t >= floor - 1e-12 and key > choice_key:
                choice, choice_key = step, key
        if choice is None:
            break
        offset[c] += choice
        best = choice_key
    return offset.astype(np.float32)


class _Measure:
    """PGD on a held-out set: adversarial logits, per-class and overall robust accuracy."""

    def __init__(self, model, attack, x, y, num_classes, batch_size=256):
        self.model, self.attack = model, attack
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y).astype(np.int64)
        self.num_classes, self.batch_size = int(num_classes), int(batch_size)
        self._logits = tf.function(
            lambda b: tf.cast(forward(model, b, training=False)["logits"], tf.float32),
            reduce_retracing=True)

    def __call__(self):
        out = []
        for i in range(0, len(self.x), self.batch_size):
            xb = tf.constant(self.x[i:i + self.batch_size])
            yb = tf.constant(self.y[i:i + self.batch_size])
            out.append(self._logits(self.attack(xb, yb)).numpy())
        logits = np.concatenate(out)
        acc, overall = per_class_accuracy(np.argmax(logits, 1), self.y, self.num_classes)
        return {"logits": logits, "per_class": acc, "overall": overall}


def _summary(m):
    worst = int(np.nanargmin(m["per_class"]))
    return {"robust_accuracy": m["overall"], "worst_class": worst,
            "worst_class_robust_accuracy": float(m["per_class"][worst]),
            "per_class": [None if np.isnan(a) else float(a) for a in m["per_class"]]}


# Shares of the tolerance the search may use, tried in order until the re-attacked model
# improves: the adapted attack usually costs more than the fixed logits promised.
SHARES = (1.0, 0.5, 0.25)


def tune_logit_offset(model, x, y, attack=None, tolerance=0.02, rounds=3, max_offset=None,
                      eps=None, step_size=None, steps=10, norm="linf", batch_size=256,
                      seed=0):
    """Tunes and adds to `model` a per-class logit offset that raises the worst class.

    1. PGD on the held-out `(x, y)` gives the adversarial logits Z, per-class and overall
       robust accuracy a_0 (the floor is a_0 − `tolerance`).
    2. `search_offset` picks o on the fixed Z.
    3. The model with the offset is attacked again (the attacker sees the offset: it is
       in the model), and the step is kept only if this adaptive measurement beats the
       best so far (higher worst-class robust accuracy, then fewer classes at it, then
       higher overall) with overall ≥ floor; if not, the search is redone with half and
       then a quarter of the tolerance (the adapted attack usually costs more overall
       accuracy than the fixed logits promised).
       Steps 2-3 repeat from the new adversarial logits up to `rounds` times, and stop at
       the first round with no verified gain. The best verified offset (zero if none)
       stays in the model.

    Args:
        model: the classifier; the offset goes into its final Dense layer's bias.
        x, y: held-out images in [0, 1] and labels (NumPy).
        attack: an `again_tf.attacks.Attack` on `model`; default PGD(eps, step_size,
            steps, norm, seed).
        tolerance: allowed drop of overall robust accuracy, absolute. Default 0.02 (our
            choice: two points; on Fashion-MNIST the weakest class, Shirt, gains nothing
            within one point, because every offset that flips its examples first takes
            examples of the neighbouring classes).
        rounds: attack-and-search rounds. Default 3.
        max_offset: bound on each offset entry (None: none).

    Returns `{"offset": [K floats], "before": summary, "after": summary}` where a summary
    holds "robust_accuracy", "worst_class", "worst_class_robust_accuracy", "per_class".

    Example:
        report = tune_logit_offset(model, x_val, y_val, eps=0.1, step_size=0.025)
    """
    if tolerance < 0:
        raise ValueError(f"Expected `tolerance` >= 0. Received: tolerance={tolerance}")
    head = classifier_head(model)
    num_classes = int(head.units)
    if attack is None:
        if eps is None:
            raise ValueError("tune_logit_offset needs `attack` or `eps`. Received neither")
        attack = PGD(model, eps, step_size or eps / 4, steps, norm=norm, seed=seed)
    measure = _Measure(model, attack, x, y, num_classes, batch_size)
    bias0 = head.bias.numpy().copy()
    before = measure()
    if not np.isfinite(before["logits"]).all():
        return {"offset": [0.0] * num_classes, "before": _summary(before),
                "after": _summary(before)}
    floor = before["overall"] - tolerance
    best, best_offset = before, np.zeros(num_classes, np.float32)
    best_key = _key(before["per_class"], before["overall"])
    current, state = before, np.zeros(num_classes, np.float32)
    for _ in range(int(rounds)):
        tried = []
        for share in SHARES:  # the attack adapts to the offset: aim inside the tolerance
            delta = search_offset(current["logits"], measure.y,
                                  before["overall"] - share * tolerance,
                                  max_offset=None if max_offset is None else max_offset - state)
            if not delta.any() or any(np.array_equal(delta, d) for d in tried):
                continue
            tried.append(delta)
            trial = (state + delta).astype(np.float32)
            head.bias.assign(bias0 + trial)
            m = measure()
            key = _key(m["per_class"], m["overall"])
            if m["overall"] >= floor - 1e-12 and key > best_key:
                best, best_key, best_offset = m, key, trial
                break
        else:
            break
        current, state = best, best_offset
    head.bias.assign(bias0 + best_offset)
    return {"offset": [float(v) for v in best_offset], "before": _summary(before),
            "after": _summary(best)}


@keras.saving.register_keras_serializable(package="again_tf")
class ClasswiseWeights(Modifier):
    """Weights each example's loss by its class's weight w_y, updated from held-out robust error.

    Our reading of Tian et al., "Analysis and Applications of Class-wise Robustness in
    Adversarial Training", KDD 2021 (module docstring: the paper's text was not available
    to us). At the end of every epoch PGD attacks the held-out data (`fit`'s
    `validation_data`; train.py's `--val_size` examples) with the `AdversarialModel`'s
    validation attack, giving each class's robust error err_c, and

        t_c = clip( K · err_c^p / Σ_k err_k^p , w_min, w_max )      (`weight_targets`)
        w_c ← (1 − η) · w_c + η · t_c                                 (w starts at 1)

    so the weights move toward the most vulnerable classes; the loss is
    mean_i w_{y_i} · L_i with L the objective's per-example loss (PGD-AT's CE for
    `classwise`, TRADES' for `classwise_trades`). After the last epoch the inference
    offset is tuned on the same data (`tune_logit_offset`) and folded into the model.

    State (saved with the weights, so `--resume` continues it): `class_weights` (w),
    `robust_error` (the last measured err) and `logit_offset` (the offset added to the
    head's bias so far). The epoch-end update runs before the training run's checkpoint
    callback, so a checkpoint holds the weights the next epoch will use. The logs get
    `val_worst_class_robust_accuracy` every epoch.

    Args:
        num_classes: K. Default: the model's `num_classes` (any `again_tf` Classifier) or
            the last dimension of its output shape (a built Keras model).
        weight_power: p. Default 1.0 (our choice: weights proportional to the error).
        weight_min, weight_max: the clip bounds. Defaults 0.5 and 2.0 (our choice: no class
            is weighted more than 4× another).
        weight_rate: η, the update rate of the moving average. Default 0.5 (our choice).
        tune_offset: tune the inference offset after training. Default True.
        offset_tolerance: allowed drop of overall held-out robust accuracy. Default 0.02
            (see `tune_logit_offset`).
        holdout_images: use at most this many held-out images (0: all). Default 0.

    Example:
        adv = AdversarialModel(model, defense="classwise", eps=0.1, weight_power=2.0)
        adv.fit(train, validation_data=held_out, epochs=10)
        adv.modifiers[0].class_weights.numpy()
    """

    name = "classwise"
    needs_holdout = True

    def __init__(self, num_classes=None, weight_power=1.0, weight_min=0.5, weight_max=2.0,
                 weight_rate=0.5, tune_offset=True, offset_tolerance=0.02, holdout_images=0,
                 **kwargs):
        super().__init__(**kwargs)
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"Expected `num_classes` >= 2. Received: num_classes={num_classes}")
        if float(weight_power) < 0:
            raise ValueError(f"Expected `weight_power` >= 0. Received: "
                             f"weight_power={weight_power}")
        if not 0 < float(weight_min) <= 1.0 <= float(weight_max):
            raise ValueError(f"Expected 0 < `weight_min` <= 1 <= `weight_max`. Received: "
                             f"weight_min={weight_min}, weight_max={weight_max}")
        if not 0 < float(weight_rate) <= 1:
            raise ValueError(f"Expected `weight_rate` in (0, 1]. Received: "
                             f"weight_rate={weight_rate}")
        if float(offset_tolerance) < 0:
            raise ValueError(f"Expected `offset_tolerance` >= 0. Received: "
                             f"offset_tolerance={offset_tolerance}")
        if int(holdout_images) < 0:
            raise ValueError(f"Expected `holdout_images` >= 0. Received: "
                             f"holdout_images={holdout_images}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.weight_power = float(weight_power)
        self.weight_min, self.weight_max = float(weight_min), float(weight_max)
        self.weight_rate = float(weight_rate)
        self.tune_offset = as_bool(tune_offset, "tune_offset")
        self.offset_tolerance = float(offset_tolerance)
        self.holdout_images = int(holdout_images)

    def inserts(self, model):
        """Inserts nothing; reads K from the model when not given."""
        if self.num_classes is None:
            self.num_classes = getattr(model, "num_classes", None)
        if self.num_classes is None:  # e.g. a built Sequential model
            try:
                self.num_classes = int(model.output_shape[-1])
            except (AttributeError, TypeError, ValueError):
                pass
        return {}

    def build(self, input_shape):
        if self.num_classes is None:
            raise ValueError("ClasswiseWeights needs `num_classes` for a model without a "
                             "`num_classes` attribute. Received: num_classes=None")
        k = self.num_classes
        self.class_weights = self.add_weight(shape=(k,), initializer="ones", trainable=False,
                                             name="class_weights")
        self.robust_error = self.add_weight(shape=(k,), initializer="zeros", trainable=False,
                                            name="robust_error")
        self.logit_offset = self.add_weight(shape=(k,), initializer="zeros", trainable=False,
                                            name="logit_offset")
        self.built = True

    def example_weights(self, adv_model, x, x_adv, y):
        return tf.gather(self.class_weights, tf.cast(tf.reshape(y, [-1]), tf.int32))

    def update(self, errors):
        """One epoch-end step of the rule for measured per-class robust errors (K,)."""
        errors = np.asarray(errors, np.float64)
        targets = weight_targets(errors, self.weight_power, self.weight_min, self.weight_max)
        weights = (1 - self.weight_rate) * self.class_weights.numpy() + self.weight_rate * targets
        self.class_weights.assign(weights.astype(np.float32))
        self.robust_error.assign(np.nan_to_num(errors, nan=0.0).astype(np.float32))
        return weights

    def make_callbacks(self, adv_model, validation_data):
        return [ClasswiseUpdate(self, adv_model, validation_data)]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "weight_power": self.weight_power, "weight_min": self.weight_min,
                "weight_max": self.weight_max, "weight_rate": self.weight_rate,
                "tune_offset": self.tune_offset, "offset_tolerance": self.offset_tolerance,
                "holdout_images": self.holdout_images}


def holdout_arrays(data, limit=0):
    """`(x, y)` NumPy arrays of Keras-style validation data (a tuple or a tf.data.Dataset)."""
    if isinstance(data, tf.data.Dataset):
        xs, ys, n = [], [], 0
        for element in data:
            xb, yb, _ = keras.utils.unpack_x_y_sample_weight(element)
            xs.append(np.asarray(xb, np.float32))
            ys.append(np.asarray(yb).reshape(-1))
            n += len(ys[-1])
            if limit and n >= limit:
                break
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) >= 2:
        x, y = np.asarray(data[0], np.float32), np.asarray(data[1]).reshape(-1)
    else:
        raise ValueError(f"Expected held-out data as (x, y) arrays or a tf.data.Dataset; "
                         f"received {type(data).__name__}")
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y.astype(np.int64)


class ClasswiseUpdate(keras.callbacks.Callback):
    """Epoch end: measures held-out class-wise robust error and updates `ClasswiseWeights`.

    Train end: tunes the inference logit offset (if the modifier's `tune_offset`).
    `AdversarialModel.fit` adds it, with `fit`'s `validation_data` as the held-out data.
    """

    def __init__(self, modifier, adv_model, data):
        super().__init__()
        self.modifier, self.adv_model, self.data = modifier, adv_model, data
        self._measure = None
        self.offset_report = None

    def _measurer(self):
        if self._measure is None:
            if self.data is None:
                raise ValueError("Defense 'classwise' measures class-wise robust error on "
                                 "held-out data every epoch: pass validation_data to fit "
                                 "(train.py: --val_size > 0). Received validation_data=None")
            adv = self.adv_model
            attack = adv.eval_attack or PGD(adv.model, adv.eps, adv.step_size, adv.steps,
                                            norm=adv.norm, seed=adv.seed)
            x, y = holdout_arrays(self.data, self.modifier.holdout_images)
            self._measure = _Measure(adv.model, attack, x, y, self.modifier.num_classes)
        return self._measure

    def on_train_begin(self, logs=None):
        self._measurer()

    def on_epoch_end(self, epoch, logs=None):
        m = self._measurer()()
        self.modifier.update(1.0 - m["per_class"])
        if logs is not None:
            logs["val_worst_class_robust_accuracy"] = float(np.nanmin(m["per_class"]))

    def on_train_end(self, logs=None):
        if not self.modifier.tune_offset:
            return
        m = self._measurer()
        report = tune_logit_offset(self.adv_model.model, m.x, m.y, attack=m.attack,
                                   tolerance=self.modifier.offset_tolerance)
        self.modifier.logit_offset.assign_add(np.asarray(report["offset"], np.float32))
        self.offset_report = report
