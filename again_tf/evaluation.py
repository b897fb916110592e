"""Robust accuracy of a classifier under named attacks: `clean`, `fgsm`, `pgd20`, `cw`, ...

Attack names (`parse_attack`):
    clean        no attack.
    fgsm         one step of ε (Goodfellow et al. 2015).
    pgdK         K-step L∞ PGD on cross-entropy, step ε/4 unless given, uniform random
                 start (Madry et al. 2018). pgd10/pgd20/pgd50/pgd100 are what the papers report.
    cw / cwK     C&W-∞: K-step PGD (default 30) on the C&W margin loss, as the TRADES,
                 MART and AWP papers report it.
"""

import re

import numpy as np
import tensorflow as tf

from again_tf.attacks.pgd import FGSM, PGD
from again_tf.models.base import forward


def parse_attack(name, model, eps, step_size=None, norm="linf", seed=0):
    """Builds the attack called `name` (see the module docstring); None for "clean"."""
    step_size = step_size or eps / 4
    if name == "clean":
        return None
    if name == "fgsm":
        return FGSM(model, eps, norm=norm)
    match = re.fullmatch(r"(pgd|cw)(\d*)", name)
    if not match or (match.group(1) == "pgd" and not match.group(2)):
        raise ValueError(f"Unknown attack {name!r}. Expected clean, fgsm, pgdK (e.g. pgd20) "
                         f"or cw / cwK (e.g. cw30)")
    kind, steps = match.group(1), int(match.group(2) or 30)
    return PGD(model, eps, step_size, steps, norm=norm, seed=seed,
               loss="ce" if kind == "pgd" else "cw")


def predictor(model):
    """A compiled function: images -> argmax predictions of `model` in inference mode."""
    return tf.function(lambda b: tf.argmax(forward(model, b, training=False)["logits"], -1),
                       reduce_retracing=True)


def predictions(predict, x, batch_size=256):
    """Runs `predict` (from `predictor`) on `x` batch by batch."""
    return np.concatenate([predict(tf.constant(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])


def adversarial(attack, x, y, batch_size=256):
    """Adversarial examples of `attack` for all of `x`, batch by batch."""
    return np.concatenate([attack(x[i:i + batch_size], y[i:i + batch_size]).numpy()
                           for i in range(0, len(x), batch_size)])


def evaluate(model, x, y, attacks=("clean", "pgd20"), eps=8 / 255, step_size=None,
             batch_size=256, norm="linf", seed=0):
    """Accuracy of `model` on `(x, y)` under each named attack.

    Returns a dict `{attack name: {"accuracy": float, "correct": bool array}}`; the
    per-example `correct` lets callers take point-wise worst cases over attacks.
    """
    y = np.asarray(y)
    predict = predictor(model)
    results = {}
    for name in attacks:
        attack = parse_attack(name, model, eps, step_size, norm, seed)
        inputs = x if attack is None else adversarial(attack, x, y, batch_size)
        correct = predictions(predict, inputs, batch_size) == y
        results[name] = {"accuracy": float(correct.mean()), "correct": correct}
    return results


def format_table(rows, columns):
    """A plain-text table: `rows` is a list of dicts, `columns` the keys to show."""
    cells = [[str(c) for c in columns]] + [
        [f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
