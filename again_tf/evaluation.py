"""Robust accuracy of a classifier under named attacks: `clean`, `pgd20`, `cw`, `aa`, ...

Attack names (`parse_attack`; ε, norm and step come from the caller):
    clean        no attack.
    fgsm         one step of ε (Goodfellow et al. 2015).
    pgdK         K-step PGD on cross-entropy, step ε/4 unless given, uniform random start
                 (Madry et al. 2018). pgd10/pgd20/pgd50/pgd100 are what the papers report.
    cw / cwK     C&W-∞: K-step PGD (default 30) on the C&W margin loss, as the TRADES,
                 MART and AWP papers report it.
    temp_pgd / temp_pgdK
                 Temperature-PGD (Tian et al., KDD 2021): K-step PGD (default 20) on
                 −log softmax(z/T)_y, T = `temperature` option (default 0.5, our choice).
                 `tpgd` / `tpgdK` is an old alias (torchattacks and MAIR call TRADES' KL
                 PGD "TPGD": the longer name cannot be mistaken for it).
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

Adaptive evaluation (`evaluate(..., loss="adaptive")`, the default; evaluate.py --loss):
models with inserted label-conditioned layers (ASE `again_*`, CAS `cas*`, CIFS `cifs`)
choose their channel masks from their own auxiliary heads, and an attack on the main
head alone overstates their robustness (`again_tf.heads`). For a model with
auxiliary heads every attack that takes a custom loss (fgsm, pgdK, cw, temp_pgd, apgd-ce,
apgd-dlr) runs once per objective of `ADAPTIVE` — "main" (its own loss on the main
logits), "combined" (ℓ(main) + β·mean_h ℓ(aux_h), β = the model's `aux_weight`, the β
it was trained with, default 2), "aux" (mean_h ℓ(aux_h)), ℓ being the attack's own loss
(CE, C&W margin, DLR, temperature CE), and "main_relaxed", "combined_relaxed": the same losses with the
gradient taken through the argmax that picks each mask (a straight-through softmax at
temperature `RELAX_TEMPERATURE` = 1, our choice: BPDA, Athalye et al., ICML 2018; the
loss values are the real model's) — and an example counts as robust only if it is
classified correctly under all of them; the entry keeps each objective's accuracy in
"by_loss". The official AGAIN/CAS/CIFS evaluation attacks "combined" alone
(`loss="combined"`). AutoAttack
(aa, aa_plus, aa_rand) runs as is on the main head, then APGD-CE with the version's
settings and each other objective on the points it left robust (each on all of those
points, so "by_loss" holds AA ∧ APGD-CE(objective)); its "accuracy_after" gets the
cumulative entries "apgd-ce[combined]", "apgd-ce[aux]", ... .
Attacks that follow the logits (apgd-t, fab, fab-t, square, cwl2) run once. For a model
without auxiliary heads "adaptive" is "main", at no extra cost.
"""

import inspect
import re
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from again_tf import catalog, heads
from again_tf.attacks import losses
from again_tf.attacks.apgd import APGD, APGDT
from again_tf.attacks.base import Attack
from again_tf.attacks.autoattack import COMPONENTS, AutoAttack, build_component
from again_tf.attacks.cw import CWL2
from again_tf.attacks.pgd import FGSM, PGD
from again_tf.attacks.temperature_pgd import DEFAULT_TEMPERATURE, TemperaturePGD  # noqa: F401
from again_tf.models.base import forward

DEFAULT_OPTIONS = dict(catalog.ATTACK_OPTIONS)  # AutoAttack's budget, our T-PGD/C&W-L2

AA_VERSIONS = {"aa": "standard", "aa_plus": "plus", "aa_rand": "rand"}

ATTACK_NAMES = ("clean, fgsm, pgdK (e.g. pgd20), cw / cwK, temp_pgd / temp_pgdK, aa, aa_plus, "
                "aa_rand, " + ", ".join(COMPONENTS) + ", cwl2")

RELAX_TEMPERATURE = 1.0  # T of the relaxed mask choice (our choice; module docstring)


def _head_objective_builder(name, relax_masks=None):
    """The `OBJECTIVES` builder of `heads.head_objective(name)`."""
    def builder(model, loss=losses.cross_entropy, aux_weight=heads.DEFAULT_AUX_WEIGHT):
        return heads.objective_fn(model, name, loss, aux_weight, relax_masks=relax_masks)
    return builder


