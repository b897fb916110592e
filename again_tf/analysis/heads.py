"""The auxiliary heads of the layer defenses: their own accuracy and agreement with the model.

AGAIN's ASE (Yin et al., CVPR 2023), CAS (Bai et al., ICLR 2021) and CIFS (Yan et al.,
ICML 2021) insert channel layers with an auxiliary linear head each. At inference a
mask layer picks its channel mask from its own head's argmax, so the model's prediction
leans on that head: when an attack flips the head, the mask of another class is applied
and the main head tends to follow. `head_report` measures this on one head — by
default the last inserted one, the head at the penultimate map under the default
insertion points (`again_tf.defenses.insertion_points`):

    aux accuracy          mean[argmax aux(x) = y]
    agreement             mean[argmax aux(x) = argmax main(x)]

on clean images and, given them, on attacked images `x_adv` (all on the inference
path: `models.forward(model, x, training=False)`, no labels).

    rep = heads.head_report(model, x, y, x_adv)
    rep["aux_clean"], rep["aux_adv"], rep["agree_clean"], rep["agree_adv"]
"""

import numpy as np
import tensorflow as tf

from again_tf.models import forward


def num_heads(model, x):
    """The number of auxiliary heads of `model` (0 for a model without inserted heads),
    from one inference forward pass on `x[:1]`."""
    x = np.asarray(x, np.float32)
    if not len(x):
        raise ValueError("num_heads needs at least one image to run the model on; received "
                         "x with 0 images")
    return len(forward(model, tf.constant(x[:1]), training=False)["aux_logits"])


def head_predictions(model, x, head=-1, batch_size=256):
    """(main predictions, predictions of auxiliary head `head`) on `x`, inference path.

    `head` indexes `forward(...)["aux_logits"]`, in the order the forward pass reaches the
    inserted layers (-1: the last one). Raises ValueError if `model` has no such head.
    """
    x = np.asarray(x, np.float32)
    _check_head(model, x, head)
    logits, aux = _head_outputs(model, x, head, batch_size)
    return np.argmax(logits, -1), aux


def _check_head(model, x, head):
    """The number of auxiliary heads; ValueError if `head` is not one of them."""
    count = num_heads(model, x)
    if not count:
        raise ValueError(f"head_report needs a model with auxiliary heads (an inserted ASE, "
                         f"CAS or CIFS layer); {getattr(model, 'name', model)!r} has none")
    if not -count <= head < count:
        raise ValueError(f"Expected `head` in [{-count}, {count - 1}] ({count} auxiliary "
                         f"head(s)). Received: head={head}")
    return count


def _head_outputs(model, x, head, batch_size):
    """(main logits, predictions of auxiliary head `head`) on `x`, inference path."""
    main, aux = [], []
    for i in range(0, len(x), batch_size):
        out = forward(model, tf.constant(x[i:i + batch_size]), training=False)
        main.append(np.asarray(out["logits"], np.float64))
        aux.append(np.argmax(out["aux_logits"][head], -1))
    return np.concatenate(main), np.concatenate(aux)


def cross_entropy(logits, y):
    """Per-image softmax cross-entropy of float logits (NumPy, log-sum-exp)."""
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return log_z - logits[np.arange(len(y)), y]


def head_report(model, x, y, x_adv=None, head=-1, batch_size=256):
    """Accuracy of auxiliary head `head` and its agreement with the main head.

    Args:
        model: a classifier with inserted auxiliary heads (`again_tf.models.Classifier`).
        x, y: NumPy images in [0, 1] and integer labels.
        x_adv: attacked versions of `x` (same shape), or None.
        head: which auxiliary head (index into `forward(...)["aux_logits"]`). Default -1:
            the last inserted layer's, i.e. the one at the penultimate map.
        batch_size: images per forward pass.

    Returns:
        dict with "aux_clean" (the head's accuracy on `x`), "main_clean" (the model's),
        "agree_clean" (fraction of images where the head's and the model's predictions
        are equal), "loss_clean" (the model's mean clean cross-entropy),
        "loss_aux_right"/"loss_aux_wrong" (its mean over the images the head gets
        right / wrong; NaN if none), "loss_share_aux_wrong" (the share of the summed
        cross-entropy on the images the head gets wrong), "main_clean_aux_right"/
        "main_clean_aux_wrong" (the model's accuracy on each group), "heads" (how many auxiliary heads the model has), "head" (the index
        used, non-negative), "images"; with `x_adv` also "aux_adv", "main_adv" and
        "agree_adv", and the per-image bool arrays "aux_correct_adv", "agree_adv_each".
    """
    y = np.asarray(y)
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or len(x) != len(y) or not len(y):
        raise ValueError(f"Expected `x` of shape (n, ...) and `y` of shape (n,) with n >= 1. "
                         f"Received: x.shape={x.shape}, y.shape={y.shape}")
    if x_adv is not None and np.shape(x_adv) != x.shape:
        raise ValueError(f"Expected `x_adv` of the shape of `x` {x.shape}. Received: "
                         f"x_adv.shape={np.shape(x_adv)}")
    count = _check_head(model, x, head)
    logits, aux = _head_outputs(model, x, head, batch_size)
    main = np.argmax(logits, -1)
    report = {"heads": count, "head": head % count, "images": len(y),
              "aux_clean": float(np.mean(aux == y)), "main_clean": float(np.mean(main == y)),
              "agree_clean": float(np.mean(aux == main))}
    # Where the model's clean cross-entropy (Keras' val_loss) comes from: the images the
    # head gets right and those it gets wrong (the mask of another class is applied).
    ce, wrong = cross_entropy(logits, y), aux != y

    def mean(values):
        return float(np.mean(values)) if len(values) else float("nan")

    report.update(loss_clean=mean(ce), loss_aux_wrong=mean(ce[wrong]),
                  loss_aux_right=mean(ce[~wrong]),
                  loss_share_aux_wrong=float(ce[wrong].sum() / ce.sum()) if ce.sum() else 0.0,
                  main_clean_aux_right=mean(main[~wrong] == y[~wrong]),
                  main_clean_aux_wrong=mean(main[wrong] == y[wrong]))
    if x_adv is not None:
        main_adv, aux_adv = head_predictions(model, x_adv, head, batch_size)
        report.update(aux_adv=float(np.mean(aux_adv == y)),
                      main_adv=float(np.mean(main_adv == y)),
                      agree_adv=float(np.mean(aux_adv == main_adv)),
                      aux_correct_adv=aux_adv == y, agree_adv_each=aux_adv == main_adv)
    return report
