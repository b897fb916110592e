"""Searches a defense's hyper-parameters for the best validation robust accuracy.

    python tune.py --defense=trades --tuner=bayesian --max_trials=20 --epochs=5

Each trial trains the model of `train.py` (same data, model, attack flags) with one
sampled set of hyper-parameters and scores it by `val_robust_accuracy` (PGD-`eval_steps`
accuracy on the `--val_size` held-out training images). Searched: the defense's own
hyper-parameters among β (TRADES/MART/LBGAT), γ (AWP), α of ASE, the auxiliary-head
weight (ASE/CAS/CIFS), plus the learning rate and weight decay (`--search` picks a
subset). Trials are kept in `--out_dir` and a rerun resumes them (`--overwrite` starts
over); the end prints one row per trial, best first, and writes them to results.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from again_tf.cli import definitions  # noqa: E402
from again_tf.cli import help as cli_help  # noqa: E402

definitions.define_common()
flags.DEFINE_string("defense", "trades", "Defense whose hyper-parameters are searched.")
flags.DEFINE_enum("tuner", "random", ["random", "bayesian", "hyperband"],
                  "Search: random, bayesian (Gaussian process) or hyperband.")
flags.DEFINE_integer("max_trials", 10, "Search budget: trials (trainings) of random and "
                     "bayesian search. Hyperband's budget is --epochs (its max epochs).")
flags.DEFINE_list("search", [], "Hyper-parameters to search (default: all the defense "
                  "takes among beta, gamma, ase_alpha, aux_weight, lr, weight_decay).")
flags.DEFINE_string("defense_params", "", "Fixed defense hyper-parameters, name=value pairs.")
flags.DEFINE_string("model", "auto", "Model, as in train.py.")
flags.DEFINE_integer("width", 0, "Model width, as in train.py (0: the model's default).")
flags.DEFINE_integer("epochs", 3, "Epochs per trial (Hyperband: the most any trial gets).")
flags.DEFINE_enum("optimizer", "adam", ["sgd", "adam"], "Optimizer.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("eval_steps", 10, "PGD steps of the validation attack (the objective).")
flags.DEFINE_integer("train_size", 0, "Use only the first N training examples (0: all).")
flags.DEFINE_integer("val_size", 1000, "Held-out training examples scoring each trial.")
flags.DEFINE_string("out_dir", None, "Trials folder. Default runs/tune_<dataset>_<defense>.")
flags.DEFINE_bool("overwrite", False, "Start the search over instead of resuming it.")
flags.DEFINE_integer("verbose", 1, "0 quiet, 1 per-trial progress.")
FLAGS = flags.FLAGS


def check_writable(out_dir):
    """The trials folder must be writable before any trial runs; one line if not."""
    probe = os.path.join(out_dir, ".write_test.tmp")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out_dir={out_dir} cannot be written: {e.strerror or e}") from None


def main(argv):
    del argv
    from again_tf import models, training, tuning

    out_dir = FLAGS.out_dir or os.path.join("runs", f"tune_{FLAGS.dataset}_{FLAGS.defense}")
    try:
        cfg = training.TrainConfig(
            defense=FLAGS.defense, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
            model=FLAGS.model, width=FLAGS.width, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer,
            eps=definitions.fraction(FLAGS.eps, "eps"),
            step_size=definitions.fraction(FLAGS.step_size, "step_size"), norm=FLAGS.norm,
            attack_steps=FLAGS.attack_steps, eval_steps=FLAGS.eval_steps,
            train_size=FLAGS.train_size, val_size=FLAGS.val_size, seed=FLAGS.seed,
            defense_params=definitions.key_values(FLAGS.defense_params, "defense_params"),
            jit_compile=FLAGS.jit_compile, out_dir=out_dir)
        training.validate(cfg)
        if cfg.val_size < 1:
            raise ValueError(f"--val_size={cfg.val_size}: the objective needs validation data")
        if FLAGS.max_trials < 1:
            raise ValueError(f"--max_trials={FLAGS.max_trials} must be at least 1 (keras-tuner "
                             f"reads a budget below 1 as no limit)")
        check_writable(out_dir)
        cfg, info = training.resolve(cfg)
        train_ds, val_ds, _ = training.datasets(cfg, info)
        kwargs = {"width": cfg.width} if cfg.model == "small_cnn" else {}

        def classifier():
            return models.build(cfg.model, info.num_classes, mean=info.mean, std=info.std,
                                **kwargs)

        hypermodel = tuning.DefenseHyperModel(
            cfg.defense, classifier, info.shape, eps=cfg.eps, step_size=cfg.step_size,
            steps=cfg.attack_steps, norm=cfg.norm, eval_steps=cfg.eval_steps,
            optimizer=cfg.optimizer, search=FLAGS.search or None, fixed=cfg.defense_params,
            seed=cfg.seed, jit_compile=training.use_xla(cfg.jit_compile))
        tuner = tuning.make_tuner(FLAGS.tuner, hypermodel, max_trials=FLAGS.max_trials,
                                  max_epochs=cfg.epochs, directory=out_dir,
                                  project_name="trials", overwrite=FLAGS.overwrite,
                                  seed=cfg.seed)
    except ValueError as e:
        sys.exit(f"tune.py: error: {e}")
    if FLAGS.verbose:
        print(f"Searching {', '.join(hypermodel.search)} of {cfg.defense} with the "
              f"{FLAGS.tuner} tuner; objective {tuning.OBJECTIVE.name} (max)")
    try:
        tuner.search(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                     verbose=1 if FLAGS.verbose else 0)
        rows = tuning.summary_rows(tuner)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # disk full, folder made read-only during the search
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.exit(f"tune.py: error: {e.strerror or ' '.join(str(e).split())}{where}; the "
                 f"finished trials are kept in {out_dir}: rerun to resume the search")
    print(f"\n{cfg.defense}: {len(rows)} trial(s), best first (saved in {out_dir}):")
    print(tuning.summary_table(tuner))


if __name__ == "__main__":
    cli_help.run(main, __doc__)
