"""Per-test CPU time, for finding where the suite's time goes (docs/testing.md).

With AGAIN_TF_TEST_CPU_LOG=<file> every test process appends one JSON line per test to
<file>: the test's id, its pytest-xdist worker ("-" without xdist), when it started and
ended (epoch seconds), the CPU seconds (user + system) its process used meanwhile, every
thread included, and the CPU seconds of the child processes that ended meanwhile (the
scripts a test runs as subprocesses). Module and session fixtures count in the first test
that uses them; the serving process of tests/helpers.py, which lives as long as its worker,
in none. CPU time, unlike a test's duration, barely depends on what the other worker is
doing at the time. `python benchmarks/suite_cpu.py <file>` sums it by file and by test."""

import json
import os
import resource
import time

import pytest


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class CpuLog:
    """A pytest plugin that appends each test's record to `path`."""

    def __init__(self, path):
        self.path = path
        try:  # a log that cannot be written stops the run at its start, in one line
            open(path, "a", encoding="utf-8").close()
        except OSError as e:
            raise pytest.UsageError(
                f"AGAIN_TF_TEST_CPU_LOG={path}: cannot be written ({e.strerror})") from None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        start = time.time()
        own, children = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
        yield
        record = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "-"),
                  "start": start, "end": time.time(),
                  "cpu": cpu_seconds(resource.RUSAGE_SELF) - own,
                  "children_cpu": cpu_seconds(resource.RUSAGE_CHILDREN) - children}
        # One write per line in append mode: the workers' lines do not interleave.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
