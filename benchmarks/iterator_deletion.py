"""How long deleting a `tf.data` iterator takes, with autotuning on and off.

    python benchmarks/iterator_deletion.py [--iterators=150] [--max_seconds=2.5]

In the test suite a worker now and then stood still for up to a minute while TensorFlow
deleted an autotuned iterator: the delete waits for the iterator's autotuning thread, which
sleeps up to a minute between tuning rounds and should be woken at once (docs/testing.md,
"The stalls, explained"; the tests' processes now turn autotuning off,
tests/conftest.py: `without_data_autotuning`). This makes iterators the way `fit` does (a
shuffled, batched, prefetched pipeline of in-memory images), uses each for a random 0 to
`--max_seconds` seconds, deletes it and times the delete; the two settings alternate. Prints
each delete over 0.5 s as it happens, then per setting the count, the longest and the sum.
"""

import argparse
import os
import random
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterators", type=int, default=150,
                        help="iterators per setting (default 150)")
    parser.add_argument("--max_seconds", type=float, default=2.5,
                        help="each iterator is used for a random 0 to this many seconds "
                             "before it is deleted (default 2.5)")
    args = parser.parse_args(argv)
    if args.iterators < 1:
        parser.error(f"--iterators={args.iterators}: expected at least 1")
    if args.max_seconds < 0:
        parser.error(f"--max_seconds={args.max_seconds}: expected 0 or more")
    return args


def main(argv=None):
    args = parse_args(argv)  # None: sys.argv[1:], as argparse reads it
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    images = np.random.default_rng(0).uniform(size=(512, 28, 28, 1)).astype(np.float32)
    draw = random.Random(0)
    deletes = {True: [], False: []}
    for index in range(args.iterators):
        for autotune in (True, False):
            options = tf.data.Options()
            options.autotune.enabled = autotune
            dataset = (tf.data.Dataset.from_tensor_slices(images).shuffle(512).batch(64)
                       .prefetch(tf.data.AUTOTUNE).with_options(options))
            iterator = iter(dataset)
            stop = time.monotonic() + draw.uniform(0, args.max_seconds)
            while time.monotonic() < stop:
                if next(iterator, None) is None:  # an epoch ended: start the next one
                    iterator = iter(dataset)
            start = time.perf_counter()
            del iterator
            seconds = time.perf_counter() - start
            deletes[autotune].append(seconds)
            if seconds > 0.5:
                print(f"iterator {index}, autotuning {'on' if autotune else 'off'}: "
                      f"deleted in {seconds:.1f} s", flush=True)
    for autotune, seconds in deletes.items():
        print(f"autotuning {'on' if autotune else 'off'}: {len(seconds)} deletes, longest "
              f"{max(seconds):.3f} s, sum {sum(seconds):.1f} s, over 0.5 s: "
              f"{sum(s > 0.5 for s in seconds)}")
    return deletes


if __name__ == "__main__":
    main()
