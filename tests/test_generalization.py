"""benchmarks/generalization.py at a tiny size: per-epoch train/test accuracies, figures,
table, and a rerun that resumes from the finished runs instead of training again."""

import json
import os
import subprocess
import sys

from helpers import ROOT, run_main


def test_generalization_script_logs_draws_and_resumes(tmp_path):
    out = tmp_path / "gen"
    args = [sys.executable, os.path.join("benchmarks", "generalization.py"),
            "--defenses=pgd_at,again_pgd", "--model=small_cnn", "--width=4",
            "--train_size=96", "--eval_images=32", "--attack_steps=1", "--eval_steps=1",
            "--eval_every=3", f"--out_dir={out}"]
    first = subprocess.run(args + ["--epochs=1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    # Three epochs: the runs resume after their first epoch (history kept), measure the
    # third (not the second: --eval_every=3), then redraw.
    second = run_main(*args[1:], "--epochs=3")  # in this process: one real one is enough
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming" in second.stdout
    saved = json.loads((out / "generalization.json").read_text())
    assert [r["defense"] for r in saved["rows"]] == ["pgd_at", "again_pgd"]
    for name, history in saved["histories"].items():
        assert history["epoch"] == [1, 3], name
        keys = ("train_clean", "test_clean", "train_robust", "test_robust")
        assert all(len(history[k]) == 2 for k in keys), name
        assert all(0.0 <= v <= 1.0 for k in keys for v in history[k])
        # Robust accuracy never above clean accuracy on the same images.
        assert all(r <= c for r, c in zip(history["test_robust"], history["test_clean"]))
    for row in saved["rows"]:
        assert row["final_robust_gap"] == row["best_robust_gap"] or row["best_epoch"] != 3
    assert (out / "generalization_standard.png").stat().st_size > 1000
    assert (out / "generalization_robust.png").stat().st_size > 1000
    assert "| pgd_at |" in second.stdout and "| again_pgd |" in second.stdout
    # --from_runs tabulates only runs of the configuration its flags ask for.
    redrawn = run_main(*args[1:], "--epochs=3", "--from_runs")
    assert redrawn.returncode == 0 and "| again_pgd |" in redrawn.stdout, redrawn.stderr
    for other, says in (("--seed=1", "seed=0 (these flags: 1)"),
                        ("--train_size=128", "train_size=96 (these flags: 128)"),
                        ("--eval_every=2", "not at [1, 2, 3] as --epochs=3 --eval_every=2 ask"),
                        ("--epochs=4", "unfinished (measured up to epoch 3 of --epochs=4)")):
        mismatch = run_main(*args[1:], "--epochs=3", "--from_runs", other)
        assert mismatch.returncode != 0 and says in mismatch.stderr, (other, mismatch.stderr)
        assert mismatch.stderr.count("\n") == 1, mismatch.stderr  # one line
    bad = run_main(args[1], "--defenses=nope")
    assert bad.returncode == 2 and "--defenses: unknown 'nope'" in bad.stderr
