"""Class-wise robustness: per-class accuracy, worst class, attack confusion, weight norms.

Tian et al., "Analysis and Applications of Class-wise Robustness in Adversarial
Training" (KDD 2021) found that adversarially trained models are far less robust on some
classes than on others, that a class is mostly attacked into a few semantically similar
classes, and that a class's robustness correlates with the norm of its classifier
weights. `report` measures all three from evaluation results; `save_json` and `plot`
write them out.

    results = evaluation.evaluate(model, x, y, ["clean", "pgd20", "aa"])
    rep = classwise.report(y, {n: r["predictions"] for n, r in results.items()}, model=model)
    classwise.plot(rep, "runs/x/eval")   # runs/x/eval_classwise_accuracy.png, ...
"""

import json
import os
import re

import numpy as np


def classifier_weight_norms(model, num_classes=None):
    """‖w_c‖₂ of each class's weights in the final Dense layer, or None.

    For an `again_tf.models.Classifier` the layer is `model.fc`; for other Keras models
    the last layer if it is a Dense layer (with `num_classes` units when given). Keras
    kernels are `(features, classes)`: class c's weight vector is column c (the row c of
    the PyTorch `Linear.weight` the paper uses).
    """
    import keras

    from again_tf.models.base import Classifier

    layer = getattr(model, "fc", None) if isinstance(model, Classifier) else None
    if layer is None:
        layers = getattr(model, "layers", [])
        layer = layers[-1] if layers else None
    if not isinstance(layer, keras.layers.Dense) or not layer.built:
        return None
    kernel = np.asarray(layer.kernel.numpy() if hasattr(layer.kernel, "numpy") else layer.kernel)
    if num_classes is not None and kernel.shape[-1] != num_classes:
        return None
    return np.linalg.norm(kernel, axis=0)


def _per_class_accuracy(y, pred, num_classes):
    acc = []
    for c in range(num_classes):
        mask = y == c
        acc.append(float((pred[mask] == c).mean()) if mask.any() else None)
    return acc


def _worst(acc, names):
    valid = [(a, c) for c, a in enumerate(acc) if a is not None]
    if not valid:
        return None
    a, c = min(valid)
    return {"class": c, "name": names[c], "accuracy": a}


def report(y, predictions, num_classes=None, class_names=None, model=None, clean="clean"):
    """The class-wise report of a set of evaluation results.

    Args:
        y: true labels, `(N,)`.
        predictions: `{attack name: labels predicted on the attacked inputs (N,)}`; the
            entry `clean` (default "clean") is the clean predictions, if present.
        num_classes: default `max(label) + 1` over labels and predictions.
        class_names: one name per class; default "0", "1", ...
        model: the classifier, for its per-class weight norms (optional).
        clean: which entry of `predictions` is the clean one.

    Returns a JSON-serializable dict:
        "num_classes", "class_names", "counts" (examples per class);
        "attacks": {name: {"accuracy", "accuracy_per_class" (None for absent classes),
            "worst_class" ({"class", "name", "accuracy"}), "best_class", "gap" (best −
            worst class accuracy), "confusion" (K×K counts: row = true class, column =
            prediction under the attack), "attacked_into" ({source class name: [[target
            class name, count], ...] most frequent first, over the examples classified
            correctly when clean and misclassified under the attack, or over all
            misclassified examples when there is no clean entry})}};
        "weight_norms": per-class ‖w_c‖ or None, and "weight_norm_correlation": {attack:
            Pearson r between weight norm and per-class accuracy} (None without norms).
    """
    y = np.asarray(y).astype(np.int64)
    preds = {name: np.asarray(p).astype(np.int64) for name, p in predictions.items()}
    for name, p in preds.items():
        if p.shape != y.shape:
            raise ValueError(f"predictions[{name!r}] has shape {p.shape}; expected {y.shape} "
                             f"(one label per example)")
    if num_classes is None:
        num_classes = int(max([y.max(initial=0)] + [p.max(initial=0) for p in preds.values()])) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names; expected {num_classes}")
    clean_ok = preds[clean] == y if clean in preds else None
    out = {"num_classes": num_classes, "class_names": names,
           "counts": np.bincount(y, minlength=num_classes).astype(int).tolist(), "attacks": {}}
    for name, pred in preds.items():
        acc = _per_class_accuracy(y, pred, num_classes)
        confusion = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(confusion, (y, pred), 1)
        fooled = pred != y
        if clean_ok is not None and name != clean:
            fooled &= clean_ok
        into = {}
        for c in range(num_classes):
            targets = np.bincount(pred[fooled & (y == c)], minlength=num_classes)
            order = [t for t in np.argsort(-targets, kind="stable") if targets[t] > 0]
            into[names[c]] = [[names[t], int(targets[t])] for t in order]
        worst = _worst(acc, names)
        best = _worst([None if a is None else -a for a in acc], names)
        if best is not None:
            best["accuracy"] = -best["accuracy"]
        out["attacks"][name] = {
            "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "accuracy_per_class": acc, "worst_class": worst, "best_class": best,
            "gap": None if worst is None else best["accuracy"] - worst["accuracy"],
            "confusion": confusion.tolist(), "attacked_into": into}
    norms = classifier_weight_norms(model, num_classes) if model is not None else None
    out["weight_norms"] = None if norms is None else [float(v) for v in norms]
    out["weight_norm_correlation"] = None
    if norms is not None:
        out["weight_norm_correlation"] = {}
        for name, entry in out["attacks"].items():
            pairs = [(n, a) for n, a in zip(norms, entry["accuracy_per_class"]) if a is not None]
            r = None
            if len(pairs) > 2:
                n_, a_ = np.array(pairs).T
                if n_.std() > 0 and a_.std() > 0:
                    r = float(np.corrcoef(n_, a_)[0, 1])
            out["weight_norm_correlation"][name] = r
    return out