# Attack objectives: name -> builder(model, loss=ℓ, aux_weight=β) -> None (the attack's
# own loss on the main logits) or loss_fn(x_adv, y) -> (batch,), maximized by the attacks
# that take a custom loss (`takes_objective`); ℓ is the attack's own per-example loss of
# logits. A builder of `model` alone (a loss-agnostic objective) is accepted too.
OBJECTIVES = {"main": lambda model, loss=None, aux_weight=None: None,
              "combined": _head_objective_builder("combined"),
              "aux": _head_objective_builder("aux"),
              # The same losses, differentiated through the masks' argmax choice (BPDA).
              "main_relaxed": _head_objective_builder("main", RELAX_TEMPERATURE),
              "combined_relaxed": _head_objective_builder("combined", RELAX_TEMPERATURE)}
# The objectives of loss="adaptive", in this order. The relaxed ones were added when, on a
# PreAct ResNet-18 again_pgd model, they lowered the per-image worst case further
# (PGD-20 on 300 Fashion-MNIST images: main 0.743, combined 0.620, aux 0.600,
# main_relaxed 0.663, combined_relaxed 0.597; worst of the first three 0.600, of all 0.597).
ADAPTIVE = ("main", "combined", "aux", "main_relaxed", "combined_relaxed")


def loss_modes():
    """The values `evaluate(loss=...)` accepts: "adaptive" and the `OBJECTIVES` names."""
    return ("adaptive",) + tuple(OBJECTIVES)


def takes_objective(attack):
    """True for the attacks that maximize a custom loss: PGD, FGSM, C&W-∞, temp_pgd, APGD-CE/DLR.

    APGD-T (its targeted DLR loss), FAB, Square and C&W-L2 follow the logits their own way.
    """
    return isinstance(attack, PGD) or (isinstance(attack, APGD)
                                       and not isinstance(attack, APGDT))


def build_objective(name, model, loss, aux_weight=heads.DEFAULT_AUX_WEIGHT):
    """The `loss_fn` of objective `name` for an attack whose own loss of logits is `loss`."""
    builder = OBJECTIVES[name]
    try:
        inspect.signature(builder).bind(model, loss=loss, aux_weight=aux_weight)
    except TypeError:  # a builder of the model alone
        return builder(model)
    return builder(model, loss=loss, aux_weight=aux_weight)


# attack -> {(objective, β): loss_fn}. `Attack.compiled` keys its traces by the loss
# function object, so an attack object passed to `evaluate` again reuses its traces.
_OBJECTIVES_OF = weakref.WeakKeyDictionary()


def objective_for(attack, name, model, aux_weight):
    """`build_objective` for `attack`, made once per attack, objective and β."""
    made = _OBJECTIVES_OF.setdefault(attack, {})
    key = (name, float(aux_weight))
    if key not in made:
        made[key] = build_objective(name, model, attack.loss, aux_weight)
    return made[key]


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
    match = re.fullmatch(r"(pgd|cw|temp_pgd|tpgd)(\d*)", name)  # tpgd: old alias
    if not match or (match.group(1) == "pgd" and not match.group(2)):
        raise ValueError(f"Unknown attack {name!r}. Expected one of: {ATTACK_NAMES}")
    kind, digits = match.group(1), match.group(2)
    if digits and int(digits) < 1:
        raise ValueError(f"Attack {name!r}: the number of steps must be at least 1")
    if kind in ("temp_pgd", "tpgd"):
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


def adversarial(attack, x, y, batch_size=256, loss_fn=None, progress=None):
    """Adversarial examples of `attack` for all of `x`, batch by batch.

    `loss_fn(x_adv, y)` replaces the attack's own loss (attacks that follow the logits,
    FAB, Square, C&W-L2, ignore it); `progress` is a `keras.utils.Progbar` to advance.
    """
    out = []
    for i in range(0, len(x), batch_size):
        xb = tf.constant(x[i:i + batch_size])
        yb = tf.constant(y[i:i + batch_size])
        # One trace per attack and objective (the attack keeps it), any batch size.
        out.append((attack(xb, yb) if loss_fn is None else attack(xb, yb, loss_fn)).numpy())
        if progress is not None:
            progress.add(len(xb))
    return np.concatenate(out) if out else np.zeros_like(x)


