"""Images/s of a plain training step and of each defense's adversarial training step.

    python benchmarks/throughput.py [--models=small_cnn,resnet18] [--steps=10] [--batches=5]
    python benchmarks/throughput.py --models=small_cnn --defenses=pgd_at,trades,mart,awp

For each model, XLA setting and defense it times `fit` over a few batches of random data
(after a warm-up that absorbs tracing/compilation) and prints images/s, the cost of one
step in plain training steps (`cost` = step time ÷ plain step time),
the step's arithmetic in the same unit (`arith`: k input-gradient passes, each about one
plain step, plus the passes the defense's loss needs; see ARITHMETIC) and their ratio
`cost/arith`: ≤ 1.0 means the step costs no more than its arithmetic. For PGD-AT the
ratio is AT_time / ((k+1)·plain_time). The plain and defense steps are measured in turn,
`--rounds` times, and the best of each kept: on a shared machine a load change between two
back-to-back measurements otherwise shows up as a ratio. Also prints the process' peak
resident memory.
The time of evaluate.py's AutoAttack per 1,000 images: benchmarks/autoattack.py.
"""

import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import again_tf  # noqa: E402,F401  (before TensorFlow: again_tf.startup's settings)
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
flags.DEFINE_integer("rounds", 3, "Measurements per step, interleaved; the best is kept.")
flags.DEFINE_list("defenses", ["pgd_at"], "Defenses to time beside plain training "
                  "(registered names; e.g. pgd_at,trades,mart,awp,fat,lbgat).")
FLAGS = flags.FLAGS

SHAPES = {"small_cnn": (28, 28, 1)}


def timer(name, defense, jit, steps):
    """A function returning one measurement of `defense`'s images/s on `name`.

    A measurement is b batches' images over (time of 1 + b batches − time of 1 batch):
    the difference removes `fit`'s fixed cost per call (iterators, callbacks), which would
    otherwise dominate a few small batches. Tracing and compilation happen here, before.
    """
    shape = SHAPES.get(name, (32, 32, 3))
    rng = np.random.default_rng(0)
    bs = FLAGS.batch_size
    n = bs * (FLAGS.batches + 1)
    x = rng.uniform(size=(n,) + shape).astype(np.float32)
    y = rng.integers(0, 10, n)
    params = {"awp_warmup": 0} if "awp" in defense else {}  # time the perturbed step
    adv = AdversarialModel(models.build(name, 10), defense=defense, eps=8 / 255,
                           step_size=2 / 255, steps=steps, eval_steps=0, **params)
    adv.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit)
    adv.fit(x[:2 * bs], y[:2 * bs], batch_size=bs, verbose=0)  # trace and compile

    def seconds(count):
        start = time.perf_counter()
        adv.fit(x[:count], y[:count], batch_size=bs, verbose=0, shuffle=False)
        return time.perf_counter() - start

    return lambda: bs * FLAGS.batches / max(seconds(n) - seconds(bs), 1e-9)


def interleaved(timers, rounds):
    """The best of `rounds` measurements per timer, taken in turn (plain, defense, plain,
    ...), so that a change of the machine's load between them biases no ratio."""
    best = {key: 0.0 for key in timers}
    for _ in range(rounds):
        for key, measure in timers.items():
            best[key] = max(best[key], measure())
    return best


# A defense step in plain training steps (forward + backward of one batch), k = attack
# steps: each attack step is one forward and one input-gradient pass (~ one plain step);
# TRADES/MART/LBGAT train on the clean and the adversarial batch (2), TRADES' attack also
# takes the clean logits (+~1/3); AWP adds one proxy step; LBGAT's teacher one more.
ARITHMETIC = {
    "none": lambda k: 1, "pgd_at": lambda k: k + 1, "fat": lambda k: k + 1,
    "trades": lambda k: k + 2 + 1 / 3, "mart": lambda k: k + 2, "awp": lambda k: k + 2,
    "trades_awp": lambda k: k + 4 + 1 / 3, "mart_awp": lambda k: k + 4,
    "fat_trades": lambda k: k + 2 + 1 / 3, "lbgat": lambda k: k + 3 + 1 / 3,
}


def main(argv):
    del argv
    rows = []
    k = FLAGS.steps
    for name in FLAGS.models:
        for xla in FLAGS.xla:
            jit = xla == "true"
            timers = {d: timer(name, d, jit, k) for d in ["none"] + list(FLAGS.defenses)}
            speeds = interleaved(timers, FLAGS.rounds)
            plain = speeds["none"]
            for defense in FLAGS.defenses:
                speed = speeds[defense]
                cost = plain / speed
                arith = ARITHMETIC[defense](k) if defense in ARITHMETIC else None
                rows.append({"model": name, "xla": xla, "defense": defense,
                             "plain img/s": f"{plain:.1f}", "img/s": f"{speed:.1f}",
                             "cost": f"{cost:.2f}",
                             "arith": "-" if arith is None else f"{arith:.2f}",
                             "cost/arith": "-" if arith is None else f"{cost / arith:.2f}"})
                print(rows[-1], flush=True)
    print(f"\nbatch {FLAGS.batch_size}, PGD-{k}, best of {FLAGS.rounds} interleaved rounds of "
          f"{FLAGS.batches} timed batches, "
          f"{os.cpu_count()} CPU cores, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB\n")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    app.run(main)
