"""Adversarially trains a classifier: `python train.py --defense=pgd_at --dataset=fashion_mnist`.

With no flags it trains the small CNN on Fashion-MNIST with AGAIN on PGD-AT (`again_pgd`)
on a CPU (about 20 minutes on 2 cores) and prints clean and adaptive PGD-20 accuracy on
1,000 held-out test images. Recipes:
`python train.py --flagfile=flags/cifar10_resnet18_pgd_at.cfg`. `--helpfull` lists flags.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from flags import definitions  # noqa: E402

definitions.define_train()
FLAGS = flags.FLAGS


def config_from_flags():
    from again_tf.training import TrainConfig

    model = FLAGS.model
    return TrainConfig(
        defense=FLAGS.defense, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=model,
        width=FLAGS.width, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        optimizer=FLAGS.optimizer, lr=FLAGS.lr, lr_schedule=FLAGS.lr_schedule,
        lr_milestones=tuple(int(m) for m in FLAGS.lr_milestones), lr_decay=FLAGS.lr_decay,
        momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
        eps=definitions.fraction(FLAGS.eps, "eps"),
        step_size=definitions.fraction(FLAGS.step_size, "step_size"), norm=FLAGS.norm,
        attack_steps=FLAGS.attack_steps, eval_steps=FLAGS.eval_steps, val_size=FLAGS.val_size,
        train_size=FLAGS.train_size, test_images=FLAGS.test_images,
        test_attacks=tuple(FLAGS.test_attacks),
        defense_params=definitions.key_values(FLAGS.defense_params, "defense_params"),
        memorization_scores=FLAGS.memorization_scores,
        seed=FLAGS.seed,
        out_dir=FLAGS.out_dir or os.path.join("runs", f"{FLAGS.dataset}_{model}_{FLAGS.defense}"),
        jit_compile=FLAGS.jit_compile, resume=FLAGS.resume, verbose=FLAGS.verbose,
        strategy=FLAGS.strategy, cpu_replicas=FLAGS.cpu_replicas,
        sync_batchnorm=FLAGS.sync_batchnorm, mixed_precision=FLAGS.mixed_precision)


def main(argv):
    del argv
    from absl import logging

    from again_tf import training

    logging.set_verbosity(logging.WARNING)  # TF's export logs INFO lines through absl

    try:
        training.train(config_from_flags())
    except (ValueError, FileNotFoundError, training.RunError) as e:
        sys.exit(f"train.py: error: {e}")
    except FloatingPointError as e:
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
