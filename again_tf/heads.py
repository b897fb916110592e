"""Auxiliary heads, in one place: the losses that train them and the objectives that attack them.

A `Classifier` with inserted layers (AGAIN's ASE, CAS, CIFS) returns, besides its main
logits z, one auxiliary head's logits a_1 … a_H per layer, and keeps β (`aux_weight`, the
weight its heads were trained with) in its config. Training (`head_loss`,
`paired_head_loss`), the validation attack (`AdversarialModel.test_step`, through
`worst_logits`), `evaluation.evaluate` and evaluate.py (through `head_objective` /
`objective_fn` and `trained_aux_weight`) all take their losses from here.

Attack objectives over all heads: `main`, `combined` and `aux`.

Models with inserted label-conditioned channel layers (AGAIN's ASE, CAS, CIFS) choose
their channel masks at inference from the argmax of their own auxiliary heads, so an
attack on the main head's loss alone overstates their robustness: moving an auxiliary
head to a wrong class switches the mask and the main prediction with it (Fashion-MNIST
`again_pgd` SmallCNN: PGD-20 accuracy 84.8 % on the main cross-entropy, 68.0 % on the
combined loss, 60.0 % on the auxiliary heads alone). Adaptive evaluation attacks every
objective below and counts an example robust only if it survives all of them; both
`evaluation.evaluate` and `AdversarialModel.test_step` use these functions.

With ℓ an attack's own per-example loss of logits (cross-entropy for PGD/APGD-CE, the
C&W margin for C&W-∞, DLR for APGD-DLR, the temperature cross-entropy for temp_pgd), z the
main logits and a_1 … a_H the auxiliary logits:

    main       ℓ(z, y)
    combined   ℓ(z, y) + β · (1/H) Σ_h ℓ(a_h, y)      (β = aux_weight, 2 as in training)
    aux        (1/H) Σ_h ℓ(a_h, y)

`combined` with cross-entropy is the loss the defenses train on and their training attack
maximizes (`head_loss`); with a margin loss (C&W, DLR) it is the same
combination of margins, every head pushed towards misclassification at once.
"""

import tensorflow as tf

from again_tf.attacks import losses
from again_tf.models.base import forward

HEAD_OBJECTIVES = ("main", "combined", "aux")
DEFAULT_AUX_WEIGHT = 2.0  # β of the AGAIN and CAS papers and official code


def trained_aux_weight(model):
    """β the model's auxiliary heads were trained with (its `aux_weight`), else 2.0."""
    beta = getattr(model, "aux_weight", None)
    return DEFAULT_AUX_WEIGHT if beta is None else float(beta)


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


def paired_head_loss(first, second, labels, loss, aux_weight):
    """`loss(first, second, y)` on the main heads plus `aux_weight` · its mean over aux heads.

    `first` and `second` are `forward(...)` outputs of the same model on two inputs
    (e.g. clean and adversarial); the h-th auxiliary head of one is paired with the h-th
    of the other, as `head_loss` does for single-input losses. Per example, `(batch,)`.
    """
    total = loss(first["logits"], second["logits"], labels)
    pairs = list(zip(first["aux_logits"], second["aux_logits"]))
    if pairs:
        total += aux_weight * tf.add_n([loss(a, b, labels) for a, b in pairs]) / len(pairs)
    return total


def worst_logits(logits_per_objective, labels):
    """Per example, the logits of the first objective's attack that fooled it (else the
    last's): an example is robust only if every attack left it correct."""
    worst = None
    for logits in logits_per_objective:
        if worst is None:
            worst = logits
            continue
        fooled = tf.not_equal(tf.argmax(worst, -1, output_type=tf.int32),
                              tf.cast(labels, tf.int32))
        worst = tf.where(fooled[:, None], worst, logits)
    return worst


def head_objective(name, loss=losses.cross_entropy, aux_weight=DEFAULT_AUX_WEIGHT):
    """The per-example objective `name` of a forward pass's outputs (module docstring).

    Args:
        name: "main", "combined" or "aux".
        loss: per-example loss of logits, `(logits, labels) -> (batch,)`. Default the
            cross-entropy.
        aux_weight: β of "combined". Default 2.0 (AGAIN/CAS papers and code).

    Returns `fn(outputs, labels) -> (batch,)` on `forward(...)`'s dict; "aux" raises a
    ValueError on outputs without auxiliary logits, "combined" is then ℓ(z, y).

    Example:
        fn = head_objective("aux")
        per_example = fn(forward(model, x), y)
    """
    if name not in HEAD_OBJECTIVES:
        raise ValueError(f"Unknown head objective {name!r}. Expected one of: "
                         f"{', '.join(HEAD_OBJECTIVES)}")

    def mean_aux(outputs, labels):
        aux = outputs["aux_logits"]
        if not aux:
            raise ValueError(f"Objective {name!r} needs a model with auxiliary heads; the "
                             f"model returned aux_logits=[]")
        return tf.add_n([tf.cast(loss(a, labels), tf.float32) for a in aux]) / len(aux)

    def main(outputs, labels):
        return tf.cast(loss(outputs["logits"], labels), tf.float32)

    if name == "main":
        return main
    if name == "aux":
        return mean_aux

    def combined(outputs, labels):
        if not outputs["aux_logits"]:
            return main(outputs, labels)
        return main(outputs, labels) + aux_weight * mean_aux(outputs, labels)

    return combined


def objective_fn(model, name, loss=losses.cross_entropy, aux_weight=DEFAULT_AUX_WEIGHT,
                 training=False, relax_masks=None):
    """`loss_fn(x_adv, labels) -> (batch,)` of objective `name` for `Attack.perturb`.

    The model runs on its inference path (`labels=None`: the label-conditioned layers
    pick their masks from their own auxiliary heads, as at test time), in BatchNorm
    mode `training` (default False). Other arguments as in `head_objective`.

    `relax_masks=T` lets the gradient reach the argmax that picks each inserted mask
    (straight-through softmax at temperature T, `ClassChannelMask.mask`); the loss value
    is that of the real model.

    Example:
        x_adv = PGD(model, eps=0.1).perturb(x, y, objective_fn(model, "aux"))
    """
    objective = head_objective(name, loss, aux_weight)

    def loss_fn(x_adv, labels):
        return objective(forward(model, x_adv, training=training, relax_masks=relax_masks),
                         labels)

    return loss_fn


def num_aux_heads(model, x):
    """The number of auxiliary heads `model` returns, from one forward pass on `x[:1]`."""
    return len(forward(model, tf.convert_to_tensor(x[:1], tf.float32),
                       training=False)["aux_logits"])
