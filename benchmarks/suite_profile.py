"""Where the test suite's CPU time goes, from a py-spy profile of it.

    py-spy record --subprocesses -r 10 --format raw -o suite.txt -- \
        python -m pytest -q -n 0 tests
    python benchmarks/suite_profile.py suite.txt [--top=25]

py-spy (`pip install py-spy`; not a dependency of the project) samples the Python threads of
the test process (`-n 0`: one process, so every sample is a test's) and of the processes the
tests start (`--subprocesses`); TensorFlow's own threads, which run the kernels, are not
Python threads and are not sampled. `--format raw` writes one line per distinct stack, its
frames joined by ";" and its sample count last. Each sample goes to the first of these that
its stack holds:

- import: Python importing a module (`_find_and_load`);
- trace: TensorFlow running Python to build a graph: a `tf.function`'s first call for an
  input signature, or the body of a `tf.while_loop` or `tf.cond` inside one
  (`func_graph_from_py_func`);
- compiled call: a compiled function running (`call_flat`), its first call included, when
  TensorFlow instantiates and optimizes (Grappler) the graph;
- eager op: one operation run eagerly (`quick_execute`);
- other Python: the rest (Keras and again_tf in eager mode, NumPy, saving, pytest).

Then the samples per test file (a subprocess's under its command line), and how many of them
are tracing: tracing is paid once per new model, defense or attack a test builds.
"""

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from script_cli import ScriptError, parse_with_top, run_or_exit  # noqa: E402

CATEGORIES = [("import", "_find_and_load ("), ("trace", "func_graph_from_py_func ("),
              ("compiled call", "call_flat ("), ("eager op", "quick_execute (")]
TEST_FILE = re.compile(r"\((?:.*/)?(test_\w+\.py):\d+\)")


def read_stacks(path):
    """[(frames, samples)] of a py-spy raw file: one stack per line, its count last. With
    `--subprocesses` each stack starts with "process PID:<command line>" frames (a child's
    under its parent's), and a command line run with `python -c` carries its code,
    newlines included: records then start where a line starts with "process "."""
    with open(path, encoding="utf-8", errors="replace") as f:  # missing: run_or_exit's line
        text = f.read()
    records = (re.split(r"\n(?=process \d+:)", text) if text.startswith("process ")
               else text.split("\n"))
    stacks = []
    for record in records:
        stack, _, samples = record.strip().replace("\n", " ").rpartition(" ")
        if stack and samples.isdigit():
            stacks.append((stack.split(";"), int(samples)))
    return stacks


def category(frames):
    joined = ";".join(frames)
    for name, marker in CATEGORIES:
        if marker in joined:
            return name
    return "other Python"


def place(frames):
    """The test file whose code is on the stack, or the process the suite started (what a
    test runs in a subprocess: its stack holds no test file)."""
    for frame in frames:
        match = TEST_FILE.search(frame)
        if match:
            return match.group(1)
    processes = [f for f in frames if re.match(r"process \d+:", f)]
    if len(processes) > 1:
        command = re.sub(r"^process \d+:\"?|/\S*/(?=python)", "", processes[-1])
        return "subprocess: " + " ".join(command.rstrip('"').split())[:70]
    return "(outside any test file: pytest, conftest.py)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", help="the output of py-spy record --format raw")
    return parse_with_top(parser, argv, "test files")


def report(args):
    stacks = read_stacks(args.profile)
    if not stacks:
        raise ScriptError(f"{args.profile}: no 'frames count' lines; expected the output of "
                          f"py-spy record --format raw")
    total = sum(n for _, n in stacks)
    by_category = collections.Counter()
    by_file = collections.Counter()
    traced = collections.Counter()
    for frames, n in stacks:
        kind = category(frames)
        by_category[kind] += n
        where = place(frames)
        by_file[where] += n
        if kind == "trace":
            traced[where] += n
    print(f"{total} samples")
    for name, _ in CATEGORIES + [("other Python", None)]:
        print(f"  {name:14s} {by_category[name]:7d}  {100 * by_category[name] / total:5.1f}%")
    print(f"\nsamples per test file or subprocess (of which tracing), the {args.top} "
          f"largest")
    for where, n in by_file.most_common(args.top):
        print(f"  {n:7d} {100 * n / total:5.1f}%  ({traced[where]:6d})  {where}")


def main(argv=None):
    args = parse_args(argv)
    run_or_exit(lambda: report(args))


if __name__ == "__main__":
    main()
