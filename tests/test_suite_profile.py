"""benchmarks/suite_profile.py: a py-spy profile's samples by kind and by test file."""

import os
import runpy

import pytest

from helpers import ROOT, script_error_line

PYTEST = 'process 11:"python -m pytest -q -n 0 tests"'
# As py-spy --subprocesses --format raw writes them: a child under its parent, and a child
# run with `python -c` whose code (newlines and a line ending in a number included) is part
# of its process frame.
RAW = "\n".join([
    f"{PYTEST};main (pytest/__main__.py:9);test_a (test_foo.py:3);"
    "func_graph_from_py_func (tensorflow/python/framework/func_graph.py:1059);"
    "_create_c_op (tensorflow/python/framework/ops.py:1087) 7",
    f'{PYTEST};process 12:"python -c \nimport os\nx = 3\nprint(x)\n";<module> (<string>:1);'
    "_find_and_load (<frozen importlib._bootstrap>:1176) 4",
    f"{PYTEST};test_b (test_bar.py:9);call_flat (tensorflow/python/eager/"
    "polymorphic_function/atomic_function.py:219);quick_execute "
    "(tensorflow/python/eager/execute.py:53) 2",
    f"{PYTEST};test_b (test_bar.py:9);quick_execute (tensorflow/python/eager/execute.py:53) 1",
    f"{PYTEST};test_b (test_bar.py:12);asarray (numpy/core/_asarray.py:1) 3",
    f"{PYTEST};pytest_collection (_pytest/main.py:1) 2",
]) + "\n"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(os.path.join(ROOT, "benchmarks", "suite_profile.py"),
                          run_name="suite_profile")


def test_samples_by_kind_and_by_file(script, tmp_path, capsys):
    path = tmp_path / "suite.txt"
    path.write_text(RAW)
    stacks = script["read_stacks"](str(path))
    assert [n for _, n in stacks] == [7, 4, 2, 1, 3, 2]
    script["main"]([str(path)])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "19 samples"
    for row in ("import 4 21.1%", "trace 7 36.8%", "compiled call 2 10.5%",
                "eager op 1 5.3%", "other Python 5 26.3%"):
        assert row in lines, (row, lines)
    for row in ("7 36.8% ( 7) test_foo.py", "6 31.6% ( 0) test_bar.py",
                "4 21.1% ( 0) subprocess: python -c import os x = 3 print(x)",
                "2 10.5% ( 0) (outside any test file: pytest, conftest.py)"):
        assert row in lines, (row, lines)


def test_bad_input_gives_one_line(script, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("not a profile\n")
    for path, expected in ((tmp_path / "missing.txt", "No such file or directory"),
                           (empty, "no 'frames count' lines")):
        line = script_error_line(lambda: script["main"]([str(path)]), capsys)
        assert str(path) in line and expected in line, line
    with pytest.raises(SystemExit):
        script["parse_args"](["p.txt", "--top=0"])
    assert "--top=0: expected a count >= 1" in capsys.readouterr().err
