"""Memorization scores (Feldman & Zhang 2020): estimate them, load them, split data by them.

Feldman & Zhang, "What Neural Networks Memorize and Why: Discovering the Long Tail via
Influence Estimation", NeurIPS 2020, define the memorization of a training example as

    mem(x_i) = P[F(x_i) = y_i | i ∈ S] − P[F(x_i) = y_i | i ∉ S],

the probability over training runs on random subsets S that a model trained with the
example classifies it correctly, minus the same without it. `estimate` trains K models on
random subsets holding a fraction r of the examples and averages, per example, over the
models that saw it and those that did not. High scores mark atypical (or mislabeled)
examples that models only get right by memorizing them; typical ones score near 0.

    scores = memorization.estimate(x, y, num_models=16, model="small_cnn", epochs=4,
                                   checkpoint_dir="mem_runs")["scores"]
    np.save("mem.npy", scores)                       # indexed by position in (x, y)
    tr_mem = memorization.load_scores("cifar100_infl_matrix.npz")   # published scores

BAT (`again_tf.defenses.BAT`) uses them to reweight and contrast examples; `split_results`
and `evaluate_by_memorization` report accuracy on the typical and atypical parts of a set.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

MEASURES = ("auto", "clean", "adversarial")

# The memorization threshold t between typical and atypical examples (the BAT paper's).
DEFAULT_THRESHOLD = 0.15


def load_scores(path, key=None):
    """Per-example scores from a `.npy` file or a key of a `.npz` file, as float32 `(N,)`.

    Args:
        path: a `.npy` array, or a `.npz` archive such as Feldman & Zhang's published
            `cifar100_infl_matrix.npz`.
        key: the `.npz` entry. Default: `tr_mem` (the training-set memorization estimates
            of that archive) if present, else the archive's only entry.

    Raises ValueError (naming the file) for a missing, unreadable or non-vector file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"memorization_scores={path!r} does not exist (expected a .npy file "
                         f"or a .npz archive with a 'tr_mem' entry)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"memorization_scores={path!r} is not a readable .npy/.npz file "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if key is None:
                key = "tr_mem" if "tr_mem" in keys else (keys[0] if len(keys) == 1 else None)
            if key not in keys:
                raise ValueError(f"memorization_scores={path!r} has entries {keys}; expected "
                                 f"{'tr_mem' if key is None else repr(key)}")
            scores = loaded[key]
    else:
        scores = loaded
    scores = np.asarray(scores)
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"memorization_scores={path!r} holds a {scores.dtype} array of shape "
                         f"{scores.shape}; expected one number per example, shape (N,)")
    return scores.astype(np.float32)


def subset_mask(num_examples, ratio, seed, k):
    """The k-th random training subset: exactly round(ratio·N) examples, a bool mask `(N,)`."""
    rng = np.random.default_rng([int(seed), int(k)])
    mask = np.zeros(num_examples, bool)
    mask[rng.permutation(num_examples)[:int(round(ratio * num_examples))]] = True
    return mask


def scores_from_runs(masks, correct):
    """mem_i = mean correctness over runs with i in the subset − over runs without it.

    Args:
        masks: `(K, N)` bool, whether example i was in run k's training subset.
        correct: `(K, N)` bool, whether run k's model classified example i correctly.

    Returns `(scores, in_counts, out_counts)`; a score is NaN where example i was never
    in, or never out of, a subset.
    """
    masks = np.asarray(masks, bool)
    correct = np.asarray(correct, np.float64)
    n_in = masks.sum(0)
    n_out = (~masks).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = (correct * masks).sum(0) / n_in
        p_out = (correct * ~masks).sum(0) / n_out
    scores = np.where((n_in > 0) & (n_out > 0), p_in - p_out, np.nan)
    return scores.astype(np.float32), n_in, n_out


def _atomic_savez(path, **arrays):
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _identity(x, y, cfg):
    """What must match for a checkpoint folder to be continued."""
    checksum = int(np.asarray(y, np.int64).sum() * 31 + len(y))
    return {**cfg, "num_examples": int(len(y)), "labels_checksum": checksum,
            "image_shape": list(np.shape(x)[1:])}


