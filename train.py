"""Adversarially trains a classifier: `python train.py --defense=pgd_at --dataset=fashion_mnist`.

With no flags it trains a PreAct ResNet-18 at width 8 (the papers' network shape at 1/8 of its
width) with AGAIN on PGD-AT (`again_pgd`) for 3 epochs on 9,500 Fashion-MNIST images, on a CPU
(about 10 minutes on 2 idle cores), and prints clean and adaptive PGD-20 accuracy on 1,000 test
images and the elapsed time. Recipes: `python train.py --flagfile=flags/fashion_mnist_pgd_at.cfg`,
`python train.py --flagfile=flags/cifar10_resnet18_pgd_at.cfg`. `--helpfull` adds absl's flags.
"""

import errno
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from again_tf.cli import definitions  # noqa: E402
from again_tf.cli import help as cli_help  # noqa: E402

definitions.define_train()
FLAGS = flags.FLAGS


def config_from_flags():
    from again_tf.training import TrainConfig

    model = FLAGS.model
    return TrainConfig(
        defense=FLAGS.defense, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=model,
        width=FLAGS.width, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        optimizer=FLAGS.optimizer, lr=FLAGS.lr, lr_schedule=FLAGS.lr_schedule,
        lr_milestones=definitions.integers(FLAGS.lr_milestones, "lr_milestones"),
        lr_decay=FLAGS.lr_decay,
        momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
        eps=definitions.fraction(FLAGS.eps, "eps"),
        step_size=definitions.fraction(FLAGS.step_size, "step_size"), norm=FLAGS.norm,
        attack_steps=FLAGS.attack_steps, attack_training=FLAGS.attack_training,
        attack_updates_statistics=FLAGS.attack_updates_statistics,
        eval_steps=FLAGS.eval_steps, val_size=FLAGS.val_size,
        train_size=FLAGS.train_size, test_images=FLAGS.test_images,
        test_attacks=tuple(FLAGS.test_attacks),
        defense_params=definitions.key_values(FLAGS.defense_params, "defense_params"),
        memorization_scores=FLAGS.memorization_scores,
        seed=FLAGS.seed,
        out_dir=FLAGS.out_dir,  # None: runs/<dataset>_<resolved model>_<defense>
        jit_compile=FLAGS.jit_compile, resume=FLAGS.resume, verbose=FLAGS.verbose,
        strategy=FLAGS.strategy, cpu_replicas=FLAGS.cpu_replicas,
        sync_batchnorm=FLAGS.sync_batchnorm, mixed_precision=FLAGS.mixed_precision)


def check_flags():
    """Validates the parsed flags as train.py would, without training (README test)."""
    from again_tf import training

    training.validate(config_from_flags())


def main(argv):
    del argv
    from absl import logging

    from again_tf import training

    logging.set_verbosity(logging.WARNING)  # TF's export logs INFO lines through absl

    try:
        training.train(config_from_flags())
    except (ValueError, FileNotFoundError, training.RunError) as e:
        if _disk_full(e):  # h5py reports a full disk in a multi-line message
            _write_failed(e)
        sys.exit(f"train.py: error: {' '.join(str(e).split())}")
    except FloatingPointError as e:
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # disk full, a folder made read-only during the run...
        _write_failed(e)


def _disk_full(e):
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def _write_failed(e):
    """One line for a failed write, then exit 1 at once: the interpreter's normal exit can
    crash on the half-written HDF5 file (a segmentation fault after a full disk)."""
    if _disk_full(e):
        reason = "No space left on device"
    else:
        reason = e.strerror or " ".join(str(e).split())[:300]
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    print(f"train.py: error: {reason}{where}; the checkpoint of the last finished epoch "
          f"(if any) is kept: free the space or fix the folder, then rerun with --resume", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    cli_help.run(main, __doc__)
