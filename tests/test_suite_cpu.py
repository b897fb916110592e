"""tests/cpu_log.py's per-test CPU records and benchmarks/suite_cpu.py's tables of them."""

import json
import os
import runpy
import textwrap

import pytest

from cpu_log import CpuLog
from helpers import ROOT, script_error_line


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(os.path.join(ROOT, "benchmarks", "suite_cpu.py"), run_name="suite_cpu")


def test_each_test_gets_its_own_and_its_subprocesses_cpu(tmp_path, monkeypatch):
    """A pytest run with the recorder: a test that computes, one whose subprocess computes
    and one that sleeps, each for 0.4 s."""
    (tmp_path / "test_three.py").write_text(textwrap.dedent("""
        import subprocess, sys, time

        SPIN = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass"

        def test_computes():
            exec(SPIN)

        def test_runs_a_computing_process():
            subprocess.run([sys.executable, "-c", SPIN], check=True)

        def test_sleeps():
            time.sleep(0.4)
    """))
    log = tmp_path / "cpu.jsonl"
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # a plain run: no xdist
    assert pytest.main([str(tmp_path / "test_three.py"), "-q", "-p", "no:cacheprovider"],
                       plugins=[CpuLog(str(log))]) == 0
    records = {r["test"].split("::")[1]: r for r in map(json.loads, log.read_text().splitlines())}
    assert list(records) == ["test_computes", "test_runs_a_computing_process", "test_sleeps"]
    computes, runs, sleeps = records.values()
    assert computes["cpu"] >= 0.35 and computes["children_cpu"] < 0.05
    assert runs["children_cpu"] >= 0.35 and runs["cpu"] < 0.2
    assert sleeps["cpu"] < 0.1 and sleeps["children_cpu"] < 0.05
    assert sleeps["end"] - sleeps["start"] >= 0.4 and sleeps["start"] >= runs["end"]
    assert {r["worker"] for r in records.values()} == {os.environ.get("PYTEST_XDIST_WORKER", "-")}



def test_a_log_that_cannot_be_written_is_one_usage_error(tmp_path):
    with pytest.raises(pytest.UsageError, match=r"^AGAIN_TF_TEST_CPU_LOG=\S+/no/cpu.jsonl: "
                                                r"cannot be written \(No such file"):
        CpuLog(str(tmp_path / "no" / "cpu.jsonl"))

LOG = [
    {"test": "tests/test_a.py::test_one", "worker": "gw0", "start": 100.0, "end": 110.0,
     "cpu": 9.0, "children_cpu": 0.0},
    {"test": "tests/test_b.py::test_cli", "worker": "gw1", "start": 100.0, "end": 130.0,
     "cpu": 0.5, "children_cpu": 20.0},
    {"test": "tests/test_a.py::test_two", "worker": "gw0", "start": 110.0, "end": 140.0,
     "cpu": 10.5, "children_cpu": 0.0},
]


def test_tables_by_worker_file_and_test(script, tmp_path, capsys):
    path = tmp_path / "cpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LOG) + "\n")
    script["main"]([str(path), "--top=2"])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ("3 tests, 40 CPU-s, 20 of them in subprocesses (50%); 40 s from the "
                        "first test's start to the last one's end")
    assert lines[1:3] == ["worker gw0: 2 tests, 20 CPU-s, last test ended at 40 s",
                          "worker gw1: 1 tests, 20 CPU-s, last test ended at 30 s"]
    by_file = lines.index("CPU-s by test file (in subprocesses), the 2 largest")
    assert lines[by_file + 1:by_file + 3] == ["20.5 51.2% ( 20.0) tests/test_b.py (1 tests)",
                                              "19.5 48.8% ( 0.0) tests/test_a.py (2 tests)"]
    by_test = lines.index("CPU-s by test (in subprocesses), the 2 largest")
    assert lines[by_test + 1:] == ["20.5 ( 20.0) tests/test_b.py::test_cli",
                                   "10.5 ( 0.0) tests/test_a.py::test_two"]


def test_bad_input_gives_one_line(script, tmp_path, capsys):
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("\n")
    broken.write_text(json.dumps(LOG[0]) + "\n" + json.dumps({"test": "t"}) + "\n")
    for path, expected in ((tmp_path / "missing.jsonl", "No such file or directory"),
                           (empty, "no records; run the tests with AGAIN_TF_TEST_CPU_LOG="),
                           (broken, "line 2: expected a JSON record with test, worker")):
        line = script_error_line(lambda: script["main"]([str(path)]), capsys)
        assert str(path) in line and expected in line, line
    with pytest.raises(SystemExit):
        script["parse_args"](["cpu.jsonl", "--top=0"])
    assert "--top=0: expected a count >= 1" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_script_quietly(tmp_path):
    """`python benchmarks/suite_cpu.py log | head -1`: the script's one real process (no
    TensorFlow in it). Without run_or_exit's BrokenPipeError branch it ends with a
    traceback on stderr."""
    import subprocess
    import sys

    path = tmp_path / "cpu.jsonl"
    record = dict(LOG[0], cpu=1.0, children_cpu=0.0)
    path.write_text("".join(json.dumps(dict(record, test=f"tests/test_{i}.py::t")) + "\n"
                            for i in range(20000)))  # tables far larger than a pipe's buffer
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "suite_cpu.py"),
                             str(path), "--top=20000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("20000 tests, 20000 CPU-s")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == "", err


def test_the_scheduling_order_names_existing_test_files():
    """conftest's LONGEST_FIRST orders the files for pytest-xdist: a renamed or deleted file
    left in it would silently fall back to the end of the run."""
    from conftest import LONGEST_FIRST

    present = set(os.listdir(os.path.join(ROOT, "tests")))
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [name for name in LONGEST_FIRST if name not in present] == []