def estimate(x, y, num_models=8, subset_ratio=0.7, model="small_cnn", model_kwargs=None,
             num_classes=None, mean=(0.0,), std=(1.0,), defense="none", defense_params=None,
             measure="auto", epochs=4, batch_size=128, lr=1e-3, eps=None, step_size=None,
             attack_steps=10, eval_steps=10, augment="none", checkpoint_dir=None, seed=0,
             verbose=1):
    """Estimates each example's memorization score by training `num_models` models.

    Model k is trained on the subset `subset_mask(N, subset_ratio, seed, k)` with
    `AdversarialModel(defense=...)` and Adam(`lr`) for `epochs` epochs, then classifies all
    N examples; `scores_from_runs` turns the K (mask, correctness) pairs into scores.

    For an adversarial recipe (a defense that attacks, e.g. "pgd_at"), "F(x) = y" is by
    default measured on PGD adversarial examples (`measure="auto"`): what adversarial
    training fits, and may memorize, is the perturbed example, and it is robust
    correctness that BAT's analysis is about. `measure="clean"` measures it on the clean
    examples instead; with `defense="none"` "auto" is "clean".

    Resumable: with `checkpoint_dir`, each finished model's mask and per-example
    correctness are saved atomically as `model_<k>.npz` (and the options in
    `config.json`); a rerun with the same options skips finished models (K may grow).

    Args:
        x, y: training images in [0, 1] `(N, H, W, C)` (or any shape `model` takes) and
            integer labels; score i belongs to example i.
        num_models: K. Default 8 (Feldman & Zhang used thousands on CIFAR; scores from a
            small K are noisy, ~1/sqrt(0.3·K) per example).
        subset_ratio: r, the fraction of examples each model trains on. Default 0.7
            (Feldman & Zhang's).
        model: an `again_tf.models` name (built with `num_classes`, `mean`, `std` and
            `model_kwargs`, e.g. `{"width": 8}`), or a callable returning a new model.
        num_classes: default `max(y) + 1`.
        defense, defense_params: the training recipe (`again_tf.defenses.names()`).
            Default "none" (standard training, as Feldman & Zhang).
        measure: "auto", "clean" or "adversarial" (above).
        epochs, batch_size, lr: the recipe. Defaults 4, 128, 1e-3.
        eps, step_size, attack_steps: the training attack (and the measuring attack),
            pixel units; eps is required for an adversarial recipe or measure.
        eval_steps: PGD steps of the measuring attack. Default 10.
        augment: `again_tf.data` augmentation of the training batches. Default "none".
        checkpoint_dir: folder for the per-model checkpoints (None: not saved).
        seed: seed of the subsets, the models' initialization and the attacks.
        verbose: 1 shows a progress bar over models.

    Returns `{"scores" (N,), "in_counts", "out_counts", "models_trained" (this call),
    "num_models", "seconds"}`.

    Example:
        result = estimate(x, y, num_models=16, model="small_cnn", model_kwargs={"width": 8})
    """
    from again_tf import data, models
    from again_tf.attacks.pgd import PGD
    from again_tf.defenses import AdversarialModel, registry
    from again_tf.models.base import forward

    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    n = len(y)
    if len(x) != n or n < 2:
        raise ValueError(f"Expected one label per image and at least 2 examples. Received "
                         f"{len(x)} images and {n} labels")
    if int(num_models) < 1:
        raise ValueError(f"Expected `num_models` >= 1. Received: num_models={num_models}")
    if not 0 < float(subset_ratio) < 1:
        raise ValueError(f"Expected `subset_ratio` in (0, 1). Received: "
                         f"subset_ratio={subset_ratio}")
    if measure not in MEASURES:
        raise ValueError(f"Expected `measure` in {MEASURES}. Received: measure={measure!r}")
    uses_attack = registry.get(defense, **(defense_params or {}))[0].uses_attack
    if measure == "auto":
        measure = "adversarial" if uses_attack else "clean"
    if (uses_attack or measure == "adversarial") and not eps:
        raise ValueError(f"An adversarial recipe or measure needs `eps`. Received: eps={eps}, "
                         f"defense={defense!r}, measure={measure!r}")
    num_classes = int(num_classes or y.max() + 1)
    step_size = step_size or (eps / 4 if eps else None)
    cfg = {"subset_ratio": float(subset_ratio), "seed": int(seed),
           "model": model if isinstance(model, str) else getattr(model, "__name__", "callable"),
           "model_kwargs": model_kwargs or {}, "defense": defense,
           "defense_params": defense_params or {}, "measure": measure, "epochs": int(epochs),
           "batch_size": int(batch_size), "lr": float(lr), "eps": eps, "step_size": step_size,
           "attack_steps": int(attack_steps), "eval_steps": int(eval_steps), "augment": augment}
    identity = _identity(x, y, cfg)
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        config_path = os.path.join(checkpoint_dir, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                previous = json.load(f)
            differ = sorted(k for k in identity if previous.get(k) != identity[k])
            if differ:
                raise ValueError(f"checkpoint_dir={checkpoint_dir} holds runs made with other "
                                 f"options ({', '.join(differ)}); choose another folder")
        else:
            tmp = config_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(identity, f, indent=2)
            os.replace(tmp, config_path)

    def build():
        if callable(model):
            return model()
        return models.build(model, num_classes, mean=mean, std=std, **(model_kwargs or {}))

    def predict_correct(net):
        attack = None
        if measure == "adversarial":
            attack = PGD(net, eps, step_size, eval_steps, seed=seed)
        logits_fn = tf.function(lambda b: forward(net, b, training=False)["logits"],
                                reduce_retracing=True)
        out = []
        for i in range(0, n, 512):
            xb, yb = tf.constant(x[i:i + 512]), tf.constant(y[i:i + 512])
            if attack is not None:
                xb = attack(xb, yb)
            out.append(np.argmax(logits_fn(xb).numpy(), -1) == y[i:i + 512])
        return np.concatenate(out)

    start = time.time()
    masks, correct, trained = [], [], 0
    bar = keras.utils.Progbar(num_models, unit_name="model") if verbose else None
    for k in range(int(num_models)):
        path = os.path.join(checkpoint_dir, f"model_{k:04d}.npz") if checkpoint_dir else None
        if path and os.path.exists(path):
            with np.load(path) as saved:
                masks.append(saved["mask"])
                correct.append(saved["correct"])
        else:
            t0 = time.time()
            mask = subset_mask(n, subset_ratio, seed, k)
            keras.utils.set_random_seed(int(seed) * 100003 + k)
            net = build()
            adv = AdversarialModel(net, defense=defense, eps=eps or 8 / 255, step_size=step_size,
                                   steps=attack_steps, eval_steps=0, seed=int(seed) + k,
                                   **(defense_params or {}))
            adv.compile(optimizer=keras.optimizers.Adam(lr))
            ds = tf.data.Dataset.from_tensor_slices((x[mask], y[mask]))
            ds = data.pipeline(ds, batch_size, training=True, augment=augment, seed=int(seed) + k)
            adv.fit(ds, epochs=int(epochs), verbose=0)
            right = predict_correct(net)
            if path:
                _atomic_savez(path, mask=mask, correct=right)
            masks.append(mask)
            correct.append(right)
            trained += 1
            del adv, net
            if bar is not None:
                bar.update(k + 1, values=[("seconds/model", time.time() - t0)])
                continue
        if bar is not None:
            bar.update(k + 1)
    scores, n_in, n_out = scores_from_runs(np.stack(masks), np.stack(correct))
    return {"scores": scores, "in_counts": n_in, "out_counts": n_out, "models_trained": trained,
            "num_models": int(num_models), "seconds": time.time() - start}


def split(scores, threshold=DEFAULT_THRESHOLD):
    """`(typical, atypical)` bool masks: mem ≤ t and mem > t (NaN scores in neither)."""
    scores = np.asarray(scores, np.float64)
    scored = ~np.isnan(scores)
    atypical = scored & (np.nan_to_num(scores, nan=-np.inf) > threshold)
    return scored & ~atypical, atypical


def split_results(results, scores, threshold=DEFAULT_THRESHOLD):
    """Accuracy of each attack on the typical and atypical examples of an evaluation.

    Args:
        results: `again_tf.evaluation.evaluate`'s output (per-example "correct" arrays).
        scores: one memorization score per evaluated example.
        threshold: t. Default 0.15 (the BAT paper's).

    Returns `{"threshold", "unscored" (NaN scores), "typical": {"count", "accuracy":
    {attack: acc or None}}, "atypical": {...}}`.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    typical, atypical = split(scores, threshold)
    out = {"threshold": float(threshold), "unscored": int(np.isnan(scores).sum())}
    for name, mask in (("typical", typical), ("atypical", atypical)):
        acc = {}
        for attack, r in results.items():
            c = np.asarray(r["correct"])
            if len(c) != len(scores):
                raise ValueError(f"results[{attack!r}] has {len(c)} examples but there are "
                                 f"{len(scores)} scores; expected one score per example")
            acc[attack] = float(c[mask].mean()) if mask.any() else None
        out[name] = {"count": int(mask.sum()), "accuracy": acc}
    return out


def evaluate_by_memorization(model, x, y, scores, attacks=("clean", "pgd20"),
                             threshold=DEFAULT_THRESHOLD, **evaluate_kwargs):
    """Evaluates `model` on `(x, y)` and splits clean/robust accuracy by memorization.

    `evaluate_kwargs` go to `again_tf.evaluation.evaluate` (eps, step_size, norm, ...).
    Returns `split_results`' dict.
    """
    from again_tf import evaluation

    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(scores) != len(y):
        raise ValueError(f"Expected one memorization score per example: {len(y)} examples, "
                         f"{len(scores)} scores")
    results = evaluation.evaluate(model, x, y, attacks, **evaluate_kwargs)
    return split_results(results, scores, threshold)


def format_split(report):
    """A plain-text table of `split_results`' dict: one row per split, one column per attack."""
    attacks = list(report["typical"]["accuracy"])
    rows = [["split", "count"] + attacks]
    for name in ("typical", "atypical"):
        entry = report[name]
        rows.append([f"{name} (mem {'<=' if name == 'typical' else '>'} "
                     f"{report['threshold']:g})", str(entry["count"])]
                    + ["-" if entry["accuracy"][a] is None else f"{entry['accuracy'][a]:.4f}"
                       for a in attacks])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.get("unscored"):
        lines.append(f"({report['unscored']} examples without a score are in neither split)")
    return "\n".join(lines)
