"""AGAIN's robust-generalization experiment: train and test accuracy per epoch, per defense.

    python benchmarks/generalization.py                    # the README's figure (resumes)
    python benchmarks/generalization.py --from_runs        # redraw from finished runs

AGAIN (Yin et al., CVPR 2023, "Analysis of the Generalization") claims that attribution
span enlargement narrows the gap between training and test accuracy, standard and
robust. This script trains each variant of `--defenses` with the same budget (a small
training set for many epochs: 1,000 images, 40 epochs, batch 32, where PGD-AT's robust
train-test gap keeps widening) through `again_tf.training.train`, and after the first
epoch, every `--eval_every`-th and the last measures, on fixed subsets of `--eval_images`
training and test images, the clean accuracy and the PGD-`--eval_steps` robust accuracy
(adaptive for models with auxiliary heads: the per-image worst case over the main,
combined and auxiliary losses and their mask-relaxed forms, as the final evaluation). The values are logged in each run's metrics (so an interrupted run resumes
with its history: rerun the same command), then drawn as the paper's two panels,
`generalization_standard.png` and `generalization_robust.png` (train solid, test dashed),
and tabulated: final and best test accuracy and the train − test gap at the last epoch
and at the epoch of the best test robust accuracy.

`--from_runs` trains nothing; it tabulates only runs whose run.json is the configuration its
flags ask for (seed, sizes, hyper-parameters...) and whose measured epochs are those of
`--epochs`/`--eval_every`, and names the first run that is not (the PGD steps of the
measurements, `--eval_steps`, are not in run.json and are not checked).

Variants: a registered defense name, or `again_pgd_hff` (AGAIN's full method, ASE and
HFF, `hff=1`; the official code never calls HFF, so `again_pgd` leaves it off).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from benchmarks.recipes import base_defense, recipe_params  # noqa: E402
from benchmarks.runs import config_differences  # noqa: E402
from benchmarks.script_cli import ScriptError, run_or_exit  # noqa: E402

flags.DEFINE_list("defenses", ["pgd_at", "again_pgd", "again_pgd_hff", "awp", "again_awp"],
                  "Defenses (registered names, or again_pgd_hff), in plot order.")
flags.DEFINE_string("model", "auto", "Model (auto: the default for 28x28 data).")
flags.DEFINE_integer("width", 0, "Model width (0: the model's default for the data).")
flags.DEFINE_integer("train_size", 1000, "Training images (the first N of the split).")
flags.DEFINE_integer("epochs", 40, "Epochs of every run.")
flags.DEFINE_integer("batch_size", 32, "Training batch size (small: more updates per epoch).")
flags.DEFINE_integer("eval_every", 2, "Measure after the first epoch, every N-th and the last.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("eval_images", 250, "Training and test images measured (each).")
flags.DEFINE_integer("eval_steps", 10, "PGD steps of the per-epoch robust accuracy.")
flags.DEFINE_string("defense_params", "", "Extra name=value hyper-parameters for every "
                    "run that takes them (e.g. gamma=0.005 for the AWP ones).")
flags.DEFINE_integer("seed", 0, "Seed of every run.")
flags.DEFINE_string("out_dir", os.path.join("runs", "generalization"),
                    "Folder of the runs (one per defense) and of the figures and table.")
flags.DEFINE_bool("from_runs", False, "Train nothing: draw and tabulate finished runs.")
FLAGS = flags.FLAGS

EPS, STEP = 0.1, 0.025  # Fashion-MNIST's usual threat model, PGD step eps/4
KEYS = ("train_clean", "test_clean", "train_robust", "test_robust")


def variant(name):
    """(registered defense, its hyper-parameters): the recipe's, then --defense_params'
    for the ones the defense takes."""
    from again_tf.cli import definitions
    from again_tf.defenses import registry

    try:
        defense, _ = base_defense(name)
    except ValueError as e:
        raise ScriptError(f"--defenses: {e}") from None
    extra = definitions.key_values(FLAGS.defense_params, "defense_params")
    return defense, {**recipe_params(name),
                     **{k: v for k, v in extra.items() if registry.accepts(defense, k)}}


def measured(epoch):
    """True if the 0-based `epoch` is measured: the first, every --eval_every-th, the last."""
    n = epoch + 1
    return n == 1 or n % FLAGS.eval_every == 0 or n == FLAGS.epochs


def generalization_callback(train_xy, test_xy, eval_steps, seed):
    """A Keras callback adding train/test clean and robust accuracy to each epoch's logs."""
    import keras

    from again_tf import evaluation

    class Generalization(keras.callbacks.Callback):
        attack = None

        def on_epoch_end(self, epoch, logs=None):
            if not measured(epoch):
                return
            net = self.model.model  # the classifier inside the AdversarialModel
            if self.attack is None:
                # One attack for the whole run, so its compiled objectives are reused
                # every epoch; each measurement starts from `seed`, as a new one would.
                self.attack = evaluation.parse_attack(f"pgd{eval_steps}", net, EPS, STEP,
                                                      seed=seed)
                self.start_state = self.attack.seed_generator.state.numpy()
            for split, (x, y) in (("train", train_xy), ("test", test_xy)):
                self.attack.seed_generator.state.assign(self.start_state)
                scores = evaluation.evaluate(net, x, y, ["clean", self.attack], eps=EPS,
                                             step_size=STEP, seed=seed)
                logs[f"{split}_clean"] = scores["clean"]["accuracy"]
                logs[f"{split}_robust"] = scores[repr(self.attack)]["accuracy"]
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {logs[k]:.3f}" for k in KEYS),
                  flush=True)

    return Generalization()


