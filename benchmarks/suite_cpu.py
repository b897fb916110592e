"""Which test files and tests use the test suite's CPU, from the harness' per-test log.

    AGAIN_TF_TEST_CPU_LOG=cpu.jsonl python -m pytest -q tests
    python benchmarks/suite_cpu.py cpu.jsonl [--top=25]

tests/cpu_log.py writes one line per test: the CPU seconds its process used during the test
(TensorFlow's threads included) and those of the subprocesses that ended during it (the
scripts run as real processes). This prints the total, the share spent in subprocesses,
each pytest-xdist worker's tests, CPU and end (how evenly the workers finished), then the
CPU by test file and by test, largest first. A fixture's cost is in the first test that
uses it. CPU seconds, unlike durations, change little with the load beside a test, so two
runs' tables can be compared (benchmarks/suite_profile.py says what kind of work it is).
"""

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from script_cli import ScriptError, parse_with_top, run_or_exit  # noqa: E402

FIELDS = ("test", "worker", "start", "end", "cpu", "children_cpu")


def read_log(path):
    """The records of a log written by tests/cpu_log.py, in file order."""
    records = []
    with open(path, encoding="utf-8") as f:  # missing: run_or_exit's line
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or any(k not in record for k in FIELDS):
                raise ScriptError(f"{path}, line {number}: expected a JSON record with "
                                  f"{', '.join(FIELDS)} (as tests/cpu_log.py writes)")
            records.append(record)
    if not records:
        raise ScriptError(f"{path}: no records; run the tests with "
                          f"AGAIN_TF_TEST_CPU_LOG={path} first")
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", help="the file AGAIN_TF_TEST_CPU_LOG named")
    return parse_with_top(parser, argv, "files and tests")


def cpu(record):
    """A test's CPU seconds: its process' and its subprocesses'."""
    return record["cpu"] + record["children_cpu"]


def report(args):
    records = read_log(args.log)
    total = max(sum(map(cpu, records)), 1e-9)
    children = sum(r["children_cpu"] for r in records)
    first = min(r["start"] for r in records)
    print(f"{len(records)} tests, {total:.0f} CPU-s, {children:.0f} of them in subprocesses "
          f"({100 * children / total:.0f}%); {max(r['end'] for r in records) - first:.0f} s "
          f"from the first test's start to the last one's end")
    workers = collections.defaultdict(list)
    for r in records:
        workers[r["worker"]].append(r)
    for name in sorted(workers):
        rows = workers[name]
        print(f"  worker {name}: {len(rows)} tests, {sum(map(cpu, rows)):.0f} CPU-s, "
              f"last test ended at {max(r['end'] for r in rows) - first:.0f} s")
    by_file, in_children, tests = (collections.Counter() for _ in range(3))
    for r in records:
        name = r["test"].split("::")[0]
        by_file[name] += cpu(r)
        in_children[name] += r["children_cpu"]
        tests[name] += 1
    print(f"\nCPU-s by test file (in subprocesses), the {args.top} largest")
    for name, seconds in by_file.most_common(args.top):
        print(f"  {seconds:7.1f} {100 * seconds / total:5.1f}%  ({in_children[name]:6.1f})  "
              f"{name} ({tests[name]} tests)")
    print(f"\nCPU-s by test (in subprocesses), the {args.top} largest")
    for r in sorted(records, key=cpu, reverse=True)[:args.top]:
        print(f"  {cpu(r):7.1f}  ({r['children_cpu']:6.1f})  {r['test']}")


def main(argv=None):
    args = parse_args(argv)
    run_or_exit(lambda: report(args))


if __name__ == "__main__":
    main()
