"""Estimates memorization scores of a training split and prints how long it took.

    python benchmarks/memorization.py                                  # all 60,000, K = 8
    python benchmarks/memorization.py --train_size=2000 --num_models=4 --epochs=2

Trains `--num_models` small CNNs, each on a random `--subset_ratio` of the first
`--train_size` Fashion-MNIST training images (`again_tf.analysis.memorization.estimate`,
Feldman & Zhang 2020), and writes one score per image, indexed by its position in the
training split, to `--out` (what `train.py --defense=bat --memorization_scores=...` and
`flags/fashion_mnist_cnn_bat.cfg` read). Each finished model is checkpointed under
`--checkpoint_dir`, so an interrupted run continues where it stopped. Prints the time, the
score distribution, the share of atypical images (mem > 0.15) and the most memorized ones.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from benchmarks.recipes import memorization_file  # noqa: E402

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset whose training split is scored.")
flags.DEFINE_string("data_dir", None, "Folder with the dataset's files (see train.py).")
flags.DEFINE_integer("train_size", 0, "Score the first N training images (0: all).")
flags.DEFINE_integer("num_models", 8, "K, the number of models trained.")
flags.DEFINE_float("subset_ratio", 0.7, "r, the fraction of the images each model sees.")
flags.DEFINE_string("model", "small_cnn", "Model name (again_tf.models).")
flags.DEFINE_integer("width", 8, "small_cnn width.")
flags.DEFINE_integer("epochs", 3, "Epochs per model.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_string("defense", "none", "Training recipe: none (standard) or an adversarial "
                    "defense such as pgd_at.")
flags.DEFINE_enum("measure", "auto", ["auto", "clean", "adversarial"], "Whether F(x) = y is "
                  "measured on clean or PGD inputs (auto: adversarial for adversarial recipes).")
flags.DEFINE_string("eps", None, "Attack radius for adversarial recipes (default: the "
                    "dataset's); fractions allowed.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of training and measuring attacks.")
flags.DEFINE_integer("seed", 0, "Seed of the subsets and models.")
flags.DEFINE_string("checkpoint_dir", None, "Per-model checkpoints. Default: "
                    "runs/memorization/<dataset>_<train_size>_<defense>.")
flags.DEFINE_string("out", None, "Scores file. Default: benchmarks/<dataset>_memorization.npy "
                    "(only when all training images are scored), else "
                    "benchmarks/<dataset>_memorization_<train_size>.npy.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import again_tf  # noqa: F401  (before TensorFlow: again_tf.startup's settings)
    import numpy as np
    import tensorflow as tf

    from again_tf import data
    from again_tf.analysis import memorization
    from again_tf.cli import definitions

    tf.get_logger().setLevel("ERROR")  # one retracing note per new model, not a problem
    info = data.info(FLAGS.dataset)
    split = f"train[:{FLAGS.train_size}]" if FLAGS.train_size else "train"
    x, y = data.load_arrays(FLAGS.dataset, split, FLAGS.data_dir)
    x = x.astype(np.float32) / 255.0
    tag = f"{FLAGS.dataset}_{FLAGS.train_size or 'all'}_{FLAGS.defense}"
    checkpoint_dir = FLAGS.checkpoint_dir or os.path.join(ROOT, "runs", "memorization", tag)
    out = FLAGS.out or os.path.join(ROOT, memorization_file(FLAGS.dataset, FLAGS.train_size))
    eps = definitions.fraction(FLAGS.eps, "eps") or info.eps
    kwargs = {"width": FLAGS.width} if FLAGS.model == "small_cnn" else {}
    print(f"Scoring {len(y)} {FLAGS.dataset} training images with K={FLAGS.num_models} "
          f"{FLAGS.model} models ({FLAGS.defense}, {FLAGS.epochs} epochs, r={FLAGS.subset_ratio});"
          f" checkpoints in {checkpoint_dir}")
    start = time.time()
    result = memorization.estimate(
        x, y, num_models=FLAGS.num_models, subset_ratio=FLAGS.subset_ratio, model=FLAGS.model,
        model_kwargs=kwargs, num_classes=info.num_classes, mean=info.mean, std=info.std,
        defense=FLAGS.defense, measure=FLAGS.measure, epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, lr=FLAGS.lr, eps=eps, attack_steps=FLAGS.attack_steps,
        eval_steps=FLAGS.attack_steps, checkpoint_dir=checkpoint_dir, seed=FLAGS.seed, verbose=1)
    seconds = time.time() - start
    scores = result["scores"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out[:-4] + ".tmp.npy"
    np.save(tmp, scores)
    os.replace(tmp, out)

    scored = scores[~np.isnan(scores)]
    q = np.percentile(scored, [5, 25, 50, 75, 95]) if len(scored) else [np.nan] * 5
    print(f"\n{result['models_trained']} model(s) trained in this call, {seconds:.1f} s "
          f"({seconds / max(result['models_trained'], 1):.1f} s per model trained).")
    print(f"Scores: {len(scored)} of {len(scores)} images scored (the rest were never held "
          f"out or never trained on); percentiles 5/25/50/75/95: "
          + " / ".join(f"{v:.3f}" for v in q))
    print(f"Atypical (mem > {memorization.DEFAULT_THRESHOLD}): "
          f"{np.mean(scored > memorization.DEFAULT_THRESHOLD):.1%} of scored images")
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:10]
    print("Most memorized: " + ", ".join(
        f"#{i} ({info.class_names[y[i]]}, {scores[i]:.2f})" for i in top))
    print(f"Saved {out}")


if __name__ == "__main__":
    app.run(main)
