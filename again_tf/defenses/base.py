"""The two pieces every defense is made of: an `Objective` and zero or more `Modifier`s.

An objective says which inputs to train on (adversarial examples from its attack, or
the clean batch) and the per-example loss on them; a modifier changes how that loss
becomes a weight update (AWP perturbs the weights around the gradient; BAT reweights
examples; ...). `AdversarialModel.train_step` runs them in this order:

    x_adv = objective.adversarial_examples(model, attack, x, y)
    for m in modifiers: m.before_gradient(adv_model, loss_fn)      # e.g. AWP: w ← w + v
    loss = mean_i[ weight_i · objective.loss(model, x, x_adv, y)_i ]  (weights: modifiers)
    grads = ∇_w loss
    for m in reversed(modifiers): m.after_gradient(adv_model)      # e.g. AWP: w ← w − v
    optimizer.apply(grads)
"""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.models.base import forward


def head_loss(outputs, labels, loss, aux_weight):
    """`loss(main logits) + aux_weight · mean_h loss(aux logits_h)` per example.

    Models with inserted auxiliary heads (ASE, CAS, CIFS) are trained, and attacked,
    on this combination; with no auxiliary heads it is `loss(main logits)`.
    """
    total = loss(outputs["logits"], labels)
    aux = outputs["aux_logits"]
    if aux:
        total += aux_weight * tf.add_n([loss(a, labels) for a in aux]) / len(aux)
    return total


class Objective(keras.layers.Layer):
    """Base class of training objectives.

    A Keras layer so that any state it owns (variables, a teacher model) is tracked by
    the `AdversarialModel` holding it: saved in checkpoints, trained when trainable
    (gradients of the objective's loss reach every trainable variable of the
    `AdversarialModel` that the loss depends on), placed by distribution strategies.

    Args:
        aux_weight: β, the weight of the mean auxiliary-head loss for models with
            inserted heads. Default 2.0 (the AGAIN and CAS papers' β).

    Subclasses set `name`, `uses_attack` (False: train on the clean batch), optionally
    `attack_options` (keyword arguments the training attack needs, e.g. TRADES'
    `random_start="normal"`), and implement `loss`; their `get_config` adds their own
    constructor arguments.
    """

    name = "objective"
    uses_attack = True
    attack_options = {}

    def __init__(self, aux_weight=2.0, **kwargs):
        kwargs.setdefault("name", type(self).name)
        super().__init__(**kwargs)
        self.aux_weight = float(aux_weight)

    def build(self, input_shape):
        """Creates the objective's own state, if any; `input_shape` is the images'."""
        self.built = True

    def outputs(self, model, x, y, training):
        """Forward pass; label-conditioned layers see `y` whenever a defense runs."""
        return forward(model, x, training=training, labels=y)

    def attack_loss(self, model, x, y):
        """The per-example loss the training attack maximizes: CE of all heads."""
        def loss_fn(x_adv, labels):
            return head_loss(self.outputs(model, x_adv, labels, training=False), labels,
                             losses.cross_entropy, self.aux_weight)
        return loss_fn

    def adversarial_examples(self, model, attack, x, y):
        """The inputs this objective trains on (the clean batch if `uses_attack` is False)."""
        if not self.uses_attack:
            return x
        return attack.perturb(x, y, self.attack_loss(model, x, y))

    def loss(self, model, x, x_adv, y):
        """Returns `(per-example loss (batch,), logits whose accuracy is logged)`."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "aux_weight": self.aux_weight}


class Modifier(keras.layers.Layer):
    """Base class of modifiers: hooks around the objective's gradient. All optional.

    A Keras layer for the same reason as `Objective`.
    """

    name = "modifier"

    def __init__(self, **kwargs):
        kwargs.setdefault("name", type(self).name)
        super().__init__(**kwargs)

    def build(self, input_shape):
        """Creates the modifier's own state, if any; `input_shape` is the images'."""
        self.built = True

    def inserts(self, model):
        """Layers to insert into the unbuilt `Classifier` `model`: {point: layer}.

        Called once by `AdversarialModel.__init__`; the points must be in `model.points`.
        """
        return {}

    def before_gradient(self, adv_model, loss_fn):
        """Runs before the loss is recorded; `loss_fn()` returns the scalar batch loss."""

    def after_gradient(self, adv_model):
        """Runs after the gradient is taken and before the optimizer applies it."""

    def example_weights(self, adv_model, x, x_adv, y):
        """Per-example loss weights `(batch,)`, or None for no reweighting."""
        return None
