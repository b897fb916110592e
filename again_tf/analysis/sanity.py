"""Sanity checks against gradient masking (Carlini et al., 2019, "On Evaluating Adversarial
Robustness", arXiv:1902.06705, Section 5 "basic sanity tests").

A defense that only hides its gradients looks robust to gradient attacks but fails these
checks. Each check runs real attacks and is flagged in the report when it fails:

    accuracy_falls_with_eps     robust accuracy is non-increasing as ε grows;
    large_eps_reaches_zero      with a large ε (L∞: 0.5, L2: half the image's √D, both
                                enough to reach a uniform grey image) accuracy is ~0;
    more_steps_or_restarts      more PGD steps or random restarts never raise robust
                                accuracy;
    black_box_not_stronger      the gradient-free Square attack is not stronger than the
                                white-box attacks;
    transfer_not_stronger       adversarial examples crafted on a surrogate (another
                                model, or this model with its inserted auxiliary heads
                                removed) are not stronger than white-box ones.

    rep = sanity.run_checks(model, x, y, eps=8/255)
    print(sanity.format_report(rep))
"""

import math

import numpy as np

from again_tf import evaluation
from again_tf.attacks.pgd import PGD
from again_tf.attacks.square import Square


def without_inserts(model, input_shape):
    """A copy of an `again_tf` Classifier with its inserted layers removed (same weights).

    The backbone without the inserted (e.g. auxiliary-head) layers: a natural transfer
    surrogate. `input_shape` is the image shape, with or without the batch axis.
    Returns None for other models or a Classifier without inserts.
    """
    from again_tf.models.base import Classifier

    if not isinstance(model, Classifier) or not model.inserts:
        return None
    config = model.get_config()
    config["inserts"] = {}
    copy = type(model).from_config(config)
    shape = tuple(input_shape)[-3:]
    copy.build((None,) + shape)
    pairs = [(copy.normalizer, model.normalizer), (copy.stem, model.stem),
             (copy.pool, model.pool), (copy.fc, model.fc)]
    pairs += list(zip(copy.blocks, model.blocks))
    if model.neck is not None:
        pairs.append((copy.neck, model.neck))
    for new, old in pairs:
        new.set_weights(old.get_weights())
    return copy


_PREDICTORS = {}


def _predict(model):
    """One compiled predictor per model (a new tf.function per call would retrace)."""
    if id(model) not in _PREDICTORS or _PREDICTORS[id(model)][0] is not model:
        _PREDICTORS[id(model)] = (model, evaluation.predictor(model))
    return _PREDICTORS[id(model)][1]


def _correct(model, x, y, attack, batch_size):
    inputs = evaluation.adversarial(attack, x, y, batch_size)
    return evaluation.predictions(_predict(model), inputs, batch_size) == y


def _accuracy(model, x, y, attack, batch_size):
    return float(np.mean(_correct(model, x, y, attack, batch_size)))


def _pgd(model, eps, steps, norm, seed, step_size=None):
    """PGD at any ε (the `Attack` base accepts ε ≤ 1; larger L2 radii are set after)."""
    attack = PGD(model, min(eps, 1.0), (step_size or eps / 4) if eps <= 1 else 1.0, steps,
                 norm=norm, seed=seed)
    if eps > 1.0:
        attack.eps, attack.step_size = float(eps), float(step_size or eps / 4)
    return attack


def _check(name, passed, detail, values):
    return {"name": name, "passed": None if passed is None else bool(passed), "detail": detail,
            "values": values}


