"""The README's benchmark tables are what the scripts rebuild from the records in git.

The runs behind them take CPU-hours and their folders do not travel with a clone; each run
leaves a small record in `benchmarks/records/`, and `--from_runs` rebuilds a table from the
records alone. These tests rebuild each table the README shows from records, with the
README's own command, and require every row to appear in the README exactly as printed: a
number edited by hand, or a record changed without the README, fails here.
"""

import os
import shlex
import shutil

import pytest
from helpers import ROOT, run_main
from test_readme import readme, shell_commands

RECORDS = os.path.join(ROOT, "benchmarks", "records")
DEFENSE_RUN = ["--from_runs", "--epochs=3", "--train_size=10000", "--val_size=500",
               "--test_images=1000", "--aa_images=500"]


def rows(stdout):
    """The body rows of the markdown table a script printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [line for line in lines if not line.startswith("| defense |")]


def readme_commands(script):
    """The README's `python <script> --from_runs ...` commands, one argv each."""
    return [shlex.split(c)[2:] for c in shell_commands()
            if c.startswith(f"python {script} --from_runs")]


HEADLINE = "none,pgd_at,again_pgd,again_pgd_hff,awp,again_awp,cas"
# The README's tables rebuilt from records: --defenses, --seeds, --aa_defenses. (The first
# seed-0 table was measured before records were kept; its run folders are gone.)
DEFENSE_TABLES = {
    "seeds 1 and 2": (HEADLINE, "1,2", HEADLINE),
    "three seeds": (HEADLINE, "0,1,2", HEADLINE),
    "other rows": ("trades,mart,again_trades,again_mart,cifs,cas_trades,cas_mart,trades_awp,"
                   "mart_awp,fat,fat_trades,lbgat,las_at,classwise,classwise_trades,bat", "0", "none"),
}


@pytest.mark.parametrize("table", sorted(DEFENSE_TABLES))
def test_a_defense_table_of_the_readme_is_what_its_records_rebuild(table, tmp_path):
    defenses, seeds, aa = DEFENSE_TABLES[table]
    argv = DEFENSE_RUN + [f"--defenses={defenses}", f"--seeds={seeds}", f"--aa_defenses={aa}"]
    # The README gives the command (with a --json of its own).
    assert any(sorted(a for a in command if not a.startswith("--json=")) == sorted(argv)
               for command in readme_commands("benchmarks/defenses.py")), argv
    out = run_main("benchmarks/defenses.py", *argv, f"--json={tmp_path / 'table.json'}",
                   f"--out_dir={tmp_path / 'no_runs'}")
    assert out.returncode == 0, out.stderr[-2000:]
    printed = rows(out.stdout)
    assert [r.split("|")[1].strip() for r in printed] == defenses.split(",")
    text = readme()
    for row in printed:
        assert row in text, f"not in README.md as rebuilt from the records: {row}"


def test_the_generalization_table_of_the_readme_is_what_its_records_rebuild(tmp_path):
    commands = readme_commands("benchmarks/generalization.py")
    assert commands
    for argv in commands:
        seed = next(a for a in argv if a.startswith("--seed=")).split("=")[1]
        runs = tmp_path / f"seed{seed}"
        shutil.copytree(os.path.join(RECORDS, "generalization", f"seed{seed}"), runs)
        argv = [a for a in argv if not a.startswith("--out_dir=")]
        out = run_main("benchmarks/generalization.py", *argv, f"--out_dir={runs}")
        assert out.returncode == 0, out.stderr[-2000:]
        printed = rows(out.stdout)
        assert len(printed) == len(os.listdir(os.path.join(RECORDS, "generalization",
                                                           f"seed{seed}")))
        text = readme()
        for row in printed:
            assert row in text, f"not in README.md as rebuilt from the records: {row}"
        assert (runs / "generalization_robust.png").stat().st_size > 1000
