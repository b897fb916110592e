"""Helpers shared by several test files."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigint_as_a_terminal_sends_it():
    """`preexec_fn` of a child process that is sent SIGINT: the default disposition, so
    Python installs its KeyboardInterrupt handler even when the tests run in a process
    that ignores SIGINT (started with `nohup ... &`; children inherit the ignoring)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Loads SavedModels and serves them, one job per line of stdin: a process that imports
# TensorFlow and NumPy only (no again_tf, no Keras objects registered), as a server would.
SERVER = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    for line in sys.stdin:
        export, x_path, y_path = json.loads(line)
        try:
            served = tf.saved_model.load(export)
            np.save(y_path, served.serve(np.load(x_path)).numpy())
            print("served", flush=True)
        except Exception as e:  # the test fails with it; the server serves the next job
            print("failed", " ".join(f"{type(e).__name__}: {e}".split()), flush=True)
""")
_server = []


def serve_saved_model(export, x, y_path):
    """Serves `x` from the SavedModel folder `export` in the serving process (one per test
    worker, started at first use: one TensorFlow start-up for all the export tests), saves
    the output to `y_path` and returns it."""
    if not _server or _server[0].poll() is not None:
        _server[:] = [subprocess.Popen(
            [sys.executable, "-c", SERVER], cwd=ROOT, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})]
    proc = _server[0]
    x_path = f"{y_path}.x.npy"
    np.save(x_path, x)
    proc.stdin.write(json.dumps([str(export), x_path, str(y_path)]) + "\n")
    proc.stdin.flush()
    while True:  # TensorFlow may print its own lines first
        reply = proc.stdout.readline()
        if not reply:
            raise AssertionError(f"the serving process died (exit {proc.wait()})")
        if reply.startswith(("served", "failed")):
            break
    assert reply.startswith("served"), f"serving {export}: {reply.strip()}"
    return np.load(y_path)


def served_in_fresh_process(model, x, tmp_path):
    """Exports `model` (float32 images -> logits) and serves `x` from the SavedModel in a
    process that never saw the model's Python objects (`serve_saved_model`)."""
    export = str(tmp_path / "saved")
    model.export(export, format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)])
    return serve_saved_model(export, x, tmp_path / "y.npy")


def load_script(script):
    """The namespace of `script` (e.g. "train.py") loaded as a module, its flags defined
    afresh: the flags of a script loaded before are dropped first (absl's own stay)."""
    import runpy

    from absl import flags

    values = flags.FLAGS
    for name in list(values):
        if not values.find_module_defining_flag(name, "absl").startswith("absl"):
            delattr(values, name)
    values.unparse_flags()
    path = os.path.join(ROOT, script)
    if os.path.dirname(path) not in sys.path:  # as `python <script>` has it: its own folder
        sys.path.insert(0, os.path.dirname(path))
    return runpy.run_path(path, run_name="cli_case")


def run_main(script, *argv):
    """Runs `python <script> <argv>` in this process, through the script's own `main()`.

    The command-line contract of each script is kept by one real subprocess elsewhere; this
    runs the other cases without ~20 s of interpreter and TensorFlow start-up each. The
    script's flags are defined afresh (a script defines them at import), parsed from `argv`
    as absl's `app.run` would, and `main` runs with the working directory at the project
    root. `SystemExit` gives the exit code; a message passed to `sys.exit` goes to stderr.
    Returns a `subprocess.CompletedProcess`, as `subprocess.run(..., text=True)` would.
    """
    import contextlib
    import io

    from absl import flags

    out, err = io.StringIO(), io.StringIO()
    code, cwd, argv0 = 0, os.getcwd(), sys.argv
    os.chdir(ROOT)
    try:
        module = load_script(script)
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                flags.FLAGS(sys.argv)
                module["main"](sys.argv[:1])
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else (e.code or 0)
    finally:
        os.chdir(cwd)
        sys.argv = argv0
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def script_error_line(call, capsys):
    """Runs `call()`, which must exit with code 2 after printing exactly one line on stderr
    (benchmarks/script_cli.py's contract for bad input), and returns that line."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