def run_config(name, out_dir):
    """The train.py configuration of the run of `name` these flags ask for."""
    from again_tf import training

    defense, params = variant(name)
    return training.TrainConfig(
        defense=defense, dataset="fashion_mnist", model=FLAGS.model, width=FLAGS.width,
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, optimizer="adam", lr=FLAGS.lr,
        eps=EPS, step_size=STEP, attack_steps=FLAGS.attack_steps, eval_steps=0, val_size=0,
        train_size=FLAGS.train_size, test_images=FLAGS.eval_images, test_attacks=("clean",),
        defense_params=params, seed=FLAGS.seed, out_dir=os.path.join(out_dir, name),
        resume=True, verbose=2)


def train_variant(name, out_dir, train_xy, test_xy):
    from again_tf import training

    callback = generalization_callback(train_xy, test_xy, FLAGS.eval_steps, FLAGS.seed)
    training.train(run_config(name, out_dir), callbacks=[callback])


def check_run(name, out_dir):
    """--from_runs: the run folder of `name` must hold a run of the configuration these
    flags ask for (seed, sizes, epochs, hyper-parameters), else the table would mix
    settings silently; and its measured epochs must be those of --eval_every."""
    run_dir = os.path.join(out_dir, name)
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise ScriptError(f"{run_dir} has no run.json: train it first (without --from_runs)")
    with open(path) as f:
        saved = json.load(f)
    differ = [f"{k}={theirs!r} (these flags: {mine!r})" for k, theirs, mine in
              config_differences(saved, run_config(name, out_dir), ignore=("epochs",))]
    if differ:
        raise ScriptError(f"{run_dir} was trained with another configuration than these "
                          f"flags ask for: {', '.join(differ)}")
    epochs = history(run_dir)["epoch"]
    expected = [e + 1 for e in range(FLAGS.epochs) if measured(e)]
    if epochs != expected and epochs == expected[:len(epochs)]:
        raise ScriptError(f"{run_dir} is unfinished (measured up to epoch {epochs[-1]} of "
                          f"--epochs={FLAGS.epochs}): rerun without --from_runs to train the "
                          f"rest")
    if epochs != expected:
        raise ScriptError(f"{run_dir} was measured at epochs {epochs}, not at {expected} "
                          f"as --epochs={FLAGS.epochs} --eval_every={FLAGS.eval_every} ask")