def save_json(rep, path):
    """Writes the report as JSON (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
    return path


def _slug(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot(rep, prefix):
    """Saves the report's plots as PNGs named `<prefix>_classwise_*.png`; returns the paths.

    `_classwise_accuracy.png`: per-class accuracy, one bar per attack (clean included);
    `_classwise_confusion_<attack>.png`: the row-normalized source → adversarial class
    matrix of each attack but clean; `_classwise_weight_norms.png` (with weight norms):
    per-class weight norm against per-class accuracy under the strongest attack.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    names = rep["class_names"]
    k = rep["num_classes"]
    attacks = list(rep["attacks"])
    paths = []

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * k + 2), 4.0))
    width = 0.8 / max(len(attacks), 1)
    for i, name in enumerate(attacks):
        acc = [np.nan if a is None else a for a in rep["attacks"][name]["accuracy_per_class"]]
        ax.bar(np.arange(k) + (i - (len(attacks) - 1) / 2) * width, acc, width,
               label=f"{name} ({rep['attacks'][name]['accuracy']:.1%})")
    ax.set_xticks(np.arange(k))
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 3 else 0,
                       ha="right" if max(len(n) for n in names) > 3 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Per-class accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{prefix}_classwise_accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    for name in attacks:
        if name == "clean":
            continue
        confusion = np.array(rep["attacks"][name]["confusion"], np.float64)
        rows = confusion.sum(1, keepdims=True)
        share = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * k + 2), max(4.0, 0.5 * k + 1.5)))
        image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(np.arange(k))
        ax.set_yticks(np.arange(k))
        ax.set_xticklabels(names, rotation=90)
        ax.set_yticklabels(names)
        ax.set_xlabel(f"predicted under {name}")
        ax.set_ylabel("true class")
        ax.set_title(f"Source → adversarial class ({name})")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        paths.append(f"{prefix}_classwise_confusion_{_slug(name)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    if rep.get("weight_norms") is not None and attacks:
        strongest = min(attacks, key=lambda n: rep["attacks"][n]["accuracy"])
        acc = rep["attacks"][strongest]["accuracy_per_class"]
        fig, ax = plt.subplots(figsize=(5.0, 4.0))
        pts = [(w, a, n) for w, a, n in zip(rep["weight_norms"], acc, names) if a is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for w, a, n in pts:
            ax.annotate(n, (w, a), fontsize=8)
        r = (rep.get("weight_norm_correlation") or {}).get(strongest)
        ax.set_xlabel("classifier weight norm ‖w_c‖")
        ax.set_ylabel(f"accuracy under {strongest}")
        ax.set_title("Weight norm vs robustness" + (f" (r = {r:.2f})" if r is not None else ""))
        fig.tight_layout()
        paths.append(f"{prefix}_classwise_weight_norms.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def summary(rep):
    """A few lines of text: worst class per attack and its most frequent target."""
    lines = []
    for name, entry in rep["attacks"].items():
        worst = entry["worst_class"]
        if worst is None:
            continue
        into = entry["attacked_into"].get(worst["name"]) or []
        target = f", mostly into {into[0][0]} ({into[0][1]})" if into and name != "clean" else ""
        lines.append(f"{name}: worst class {worst['name']} {worst['accuracy']:.1%} "
                     f"(gap to best {entry['gap']:.1%}){target}")
    return "\n".join(lines)
