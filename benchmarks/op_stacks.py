"""What the Python stack TensorFlow records for each graph operation costs the tests.

    python benchmarks/op_stacks.py [--rounds=3] [--model=preact_resnet18]

The tests' processes replace that recording by one constant stack (tests/conftest.py:
`without_op_stacks`). This times what dominates most tests: the first `fit` of a freshly
built model (its train step traced, optimized and run once), for PGD-AT, AGAIN and TRADES on
64 random images, in a fresh process per setting, the settings in turn within each round
(the machine's drift hits both alike). Prints each run's seconds and the ratio of the sums.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFENSES = ("pgd_at", "again_pgd", "trades")


def first_fits(model, stacks):
    """Seconds of the first `fit` of each defense, in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import again_tf  # noqa: F401  (first, as the tests import it)
    import numpy as np

    from again_tf import models
    from again_tf.defenses import AdversarialModel

    if not stacks:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import without_op_stacks

        without_op_stacks()
    x = np.random.default_rng(0).uniform(size=(64, 28, 28, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 64)
    seconds = []
    for defense in DEFENSES:
        adv = AdversarialModel(models.build(model, 10, width=8), defense=defense, eps=0.1,
                               step_size=0.03, steps=2, eval_steps=2)
        adv.compile(optimizer="adam")
        start = time.perf_counter()
        adv.fit(x, y, batch_size=64, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - start)
    return seconds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting")
    parser.add_argument("--model", default="preact_resnet18",
                        choices=["preact_resnet18", "resnet18", "small_cnn"])
    parser.add_argument("--child", choices=["stacks", "constant"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive number of runs, got {args.rounds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(first_fits(args.model, args.child == "stacks")))
        return
    totals = {"stacks": 0.0, "constant": 0.0}
    print(f"first fit of {', '.join(DEFENSES)} on {args.model} (width 8), seconds each")
    for round_ in range(args.rounds):
        for setting in totals:
            proc = subprocess.run([sys.executable, __file__, f"--model={args.model}",
                                   f"--child={setting}"], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"op_stacks.py: the {setting} run failed: {proc.stderr[-2000:]}")
            seconds = json.loads(proc.stdout.strip().splitlines()[-1])
            totals[setting] += sum(seconds)
            print(f"round {round_ + 1} {setting:8s} " + " ".join(f"{s:5.2f}" for s in seconds)
                  + f"  sum {sum(seconds):5.2f}", flush=True)
    print(f"constant stack / recorded stacks: {totals['constant'] / totals['stacks']:.2f}")


if __name__ == "__main__":
    main()
