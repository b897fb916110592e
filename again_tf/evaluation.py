"""Robust accuracy of a classifier under named attacks: `clean`, `pgd20`, `cw`, `aa`, ...

Attack names (`parse_attack`; ε, norm and step come from the caller):
    clean        no attack.
    fgsm         one step of ε (Goodfellow et al. 2015).
    pgdK         K-step PGD on cross-entropy, step ε/4 unless given, uniform random start
                 (Madry et al. 2018). pgd10/pgd20/pgd50/pgd100 are what the papers report.
    cw / cwK     C&W-∞: K-step PGD (default 30) on the C&W margin loss, as the TRADES,
                 MART and AWP papers report it.
    tpgd / tpgdK Temperature-PGD (Tian et al., KDD 2021): K-step PGD (default 20) on
                 −log softmax(z/T)_y, T = `temperature` option (default 0.5, our choice).
    aa           AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (Croce &
                 Hein, ICML 2020), each on the points still robust.
    aa_plus      AutoAttack "plus": APGD-CE, APGD-DLR, FAB (5 restarts), Square, APGD-T, FAB-T.
    aa_rand      AutoAttack "rand" for randomized defenses: APGD-CE, APGD-DLR with EOT (20).
    apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square
                 one AutoAttack component alone, with the standard version's settings.
    cwl2         Carlini-Wagner L2 (IEEE S&P 2017), 9 binary-search steps × 1000 Adam
                 steps; an example counts as fooled only within ε (in the threat model's norm).

Options (keyword arguments of `parse_attack`/`evaluate`, flags of evaluate.py):
`n_iter` (APGD/FAB iterations, 100), `n_queries` (Square, 5000), `eot_iter` (20),
`n_target_classes` (9), `temperature` (0.5), `cwl2_steps` (1000), `cwl2_search_steps` (9).
"""

import re
import time

import keras
import numpy as np
import tensorflow as tf

from again_tf.attacks.autoattack import COMPONENTS, AutoAttack, build_component
from again_tf.attacks.cw import CWL2
from again_tf.attacks.pgd import FGSM, PGD
from again_tf.attacks.temperature_pgd import DEFAULT_TEMPERATURE, TemperaturePGD
from again_tf.models.base import forward

DEFAULT_OPTIONS = dict(n_iter=100, n_queries=5000, eot_iter=20, n_target_classes=9,
                       temperature=DEFAULT_TEMPERATURE, cwl2_steps=1000, cwl2_search_steps=9)

AA_VERSIONS = {"aa": "standard", "aa_plus": "plus", "aa_rand": "rand"}

ATTACK_NAMES = ("clean, fgsm, pgdK (e.g. pgd20), cw / cwK, tpgd / tpgdK, aa, aa_plus, "
                "aa_rand, " + ", ".join(COMPONENTS) + ", cwl2")

# Attack objectives, for adaptive evaluation: name -> builder(model) -> None (each attack
# uses its own loss on the main logits) or loss_fn(x_adv, y) -> (batch,) maximized by the
# gradient attacks that accept one (PGD, FGSM, C&W-∞, Temperature-PGD, APGD-CE/DLR).
# Models with auxiliary heads need adaptive evaluation: attack the main loss and the
# combined main + auxiliary loss (`defenses.base.head_loss`) and report the worse. Add
# it here, e.g. OBJECTIVES["combined"] = lambda model: <its loss_fn>, and run
# evaluate(..., loss="combined") beside loss="main".
OBJECTIVES = {"main": lambda model: None}


def parse_attack(name, model, eps, step_size=None, norm="linf", seed=0, **options):
    """Builds the attack called `name` (see the module docstring); None for "clean".

    Returns an `Attack` (call it on a batch) or an `AutoAttack` (its `run` evaluates a
    whole set). Raises ValueError naming the attack for an unknown name or option.
    """
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown attack option(s) {unknown}. Expected: "
                         f"{', '.join(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    step_size = step_size or eps / 4
    if name == "clean":
        return None
    if name == "fgsm":
        return FGSM(model, eps, norm=norm)
    if name in AA_VERSIONS:
        return AutoAttack(model, eps, norm=norm, version=AA_VERSIONS[name],
                          n_iter=opts["n_iter"], n_queries=opts["n_queries"],
                          eot_iter=opts["eot_iter"], n_target_classes=opts["n_target_classes"],
                          seed=seed)
    if name in COMPONENTS:
        return build_component(name, model, eps, norm=norm, n_iter=opts["n_iter"],
                               n_queries=opts["n_queries"],
                               n_target_classes=opts["n_target_classes"], seed=seed)
    if name == "cwl2":
        return CWL2(model, eps=eps, norm=norm, max_iterations=opts["cwl2_steps"],
                    binary_search_steps=opts["cwl2_search_steps"], seed=seed)
    match = re.fullmatch(r"(pgd|cw|tpgd)(\d*)", name)
    if not match or (match.group(1) == "pgd" and not match.group(2)):
        raise ValueError(f"Unknown attack {name!r}. Expected one of: {ATTACK_NAMES}")
    kind, digits = match.group(1), match.group(2)
    if digits and int(digits) < 1:
        raise ValueError(f"Attack {name!r}: the number of steps must be at least 1")
    if kind == "tpgd":
        return TemperaturePGD(model, eps, step_size, int(digits or 20), norm=norm, seed=seed,
                              temperature=opts["temperature"])
    return PGD(model, eps, step_size, int(digits or 30), norm=norm, seed=seed,
               loss="ce" if kind == "pgd" else "cw")


