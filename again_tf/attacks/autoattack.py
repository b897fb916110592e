"""AutoAttack (Croce & Hein, ICML 2020) in native TensorFlow: a cascade of four attacks.

Follows fra31/auto-attack's `AutoAttack.run_standard_evaluation`: each attack runs only on
the points still robust after the previous ones, so the final robust accuracy is the
point-wise worst case over the attacks.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from again_tf.attacks.apgd import APGD, APGDT
from again_tf.attacks.geometry import batch_norm
from again_tf.attacks.fab import FAB
from again_tf.attacks.square import Square
from again_tf.models.base import forward

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def build_component(name, model, eps, norm="linf", version="standard", n_iter=100,
                    n_queries=5000, eot_iter=20, n_target_classes=9, seed=0, training=False):
    """One AutoAttack component with the settings of `version` (official `set_version`).

    standard: APGD-CE (1 restart), APGD-T (9 targets × 1 restart), FAB-T (9 targets × 1),
    Square (5000 queries, p_init 0.8, 1 restart). plus: APGD-CE, APGD-DLR and FAB with 5
    restarts, then Square, APGD-T, FAB-T. rand: APGD-CE and APGD-DLR, 1 restart, with
    EOT over `eot_iter` = 20 forward passes.
    """
    restarts = 5 if version == "plus" else 1
    eot = eot_iter if version == "rand" else 1
    common = dict(eps=eps, norm=norm, seed=seed, training=training)
    if name in ("apgd-ce", "apgd-dlr"):
        return APGD(model, loss=name[5:], n_iter=n_iter, n_restarts=restarts, eot_iter=eot,
                    **common)
    if name == "apgd-t":
        return APGDT(model, n_iter=n_iter, n_restarts=1, n_target_classes=n_target_classes,
                     eot_iter=eot, **common)
    if name == "fab":
        return FAB(model, targeted=False, n_iter=n_iter, n_restarts=restarts, **common)
    if name == "fab-t":
        return FAB(model, targeted=True, n_iter=n_iter, n_restarts=1,
                   n_target_classes=n_target_classes, **common)
    if name == "square":
        return Square(model, n_queries=n_queries, p_init=0.8, n_restarts=1, **common)
    raise ValueError(f"Unknown AutoAttack component {name!r}. Expected one of: "
                     f"{', '.join(COMPONENTS)}")


def zero_gradient_warning(component, points, attacked):
    """The official zero-gradient warning (`checks.check_zero_gradients`), once per component.

    The official code warns once per run (each restart and target class) with that run's
    count; here a point is counted once however many of the component's runs saw it.
    """
    return (f"{component.upper()}: {points} of the {attacked} points it attacked "
            f"({points / max(attacked, 1):.1%}) have a zero gradient at the start of a run: "
            f"gradient-based attacks get no direction there, so the evaluation may be "
            f"unreliable for them (official check_zero_gradients)")


class AutoAttack:
    """The AutoAttack cascade: robust accuracy after each attack and point-wise overall.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020; follows fra31/auto-attack. The clean
    predictions are taken first; then each component attacks, batch by batch, only the
    points still classified correctly, and a point is non-robust as soon as one
    component finds an adversarial example for it (checked by re-predicting it). The
    reported robust accuracy is therefore the point-wise worst case over all
    components, and the accuracy after each component never increases.

    Args:
        model: a Keras classifier mapping [0, 1] images to logits.
        eps: ε, in [0, 1] pixel units.
        norm: "linf" or "l2" (the L2 standard version uses the L2 variants).
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus" (APGD-CE, APGD-DLR,
            FAB, Square, APGD-T, FAB-T with more restarts) or "rand" (APGD-CE and
            APGD-DLR with EOT, for randomized defenses). Default "standard".
        attacks: a custom list of component names (overrides the version's list;
            components keep the version's settings).
        n_iter: APGD/FAB iterations. Default 100 (official).
        n_queries: Square's queries. Default 5000 (official).
        eot_iter: EOT passes of the "rand" version. Default 20 (official).
        n_target_classes: targets of APGD-T and FAB-T. Default 9 (official).
        seed: seed of every component's randomness. Default 0.
        training: BatchNorm mode of the model during the attacks. Default False.

    Example:
        result = AutoAttack(model, eps=8/255).run(x, y, batch_size=250, verbose=1)
        result["robust_accuracy"], result["accuracy_after"]   # final, per component
    """

    def __init__(self, model, eps=8 / 255, norm="linf", version="standard", attacks=None,
                 n_iter=100, n_queries=5000, eot_iter=20, n_target_classes=9, seed=0,
                 training=False):
        if version not in VERSIONS:
            raise ValueError(f"Unknown AutoAttack version {version!r}. Expected one of: "
                             f"{', '.join(VERSIONS)}")
        self.model = model
        self.eps = float(eps)
        self.norm = norm
        self.version = version
        self.attacks = tuple(attacks or VERSIONS[version])
        self.training = bool(training)
        self.components = {
            name: build_component(name, model, eps, norm=norm, version=version, n_iter=n_iter,
                                  n_queries=n_queries, eot_iter=eot_iter,
                                  n_target_classes=n_target_classes, seed=seed,
                                  training=training)
            for name in self.attacks}
        self._predict = None

    def predict(self, x):
        """Argmax predictions in inference mode (compiled once for any batch size)."""
        if self._predict is None:
            spec = tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)
            self._predict = tf.function(
                lambda b: tf.argmax(forward(self.model, b, training=False)["logits"], -1,
                                    output_type=tf.int32), input_signature=[spec],
                autograph=False)
        return self._predict(tf.convert_to_tensor(x, tf.float32)).numpy()

    def checks(self, x, y):
        """The official sanity warnings that are cheap to run (randomness, probabilities,
        number of classes), as a list of strings."""
        warnings = []
        batch = tf.convert_to_tensor(x[:256], tf.float32)
        outs = [forward(self.model, batch, training=False)["logits"].numpy() for _ in range(3)]
        if self.version != "rand":
            unit = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10) for o in outs]
            if max(np.abs(a - b).max() for a in unit for b in unit) > 1e-4:
                warnings.append("the model's outputs change between calls: it seems to be a "
                                "randomized defense, use version='rand' (aa_rand)")
        out = outs[0]
        if out.max() < 1 + 1e-5 and out.min() > -1e-5 and np.all(np.abs(out.sum(-1) - 1) < 1e-5):
            warnings.append("the model's outputs look like probabilities: AutoAttack needs "
                            "logits")
        classes = out.shape[-1]
        if any(a in self.attacks for a in ("apgd-t", "fab-t")) and classes < 10:
            warnings.append(f"only {classes} classes: APGD-T/FAB-T use {classes - 1} target "
                            f"classes instead of 9")
        del y
        return warnings

    def run(self, x, y, batch_size=250, verbose=0):
        """Runs the cascade on `(x, y)` (NumPy arrays); returns a dict of results.

        Keys: "clean_accuracy"; "accuracy_after" ({component: robust accuracy after it,
        cumulative}); "robust_accuracy" (final, point-wise worst case); "robust" (bool per
        example); "x_adv" (adversarial examples, the clean input where none was found);
        "predictions" (the model's labels on x_adv); "fooled_by" (per example, the name
        of the component that fooled it, "" if none, "clean" if misclassified clean);
        "seconds" ({component: seconds}); "max_perturbation"; "zero_gradients"
        ({component: points with a zero gradient at the start of one of its runs}, for the
        components the official code checks: APGD-DLR and APGD-T; see `APGD`); "warnings"
        (the official checks' messages, including one per component with zero gradients).
        """
        x = np.asarray(x, np.float32)
        y = np.asarray(y).astype(np.int32)
        n = len(y)
        start = time.time()
        pred = np.concatenate([self.predict(x[i:i + batch_size])
                               for i in range(0, n, batch_size)]) if n else np.zeros(0, np.int32)
        robust = pred == y
        fooled_by = np.where(robust, "", "clean").astype(object)
        x_adv = x.copy()
        adv_pred = pred.copy()
        result = {"clean_accuracy": float(robust.mean()) if n else 0.0, "accuracy_after": {},
                  "seconds": {"clean": time.time() - start}, "warnings": self.checks(x, y)}
        if verbose:
            print(f"AutoAttack ({self.version}, {self.norm}, eps={self.eps:.4g}): "
                  f"{', '.join(self.attacks)}; clean accuracy {result['clean_accuracy']:.2%}")
        result["zero_gradients"] = {}
        for name in self.attacks:
            attack = self.components[name]
            idx = np.flatnonzero(robust)
            start = time.time()
            checks_zero = getattr(attack, "checks_zero_gradients", False)
            if checks_zero:
                attack.zero_gradient_points.assign(0)
            bar = keras.utils.Progbar(len(idx), unit_name="image") if verbose and len(idx) else None
            for i in range(0, len(idx), batch_size):
                b = idx[i:i + batch_size]
                adv = attack(x[b], y[b]).numpy()
                out = self.predict(adv)
                hit = out != y[b]
                x_adv[b[hit]] = adv[hit]
                adv_pred[b[hit]] = out[hit]
                robust[b[hit]] = False
                fooled_by[b[hit]] = name
                if bar is not None:
                    bar.add(len(b), values=[("robust", float(robust.mean()))])
            result["accuracy_after"][name] = float(robust.mean()) if n else 0.0
            result["seconds"][name] = time.time() - start
            if checks_zero:
                zero = int(attack.zero_gradient_points.numpy())
                result["zero_gradients"][name] = zero
                if zero:
                    result["warnings"].append(zero_gradient_warning(name, zero, len(idx)))
            if verbose:
                print(f"robust accuracy after {name.upper()}: "
                      f"{result['accuracy_after'][name]:.2%} ({result['seconds'][name]:.1f} s)")
        after = result["accuracy_after"]
        if "square" in after and len(after) > 1:
            white = min(v for k, v in after.items() if k != "square")
            if after["square"] < white - 0.002:
                result["warnings"].append(
                    f"Square (black-box) lowered the robust accuracy by "
                    f"{white - after['square']:.2%} after the white-box attacks: the "
                    f"gradient-based evaluation may be unreliable (gradient masking?)")
        delta = tf.convert_to_tensor(x_adv - x)
        result.update(
            robust_accuracy=float(robust.mean()) if n else 0.0, robust=robust, x_adv=x_adv,
            predictions=adv_pred, fooled_by=fooled_by,
            max_perturbation=float(tf.reduce_max(batch_norm(delta, self.norm))) if n else 0.0)
        if verbose:
            for w in result["warnings"]:
                print(f"Warning: {w}")
            print(f"AutoAttack robust accuracy: {result['robust_accuracy']:.2%} "
                  f"(max {self.norm} perturbation {result['max_perturbation']:.5f})")
        return result

    def __call__(self, x, y, loss_fn=None):
        """The cascade on one batch; returns its adversarial examples (clean where none).

        Each component attacks its own loss; `loss_fn` is refused (to attack a model's
        other heads, `evaluation.evaluate(..., loss="adaptive")`)."""
        if loss_fn is not None:
            raise ValueError("AutoAttack runs its components' own losses; it takes no "
                             "`loss_fn` (for auxiliary heads use evaluation.evaluate(..., "
                             "loss='adaptive'))")
        return tf.convert_to_tensor(self.run(np.asarray(x), np.asarray(y),
                                             batch_size=max(len(y), 1))["x_adv"])

    def __repr__(self):
        return (f"AutoAttack(version={self.version!r}, eps={self.eps:g}, norm={self.norm!r}, "
                f"attacks={list(self.attacks)})")