def _named_attack(item, model, eps, step_size, norm, seed, options):
    """(results key, attack) of an entry of `evaluate`'s `attacks`: a name, or an attack
    object (`Attack`, `AutoAttack`) built on `model`, keyed by its repr."""
    if isinstance(item, str):
        return item, parse_attack(item, model, eps, step_size, norm, seed, **options)
    if not isinstance(item, (Attack, AutoAttack)):
        raise ValueError(f"`attacks` holds {item!r}; expected attack names ({ATTACK_NAMES}) "
                         f"or again_tf.attacks objects")
    if item.model is not model:
        raise ValueError(f"`attacks` holds {item!r}, built on another model than the one "
                         f"evaluated; build it on `model`")
    return repr(item), item


trained_aux_weight = heads.trained_aux_weight  # β the heads were trained with, else 2.0


def evaluate(model, x, y, attacks=("clean", "pgd20"), eps=8 / 255, step_size=None,
             batch_size=256, norm="linf", seed=0, verbose=0, loss="adaptive",
             aux_weight=None, **options):
    """Accuracy of `model` on `(x, y)` under each named attack.

    Returns a dict `{attack name: {"accuracy": float, "correct": bool array,
    "predictions": int array (labels predicted on the attacked inputs), "seconds": float}}`;
    the per-example `correct` lets callers take point-wise worst cases over attacks
    (`worst_case`). AutoAttack entries also hold "accuracy_after" (robust accuracy after
    each component), "fooled_by" and "warnings". With several objectives (adaptive
    evaluation of a model with auxiliary heads, module docstring) an attack's entry is
    the per-example worst case over them and also holds "by_loss" ({objective:
    accuracy}) and "correct_by_loss" ({objective: bool array}); its "predictions" are,
    per example, those under the first objective (in `ADAPTIVE` order) that fooled it.

    Args:
        model: a Keras classifier of [0, 1] images returning logits.
        x, y: NumPy images in [0, 1] and integer labels.
        attacks: attack names (module docstring).
        eps, step_size, norm, seed: the threat model and the attacks' step and seed; every
            objective's run of an attack starts from the same seed (an attack object's
            runs, from its random state at the call).
        batch_size: images per attack call.
        verbose: 1 shows a progress bar per attack.
        loss: "adaptive" (default: the worst case over `ADAPTIVE` for a model with
            auxiliary heads, else "main") or one key of `OBJECTIVES` ("main", "combined",
            "aux"; "aux" needs auxiliary heads).
        aux_weight: β of the "combined" objective. Default: the β the model's heads were
            trained with (`Classifier.aux_weight`, saved with the model), else 2.0 (the
            AGAIN and CAS papers' β).
        **options: attack options (`DEFAULT_OPTIONS`), e.g. n_iter=100, n_queries=5000.

    Example:
        r = evaluate(model, x, y, ["clean", "pgd20"], eps=0.1)
        r["pgd20"]["accuracy"], r["pgd20"].get("by_loss")  # worst, {"main": ..., ...}
    """
    if loss not in loss_modes():
        raise ValueError(f"Unknown attack objective loss={loss!r}. Expected one of: "
                         f"{', '.join(loss_modes())}")
    if aux_weight is None:
        aux_weight = trained_aux_weight(model)
    y = np.asarray(y)
    x = np.asarray(x, np.float32)
    num_heads = (heads.num_aux_heads(model, x) if len(x) and loss in ("adaptive", "aux")
                 else 0)
    if loss == "aux" and not num_heads:
        raise ValueError(f"loss='aux' attacks the auxiliary heads, but {model.name!r} has "
                         f"none; expected loss='main' (or 'adaptive')")
    names = list(ADAPTIVE) if loss == "adaptive" and num_heads else (
        ["main"] if loss == "adaptive" else [loss])
    predict = predictor(model)
    results = {}
    for item in attacks:
        name, attack = _named_attack(item, model, eps, step_size, norm, seed, options)
        start = time.time()
        entry, by_pred = {}, None
        if attack is None:
            inputs = x
        elif isinstance(attack, AutoAttack):
            run = attack.run(x, y, batch_size=batch_size, verbose=verbose)
            inputs = run["x_adv"]
            entry = {"accuracy_after": run["accuracy_after"], "warnings": run["warnings"],
                     "fooled_by": run["fooled_by"]}
            if names != ["main"]:
                by_pred = _autoattack_objectives(model, name, run, x, y, names, eps, norm,
                                                 seed, batch_size, aux_weight, predict,
                                                 verbose, options)
        elif takes_objective(attack):
            by_pred = {}
            # Each objective's run starts from the same random state (a named attack's is
            # `seed`'s, an attack object's the one it has at this call).
            start_state = attack.seed_generator.state.numpy()
            for objective in names:
                attack.seed_generator.state.assign(start_state)
                bar = keras.utils.Progbar(len(x), unit_name="image") if verbose else None
                if verbose:
                    print(f"{name}: {attack!r}" + (f", {objective} loss" if len(names) > 1
                                                   or objective != "main" else ""))
                adv = adversarial(attack, x, y, batch_size, progress=bar,
                                  loss_fn=objective_for(attack, objective, model, aux_weight))
                by_pred[objective] = predictions(predict, adv, batch_size)
            inputs = None
        else:
            bar = keras.utils.Progbar(len(x), unit_name="image") if verbose else None
            if verbose:
                print(f"{name}: {attack!r}")
            inputs = adversarial(attack, x, y, batch_size, progress=bar)
        if by_pred is not None and len(by_pred) == 1:
            pred = next(iter(by_pred.values()))
        elif by_pred is not None:
            pred, correct_by = worst_predictions(y, by_pred)
            entry.update(by_loss={o: float(c.mean()) for o, c in correct_by.items()},
                         correct_by_loss=correct_by)
        else:
            pred = predictions(predict, inputs, batch_size)
        correct = pred == y
        results[name] = {"accuracy": float(correct.mean()), "correct": correct,
                         "predictions": pred, "seconds": time.time() - start, **entry}
        if verbose:
            detail = ", ".join(f"{o} {a:.2%}" for o, a in entry.get("by_loss", {}).items())
            print(f"{name}: accuracy {results[name]['accuracy']:.2%}"
                  + (f" (worst of: {detail})" if detail else "")
                  + f" ({results[name]['seconds']:.1f} s)")
    return results


