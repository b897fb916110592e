"""The two pieces every defense is made of: an `Objective` and zero or more `Modifier`s.

An objective says which inputs to train on (adversarial examples from its attack, or
the clean batch) and the per-example loss on them; a modifier changes how that loss
becomes a weight update (AWP takes the gradient at perturbed weights; BAT reweights
examples; ...). `AdversarialModel.train_step` runs them in this order:

    x_adv = objective.adversarial_examples(model, attack, x, y)
    loss_fn = lambda: mean_i[ weight_i · objective.loss(model, x, x_adv, y)_i ]
                                                   (weights: modifiers' example_weights)
    take = lambda: ∇_w loss_fn()
    for m in reversed(modifiers):                  # the first modifier outermost
        take = lambda: m.gradients(adv_model, loss_fn, take)   # e.g. AWP: w+v, take, w
    optimizer.apply(take())

Everything a step needs is an argument or a local variable of that step: the clean and
adversarial batches are passed to the loss, and a modifier's saved weights live inside
its own `gradients` call.
"""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.pgd import PGD
from again_tf.heads import head_loss  # noqa: F401 (defenses.base.head_loss, as before)
from again_tf.models.base import forward


def needs_partner(model):
    """True if a layer inserted in `model` needs the clean/adversarial partner batch."""
    inserts = getattr(model, "inserts", None) or {}
    return any(getattr(layer, "needs_partner", False) for layer in inserts.values())


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
    constructor arguments. A piece (objective or modifier) with `uses_index = True` (BAT)
    trains on `(x, y, index)` batches and gets `index=` in `loss` / `example_weights`.
    """

    name = "objective"
    uses_attack = True
    attack_options = {}

    def __init__(self, aux_weight=2.0, **kwargs):
        kwargs.setdefault("name", type(self).name)
        super().__init__(**kwargs)
        self.aux_weight = float(aux_weight)

    # Optional hooks, shared by objectives and modifiers (defaults: nothing to do).
    uses_index = False  # True: trains on (x, y, index) batches, gets `index=` (BAT)

    def set_epoch(self, epoch):
        """Called at each epoch's start (0-based) by `AdversarialModel.fit`'s callback."""

    def make_callbacks(self, adv_model, validation_data):
        """Extra Keras callbacks this piece needs (e.g. class-wise epoch-end updates)."""
        return []

    def attach(self, model):
        """Called once with the classifier, before the attack is made (LBGAT: teacher)."""

    def make_attack(self, model, eps, step_size, steps, **kwargs):
        """The training attack; PGD unless the objective needs its own (FAT, LAS-AT)."""
        return PGD(model, eps, step_size, steps, **kwargs)

    def before_attack(self, adv_model, x, y):
        """Runs at the start of each train step (LAS-AT: its policy update)."""

    # An update that runs every `periodic_interval`-th train step (LAS-AT's policy step).
    # `AdversarialModel.fit` compiles the due and the other steps as two functions and sets
    # `periodic_due` (True/False) while tracing them, so the update needs no `tf.cond`
    # (control flow around a cross-replica sum is not supported by tf.distribute).
    # `periodic_due` None: the piece decides in-graph (single device only).
    periodic_interval = None
    periodic_due = None

    @property
    def decayed_variables(self):
        """Variables besides the classifier's that weight decay covers (LBGAT's teacher)."""
        return []

    def build(self, input_shape):
        """Creates the objective's own state, if any; `input_shape` is the images'."""
        self.built = True

    def outputs(self, model, x, y, training, partner=None):
        """Forward pass; label-conditioned layers see `y` whenever a defense runs.

        `partner`: the other half of the clean/adversarial pair (the clean batch for the
        adversarial one and vice versa). If `model` holds an inserted layer that
        `needs_partner` (AGAIN's HFF with `pairing="clean_adv"`), a training-mode pass
        runs on `concat([x, partner])` and returns the outputs of `x`'s half; without a
        partner, `x` is paired with itself (HFF is then the identity).
        """
        if not (training and needs_partner(model)):
            return forward(model, x, training=training, labels=y)
        if partner is None:
            partner = x
        size = tf.shape(x)[0]
        out = forward(model, tf.concat([x, partner], 0), training=training,
                      labels=tf.concat([y, y], 0))
        return {"logits": out["logits"][:size],
                "aux_logits": [a[:size] for a in out["aux_logits"]],
                "features": None if out["features"] is None else out["features"][:size]}

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

    # Optional hooks, shared by objectives and modifiers (defaults: nothing to do).
    uses_index = False  # True: trains on (x, y, index) batches, gets `index=` (BAT)

    def set_epoch(self, epoch):
        """Called at each epoch's start (0-based) by `AdversarialModel.fit`'s callback."""

    def make_callbacks(self, adv_model, validation_data):
        """Extra Keras callbacks this piece needs (e.g. class-wise epoch-end updates)."""
        return []

    def build(self, input_shape):
        """Creates the modifier's own state, if any; `input_shape` is the images'."""
        self.built = True

    def inserts(self, model):
        """Layers to insert into the unbuilt `Classifier` `model`: {point: layer}.

        Called once by `AdversarialModel.__init__`; the points must be in `model.points`.
        """
        return {}

    def gradients(self, adv_model, loss_fn, take_gradients):
        """The step's gradients: `take_gradients()` (returns `(grads, logs)`), run in
        whatever state this modifier needs, e.g. AWP's perturbed weights, which it sets
        and removes around the call. `loss_fn()` is the scalar batch loss at the
        current weights. Default: `take_gradients()` unchanged."""
        return take_gradients()

    def example_weights(self, adv_model, x, x_adv, y):
        """Per-example loss weights `(batch,)`, or None for no reweighting."""
        return None