def run_checks(model, x, y, eps, norm="linf", batch_size=256, seed=0, steps=20,
               step_size=None, eps_factors=(0.25, 0.5, 1.0, 2.0), large_eps=None,
               steps_grid=(5, 20, 50), restarts=3, square_queries=1000, whitebox=None,
               surrogate=None, tolerance=0.01, zero_tolerance=0.05, verbose=0):
    """Runs the five checks on `(x, y)`; returns the report dict.

    Args:
        model: the classifier under evaluation.
        x, y: NumPy images in [0, 1] and labels (a few hundred are enough).
        eps, norm: the threat model.
        batch_size, seed: as in `evaluation.evaluate`.
        steps, step_size: the PGD used by the ε and transfer checks. Default 20 steps
            of ε/4.
        eps_factors: the ε grid of the first check, as multiples of `eps` (capped at 1
            for L∞).
        large_eps: the "unbounded" radius. Default 0.5 (L∞) or 0.5·√D (L2).
        steps_grid: PGD step counts of the third check. Default (5, 20, 50).
        restarts: random restarts compared with one run in the third check. Default 3.
        square_queries: Square's queries in the black-box check. Default 1000 (a cheap
            check; AutoAttack's Square uses 5000).
        whitebox: optional `{attack name: robust accuracy at eps}` of stronger white-box
            attacks already run (e.g. from `evaluation.evaluate`), compared too.
        surrogate: a Keras classifier to transfer from. Default: `without_inserts(model, ...)`
            when the model has inserted layers; otherwise this check is skipped.
        tolerance: slack for the comparisons, in accuracy (default 0.01 = 1 point; with
            n test images, results move by 1/n steps).
        zero_tolerance: the accuracy counted as "~0" at the large ε. Default 0.05.
        verbose: print each check as it finishes.

    Returns:
        {"checks": [{"name", "passed" (True, False, or None when skipped), "detail",
        "values"}], "failed": [names of failed checks], "passed": no check failed}.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    checks = []

    def done(check):
        checks.append(check)
        if verbose:
            status = {True: "ok", False: "FAILED", None: "skipped"}[check["passed"]]
            print(f"sanity {check['name']}: {status} — {check['detail']}")

    # 1. Robust accuracy falls as ε grows.
    grid = sorted({min(eps * f, 1.0) if norm == "linf" else eps * f for f in eps_factors})
    accs = [_accuracy(model, x, y, _pgd(model, e, steps, norm, seed, None), batch_size)
            for e in grid]
    rises = [(grid[i], grid[i + 1]) for i in range(len(grid) - 1)
             if accs[i + 1] > accs[i] + tolerance]
    done(_check("accuracy_falls_with_eps", not rises,
                "robust accuracy " + ", ".join(f"{a:.3f}@{e:.4g}" for e, a in zip(grid, accs))
                + (f"; rises between ε {rises}" if rises else ""),
                {"eps": grid, "accuracy": accs}))
    at_eps = accs[grid.index(min(grid, key=lambda e: abs(e - eps)))]

    # 2. A large ε drives accuracy to ~0.
    if large_eps is None:
        large_eps = 0.5 if norm == "linf" else 0.5 * math.sqrt(int(np.prod(x.shape[1:])))
    big = _accuracy(model, x, y, _pgd(model, large_eps, max(steps, 50), norm, seed), batch_size)
    done(_check("large_eps_reaches_zero", big <= zero_tolerance,
                f"robust accuracy {big:.3f} at ε={large_eps:.4g} (expected ≤ {zero_tolerance})",
                {"eps": large_eps, "accuracy": big}))

    # 3. More steps or restarts never raise robust accuracy.
    step_accs = [_accuracy(model, x, y, _pgd(model, eps, k, norm, seed, step_size), batch_size)
                 for k in steps_grid]
    single = _correct(model, x, y, _pgd(model, eps, steps, norm, seed, step_size), batch_size)
    worst = single.copy()
    for r in range(1, restarts):
        worst &= _correct(model, x, y, _pgd(model, eps, steps, norm, seed + r, step_size),
                          batch_size)
    bad_steps = [(steps_grid[i], steps_grid[i + 1]) for i in range(len(steps_grid) - 1)
                 if step_accs[i + 1] > step_accs[i] + tolerance]
    ok = not bad_steps and worst.mean() <= single.mean() + 1e-12
    done(_check("more_steps_or_restarts", ok,
                "PGD " + ", ".join(f"{k} steps {a:.3f}" for k, a in zip(steps_grid, step_accs))
                + f"; 1 restart {single.mean():.3f}, {restarts} restarts {worst.mean():.3f}"
                + (f"; more steps raised it: {bad_steps}" if bad_steps else ""),
                {"steps": list(steps_grid), "accuracy": step_accs,
                 "restarts": restarts, "accuracy_1_restart": float(single.mean()),
                 "accuracy_restarts": float(worst.mean())}))
    white = {f"pgd{k}": a for k, a in zip(steps_grid, step_accs)}
    white[f"pgd{steps}x{restarts}"] = float(worst.mean())
    white.update(whitebox or {})
    white_min = min(white.values())
    white_best = min(white, key=white.get)

    # 4. The black-box Square attack is not stronger than white-box attacks.
    square = Square(model, min(eps, 1.0), norm=norm, n_queries=square_queries, seed=seed)
    sq = _accuracy(model, x, y, square, batch_size)
    done(_check("black_box_not_stronger", sq >= white_min - tolerance,
                f"Square ({square_queries} queries) {sq:.3f} vs best white-box "
                f"{white_best} {white_min:.3f}",
                {"square": sq, "whitebox": white}))

    # 5. Transfer from a surrogate is not stronger than white-box.
    if surrogate is None:
        surrogate = without_inserts(model, x.shape)
        source = "the model without its inserted layers"
    else:
        source = "the given surrogate"
    if surrogate is None:
        done(_check("transfer_not_stronger", None,
                    "skipped: no surrogate (pass one, e.g. evaluate.py --surrogate_path)", {}))
    else:
        crafted = evaluation.adversarial(_pgd(surrogate, eps, steps, norm, seed, step_size),
                                         x, y, batch_size)
        transfer = float(np.mean(evaluation.predictions(_predict(model), crafted,
                                                         batch_size) == y))
        done(_check("transfer_not_stronger", transfer >= white_min - tolerance,
                    f"PGD-{steps} transferred from {source} {transfer:.3f} vs best white-box "
                    f"{white_best} {white_min:.3f}",
                    {"transfer": transfer, "whitebox_min": white_min}))
    failed = [c["name"] for c in checks if c["passed"] is False]
    return {"checks": checks, "failed": failed, "passed": not failed,
            "accuracy_at_eps": at_eps}


def format_report(rep):
    """One line per check: status, name and detail; failed checks are marked FAILED."""
    status = {True: "ok     ", False: "FAILED ", None: "skipped"}
    return "\n".join(f"{status[c['passed']]} {c['name']}: {c['detail']}" for c in rep["checks"])