def history(run_dir):
    """The per-epoch KEYS of a run, from its metrics.json (one list per key)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        raise ScriptError(f"{run_dir} has no metrics.json: train it first (without "
                          f"--from_runs)")
    with open(path) as f:
        rows = json.load(f)
    rows = rows["epochs"] if isinstance(rows, dict) else rows
    epochs = [i + 1 for i, r in enumerate(rows) if all(k in r for k in KEYS)]
    if not epochs:
        raise ScriptError(f"{run_dir}'s metrics lack {list(KEYS)}: not a run of this script")
    out = {k: [float(rows[e - 1][k]) for e in epochs] for k in KEYS}
    out["epoch"] = epochs
    return out


def summary(name, h):
    """Final and best-test-robust-epoch accuracies and gaps of one history."""
    best = max(range(len(h["test_robust"])), key=lambda i: h["test_robust"][i])
    last = len(h["test_robust"]) - 1
    row = {"defense": name, "epochs": h["epoch"][last], "best_epoch": h["epoch"][best]}
    for tag, i in (("final", last), ("best", best)):
        row[f"{tag}_test_clean"] = h["test_clean"][i]
        row[f"{tag}_test_robust"] = h["test_robust"][i]
        row[f"{tag}_clean_gap"] = h["train_clean"][i] - h["test_clean"][i]
        row[f"{tag}_robust_gap"] = h["train_robust"][i] - h["test_robust"][i]
    row["robust_drop"] = h["test_robust"][best] - h["test_robust"][last]
    return row


def markdown(rows):
    head = ("| defense | best test robust (epoch) | final test robust | drop from best "
            "| robust gap, final | robust gap at best | clean gap, final | final test clean |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['defense']} | {r['best_test_robust']:.3f} ({r['best_epoch']}) "
            f"| {r['final_test_robust']:.3f} | {r['robust_drop']:.3f} "
            f"| {r['final_robust_gap']:.3f} | {r['best_robust_gap']:.3f} "
            f"| {r['final_clean_gap']:.3f} | {r['final_test_clean']:.3f} |")
    return "\n".join(lines)


def plot(histories, out_dir):
    """The paper's two panels: train (solid) and test (dashed) accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind, title in (("clean", "Standard generalization (clean accuracy)"),
                        ("robust", f"Robust generalization (PGD-{FLAGS.eval_steps} "
                                   f"accuracy, eps {EPS})")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, h) in enumerate(histories.items()):
            color = f"C{i}"
            epochs = h["epoch"]
            ax.plot(epochs, h[f"train_{kind}"], color=color, label=f"{name} train")
            ax.plot(epochs, h[f"test_{kind}"], color=color, linestyle="--",
                    label=f"{name} test")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"generalization_{'standard' if kind == 'clean' else kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run():
    names = list(FLAGS.defenses)
    for name in names:
        variant(name)
    if (FLAGS.eval_images < 1 or FLAGS.epochs < 1 or FLAGS.train_size < FLAGS.eval_images
            or FLAGS.batch_size < 1 or FLAGS.eval_every < 1):
        raise ScriptError(f"expected --epochs, --batch_size, --eval_every >= 1 and "
                          f"1 <= --eval_images <= --train_size; received --epochs="
                          f"{FLAGS.epochs} --batch_size={FLAGS.batch_size} --eval_every="
                          f"{FLAGS.eval_every} --eval_images={FLAGS.eval_images} "
                          f"--train_size={FLAGS.train_size}")
    if not FLAGS.from_runs:
        import numpy as np

        from again_tf import data

        def subset(split):
            x, y = data.load_arrays("fashion_mnist", split)
            return x.astype(np.float32) / 255.0, y

        train_xy = subset(f"train[:{FLAGS.eval_images}]")  # trained on: train[:train_size]
        test_xy = subset(f"test[:{FLAGS.eval_images}]")
        for name in names:
            print(f"== {name}", flush=True)
            train_variant(name, FLAGS.out_dir, train_xy, test_xy)
    else:
        for name in names:
            check_run(name, FLAGS.out_dir)
    histories = {name: history(os.path.join(FLAGS.out_dir, name)) for name in names}
    rows = [summary(name, h) for name, h in histories.items()]
    paths = plot(histories, FLAGS.out_dir)
    table = markdown(rows)
    print(f"\nFashion-MNIST, {FLAGS.train_size} training images, {FLAGS.epochs} epochs, "
          f"eps {EPS}; accuracy on {FLAGS.eval_images} training and {FLAGS.eval_images} "
          f"test images (gap = train - test):\n")
    print(table)
    with open(os.path.join(FLAGS.out_dir, "generalization.json"), "w") as f:
        json.dump({"flags": {k: getattr(FLAGS, k) for k in (
            "defenses", "model", "width", "train_size", "epochs", "batch_size", "eval_every",
            "lr", "attack_steps", "eval_images", "eval_steps", "defense_params", "seed")},
            "rows": rows, "histories": histories}, f, indent=1)
    print(f"\nFigures: {', '.join(paths)}")


def main(argv):
    del argv
    run_or_exit(run)


if __name__ == "__main__":
    app.run(main)
