"""Images/s of a plain training step and of the PGD-k adversarial training step.

    python benchmarks/throughput.py [--models=small_cnn,resnet18] [--steps=10] [--batches=5]

For each model and XLA setting it times `fit` over a few batches of random data (after a
warm-up that absorbs tracing/compilation) and prints images/s of standard training,
of PGD-AT with k attack steps, and the ratio AT_time / ((k+1)·plain_time). A ratio
≤ 1.0 means an adversarial step costs no more than its arithmetic: k input-gradient
passes plus one training step. Also prints the process' peak resident memory.
"""

import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from again_tf import models  # noqa: E402
from again_tf.defenses import AdversarialModel  # noqa: E402
from again_tf.evaluation import format_table  # noqa: E402

flags.DEFINE_list("models", ["small_cnn", "resnet18"], "Models to time.")
flags.DEFINE_list("xla", ["false", "true"], "jit_compile settings to time.")
flags.DEFINE_integer("steps", 10, "PGD steps k of the adversarial step.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("batches", 5, "Timed batches per measurement (after one warm-up epoch).")
FLAGS = flags.FLAGS

SHAPES = {"small_cnn": (28, 28, 1)}


def images_per_second(name, defense, jit, steps):
    shape = SHAPES.get(name, (32, 32, 3))
    rng = np.random.default_rng(0)
    n = FLAGS.batch_size * FLAGS.batches
    x = rng.uniform(size=(n,) + shape).astype(np.float32)
    y = rng.integers(0, 10, n)
    adv = AdversarialModel(models.build(name, 10), defense=defense, eps=8 / 255,
                           step_size=2 / 255, steps=steps, eval_steps=0)
    adv.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit)
    adv.fit(x[:2 * FLAGS.batch_size], y[:2 * FLAGS.batch_size], batch_size=FLAGS.batch_size,
            verbose=0)  # trace and compile
    start = time.perf_counter()
    adv.fit(x, y, batch_size=FLAGS.batch_size, verbose=0, shuffle=False)
    return n / (time.perf_counter() - start)


def main(argv):
    del argv
    rows = []
    for name in FLAGS.models:
        for xla in FLAGS.xla:
            jit = xla == "true"
            plain = images_per_second(name, "none", jit, FLAGS.steps)
            at = images_per_second(name, "pgd_at", jit, FLAGS.steps)
            rows.append({"model": name, "xla": xla, "plain img/s": round(plain, 1),
                         f"PGD-{FLAGS.steps} AT img/s": round(at, 1),
                         "AT/((k+1)·plain)": round(plain / at / (FLAGS.steps + 1), 3)})
            print(rows[-1], flush=True)
    print(f"\nbatch {FLAGS.batch_size}, {os.cpu_count()} CPU cores, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB\n")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    app.run(main)
