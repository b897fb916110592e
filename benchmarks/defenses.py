"""Trains every defense with one short Fashion-MNIST budget and tabulates its robustness.

    python benchmarks/defenses.py                       # full budget: 5 epochs, 60k images
    python benchmarks/defenses.py --epochs=1 --train_size=2000 --test_images=200

Each defense is trained by `again_tf.training.train` (what `train.py` runs) with the same
data, model, optimizer, epochs, threat model and seed; its own hyper-parameters are the
`--defense_params` of its recipe `flags/fashion_mnist_cnn_<defense>.cfg` when there is
one (e.g. a short FAT τ schedule, LAS-AT's small-CNN strategy network), else its defaults.
Prints one Markdown table (clean, PGD-20, the worst class's PGD-20 and CW-∞ accuracy on
the first `--test_images` test images, training seconds; robust accuracies are adaptive —
the worst over main/combined/auxiliary losses — for models with auxiliary heads) and
writes the rows to `--json`.
`--from_runs --out_dir=DIR` rebuilds the table from finished runs without training.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from again_tf.defenses import registry  # noqa: E402

flags.DEFINE_list("defenses", list(registry.names()), "Defenses to train, in table order.")
flags.DEFINE_integer("epochs", 5, "Epochs of every run.")
flags.DEFINE_integer("train_size", 0, "First N training images (0: all 60,000).")
flags.DEFINE_integer("val_size", 1000, "Of those, held out for per-epoch validation.")
flags.DEFINE_integer("test_images", 1000, "Test images of the table.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attacks.")
flags.DEFINE_integer("width", 0, "small_cnn width (0: its default, 32).")
flags.DEFINE_integer("seed", 0, "Seed of every run.")
flags.DEFINE_string("out_dir", None, "Folder for the runs (one subfolder per defense). "
                    "Default: a new temporary folder.")
flags.DEFINE_bool("from_runs", False, "Train nothing: rebuild the table from the finished "
                  "runs in --out_dir (their results.json and model.keras).")
flags.DEFINE_string("json", os.path.join(ROOT, "benchmarks", "defenses.json"),
                    "Where to write the table's rows as JSON.")
FLAGS = flags.FLAGS

ATTACKS = ("clean", "pgd20", "cw")
HEADERS = ("defense", "clean", "PGD-20", "worst-class PGD-20", "CW-∞", "train s")


def recipe_params(defense):
    """The `--defense_params` of flags/fashion_mnist_cnn_<defense>.cfg, or {}."""
    from flags import definitions

    path = os.path.join(ROOT, "flags", f"fashion_mnist_cnn_{defense}.cfg")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        for line in f:
            if line.startswith("--defense_params="):
                return definitions.key_values(line.strip().split("=", 1)[1], "defense_params")
    return {}


def run(defense, out_dir):
    from again_tf import training

    cfg = training.TrainConfig(
        defense=defense, dataset="fashion_mnist", model="small_cnn", width=FLAGS.width,
        epochs=FLAGS.epochs, batch_size=128, optimizer="adam", lr=1e-3, eps=0.1,
        step_size=0.025, attack_steps=FLAGS.attack_steps, eval_steps=10,
        val_size=FLAGS.val_size, train_size=FLAGS.train_size, test_images=FLAGS.test_images,
        test_attacks=ATTACKS, defense_params=recipe_params(defense), seed=FLAGS.seed,
        out_dir=os.path.join(out_dir, defense), verbose=0)
    training.train(cfg)
    return summarize(defense, cfg.out_dir)


def summarize(defense, run_dir):
    """The table row of a finished run: its results.json plus the worst class's PGD-20.

    The worst class is re-measured on the saved model with the final table's attack
    (adaptive PGD-20, same seed and images), per class of the test labels.
    """
    import keras
    import numpy as np

    from again_tf import data, evaluation

    with open(os.path.join(run_dir, "results.json")) as f:
        result = json.load(f)
    with open(os.path.join(run_dir, "run.json")) as f:
        cfg = json.load(f)
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    x, y = data.load_arrays("fashion_mnist", f"test[:{result['test_images']}]")
    scores = evaluation.evaluate(model, x.astype(np.float32) / 255, y, ["pgd20"],
                                 eps=cfg["eps"], step_size=cfg["step_size"], seed=cfg["seed"])
    correct = scores["pgd20"]["correct"]
    per_class = [float(correct[y == c].mean()) for c in np.unique(y)]
    return {"defense": defense, "clean": result["clean"], "pgd20": result["pgd20"],
            "worst_class_pgd20": min(per_class), "worst_class": int(np.argmin(per_class)),
            "cw": result["cw"], "train_seconds": result["train_seconds"],
            "by_loss": result.get("by_loss"), "defense_params": cfg["defense_params"]}


def markdown(rows):
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append(f"| {r['defense']} | {r['clean']:.4f} | {r['pgd20']:.4f} "
                     f"| {r['worst_class_pgd20']:.4f} | {r['cw']:.4f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import warnings

    import tensorflow as tf
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's SavedModel export logs INFO through absl
    tf.get_logger().setLevel("ERROR")  # one retracing note per new model, not a problem
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    unknown = [d for d in FLAGS.defenses if d not in registry.names()]
    if unknown:
        sys.exit(f"defenses.py: error: --defenses has unknown {unknown}; expected some of "
                 f"{', '.join(registry.names())}")
    if FLAGS.from_runs and not FLAGS.out_dir:
        sys.exit("defenses.py: error: --from_runs needs --out_dir (the folder of the runs)")
    out_dir = FLAGS.out_dir or tempfile.mkdtemp(prefix="again_tf_defenses_")
    rows, failed = [], {}
    for defense in FLAGS.defenses:
        try:  # one defense's bad input must not cost the others' runs
            if FLAGS.from_runs:
                rows.append(summarize(defense, os.path.join(out_dir, defense)))
                continue
            print(f"training {defense} ...", flush=True)
            rows.append(run(defense, out_dir))
        except (ValueError, OSError, FloatingPointError) as e:
            failed[defense] = " ".join(str(e).split())
            print(f"{defense} failed: {failed[defense]}", file=sys.stderr, flush=True)
    if not rows:
        sys.exit(f"defenses.py: error: every defense failed: {failed}")
    table = markdown(rows)
    print(f"\nFashion-MNIST, small_cnn, {FLAGS.epochs} epoch(s) on "
          f"{FLAGS.train_size or 60000} - {FLAGS.val_size} images, eps 0.1, accuracy on "
          f"{FLAGS.test_images} test images:\n")
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
        json.dump({"epochs": FLAGS.epochs, "train_size": FLAGS.train_size,
                   "val_size": FLAGS.val_size, "test_images": FLAGS.test_images,
                   "attack_steps": FLAGS.attack_steps, "width": FLAGS.width,
                   "seed": FLAGS.seed, "runs": out_dir, "rows": rows, "failed": failed}, f,
                  indent=2)
    print(f"\nRows written to {FLAGS.json}; runs in {out_dir}")
    if failed:
        sys.exit(f"defenses.py: error: {len(failed)} defense(s) failed, left out of the "
                 f"table: {', '.join(failed)} (messages above)")


if __name__ == "__main__":
    app.run(main)