def predictor(model):
    """A compiled function: images -> argmax predictions of `model` in inference mode."""
    return tf.function(lambda b: tf.argmax(forward(model, b, training=False)["logits"], -1),
                       reduce_retracing=True)


def predictions(predict, x, batch_size=256):
    """Runs `predict` (from `predictor`) on `x` batch by batch."""
    return np.concatenate([predict(tf.constant(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])


def _with_objective(attack, loss_fn):
    """`attack` called with a custom objective, compiled once per attack."""
    cache = attack.__dict__.setdefault("_objective_fns", {})
    if id(loss_fn) not in cache:
        spec_fn = tf.function(lambda a, b: attack.perturb(a, b, loss_fn), reduce_retracing=True)
        cache[id(loss_fn)] = (loss_fn, spec_fn)
    return cache[id(loss_fn)][1]


def adversarial(attack, x, y, batch_size=256, loss_fn=None, progress=None):
    """Adversarial examples of `attack` for all of `x`, batch by batch.

    `loss_fn(x_adv, y)` replaces the attack's own loss (attacks that follow the logits,
    FAB, Square, C&W-L2, ignore it); `progress` is a `keras.utils.Progbar` to advance.
    """
    call = attack if loss_fn is None else _with_objective(attack, loss_fn)
    out = []
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i:i + batch_size])
        yb = tf.constant(y[i:i + batch_size])
        out.append(call(xb, yb).numpy())
        if progress is not None:
            progress.add(len(xb))
    return np.concatenate(out) if out else np.zeros_like(x)


def evaluate(model, x, y, attacks=("clean", "pgd20"), eps=8 / 255, step_size=None,
             batch_size=256, norm="linf", seed=0, verbose=0, loss="main", **options):
    """Accuracy of `model` on `(x, y)` under each named attack.

    Returns a dict `{attack name: {"accuracy": float, "correct": bool array,
    "predictions": int array (labels predicted on the attacked inputs), "seconds": float}}`;
    the per-example `correct` lets callers take point-wise worst cases over attacks
    (`worst_case`). AutoAttack entries also hold "accuracy_after" (robust accuracy after
    each component), "fooled_by" and "warnings".

    Args:
        model: a Keras classifier of [0, 1] images returning logits.
        x, y: NumPy images in [0, 1] and integer labels.
        attacks: attack names (module docstring).
        eps, step_size, norm, seed: the threat model and the attacks' step and seed.
        batch_size: images per attack call.
        verbose: 1 shows a progress bar per attack.
        loss: the attack objective, a key of `OBJECTIVES` (default "main").
        **options: attack options (`DEFAULT_OPTIONS`), e.g. n_iter=100, n_queries=5000.
    """
    if loss not in OBJECTIVES:
        raise ValueError(f"Unknown attack objective loss={loss!r}. Expected one of: "
                         f"{', '.join(OBJECTIVES)}")
    loss_fn = OBJECTIVES[loss](model)
    y = np.asarray(y)
    x = np.asarray(x, np.float32)
    predict = predictor(model)
    results = {}
    for name in attacks:
        attack = parse_attack(name, model, eps, step_size, norm, seed, **options)
        start = time.time()
        entry = {}
        if attack is None:
            inputs = x
        elif isinstance(attack, AutoAttack):
            run = attack.run(x, y, batch_size=batch_size, verbose=verbose)
            inputs = run["x_adv"]
            entry = {"accuracy_after": run["accuracy_after"], "warnings": run["warnings"],
                     "fooled_by": run["fooled_by"]}
        else:
            bar = keras.utils.Progbar(len(x), unit_name="image") if verbose else None
            if verbose:
                print(f"{name}: {attack!r}")
            inputs = adversarial(attack, x, y, batch_size, loss_fn=loss_fn, progress=bar)
        pred = predictions(predict, inputs, batch_size)
        correct = pred == y
        results[name] = {"accuracy": float(correct.mean()), "correct": correct,
                         "predictions": pred, "seconds": time.time() - start, **entry}
        if verbose:
            print(f"{name}: accuracy {results[name]['accuracy']:.2%} "
                  f"({results[name]['seconds']:.1f} s)")
    return results


def worst_case(results, names=None):
    """Point-wise worst case over attacks: correct only if correct under every one.

    Returns `{"accuracy": float, "correct": bool array}` over `names` (default: all
    entries of an `evaluate` result).
    """
    names = list(names or results)
    if not names:
        raise ValueError("worst_case needs at least one attack result")
    correct = np.logical_and.reduce([np.asarray(results[n]["correct"]) for n in names])
    return {"accuracy": float(correct.mean()), "correct": correct}


def format_table(rows, columns):
    """A plain-text table: `rows` is a list of dicts, `columns` the keys to show."""
    cells = [[str(c) for c in columns]] + [
        [f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows, columns):
    """The same table as Markdown."""
    def cell(r, c):
        v = r.get(c, "")
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(str(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