def worst_predictions(y, by_pred):
    """Per-example worst case over objectives' predictions `{objective: int array}`.

    Returns `(predictions, {objective: correct bool array})`: an example keeps the
    prediction under the first objective (in `by_pred`'s order) that misclassified it,
    else the first objective's (correct) one; it is correct only if correct under all.
    """
    correct_by = {o: np.asarray(p) == y for o, p in by_pred.items()}
    first = next(iter(by_pred))
    pred = np.array(by_pred[first], copy=True)
    for o in reversed(list(by_pred)):
        wrong = ~correct_by[o]
        pred[wrong] = np.asarray(by_pred[o])[wrong]
    return pred, correct_by


def _autoattack_objectives(model, name, run, x, y, names, eps, norm, seed, batch_size,
                           aux_weight, predict, verbose, options):
    """AutoAttack's run (main head) and APGD-CE on each other objective of `names`.

    Each APGD-CE (the AutoAttack version's settings) attacks all the points AutoAttack
    left robust, so objective o's predictions are those of AA ∧ APGD-CE(o). Extends
    `run`'s "accuracy_after" (cumulative, as AutoAttack's own entries) and "fooled_by".
    Returns `{objective: predictions}`, "main" being AutoAttack's.
    """
    opts = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    robust = np.asarray(run["robust"], bool)
    idx = np.flatnonzero(robust)
    by_pred = {"main": np.asarray(run["predictions"])}
    still = robust.copy()
    for objective in names:
        if objective == "main":
            continue
        component = build_component("apgd-ce", model, eps, norm=norm,
                                    version=AA_VERSIONS[name], n_iter=opts["n_iter"],
                                    n_queries=opts["n_queries"], eot_iter=opts["eot_iter"],
                                    n_target_classes=opts["n_target_classes"], seed=seed)
        pred = by_pred["main"].copy()
        start = time.time()
        if len(idx):
            bar = keras.utils.Progbar(len(idx), unit_name="image") if verbose else None
            adv = adversarial(component, x[idx], y[idx], batch_size, progress=bar,
                              loss_fn=build_objective(objective, model, component.loss,
                                                      aux_weight))
            pred[idx] = predictions(predict, adv, batch_size)
        by_pred[objective] = pred
        key = f"apgd-ce[{objective}]"
        newly = still & (pred != y)
        run["fooled_by"][newly] = key
        still &= pred == y
        run["accuracy_after"][key] = float(still.mean()) if len(y) else 0.0
        if verbose:
            print(f"{name}: robust accuracy after APGD-CE on the {objective} loss: "
                  f"{run['accuracy_after'][key]:.2%} ({time.time() - start:.1f} s)")
    return by_pred


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
