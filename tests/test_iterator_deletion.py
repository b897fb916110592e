"""benchmarks/iterator_deletion.py: times the deletes of both settings; bad flags are one line."""

import os
import runpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(os.path.join(ROOT, "benchmarks", "iterator_deletion.py"),
                          run_name="iterator_deletion")


def test_times_every_delete_of_both_settings(script, capsys):
    deletes = script["main"](["--iterators=3", "--max_seconds=0.05"])
    assert sorted(deletes) == [False, True]
    assert all(len(seconds) == 3 and all(0 <= s < 60 for s in seconds)
               for seconds in deletes.values()), deletes
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("autotuning on: 3 deletes, longest ")
    assert lines[-1].startswith("autotuning off: 3 deletes, longest ")


@pytest.mark.parametrize("argv,flag", [(["--iterators=0"], "--iterators=0"),
                                       (["--max_seconds=-1"], "--max_seconds=-1.0")])
def test_bad_flags_give_one_line(script, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        script["parse_args"](argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1], err
