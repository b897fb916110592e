"""What the analysis scripts of benchmarks/ share: one-line errors and exit code 2."""

import os
import sys


class ScriptError(Exception):
    """Bad input; the message says what in one line."""


def run_or_exit(run):
    """Runs `run()`; bad input (ScriptError, ValueError, a missing file) prints one line
    `error: ...` on stderr and exits with code 2. A reader that stops early (`| head`)
    ends the script quietly with code 1, as Python's documentation of SIGPIPE advises."""
    try:
        return run()
    except (ScriptError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would raise (and print) once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def parse_with_top(parser, argv, listed):
    """`parser`'s arguments plus `--top` (how many of `listed` to print, default 25),
    parsed from `argv`; `--top` below 1 is an argparse error naming it (exit 2)."""
    parser.add_argument("--top", type=int, default=25, help=f"{listed} to list")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top={args.top}: expected a count >= 1")
    return args
