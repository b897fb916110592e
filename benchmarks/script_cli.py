"""What the analysis scripts of benchmarks/ share: one-line errors and exit code 2."""

import sys


class ScriptError(Exception):
    """Bad input; the message says what in one line."""


def run_or_exit(run):
    """Runs `run()`; bad input (ScriptError, ValueError, a missing file) prints one line
    `error: ...` on stderr and exits with code 2."""
    try:
        return run()
    except (ScriptError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
