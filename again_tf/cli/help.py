"""`--help` that shows the script's own flags first, fast, and exits with code 0.

absl's own `--help` lists only flags defined in the `__main__` module (none of ours live
there), exits with code 1, and `--helpfull` opens with ~85 lines of absl's flags. `run`
answers `-h`, `--help`, `--helpshort` and `--helpfull` before absl parses anything, and
no TensorFlow is imported on the way (`import again_tf` is cheap).
"""

import sys

from absl import app, flags

HELP = ("-h", "--help", "--helpshort", "-?")
FULL = ("--helpfull",)
SHARED = "again_tf.cli.definitions"


def text(doc, full=False):
    """The usage text: `doc`, our flags by module, and absl's flags with `full`."""
    values = flags.FLAGS
    by_module = values.flags_by_module_dict()
    # absl files a script's own flags under its path (sys.argv[0]), or "__main__".
    ours = [m for m in (sys.argv[0], "__main__", SHARED) if m in by_module]
    parts = [doc.strip(), ""]
    for module in ours:
        parts += [values.module_help(module), ""]
    if full:
        parts += ["Other flags (absl, TensorFlow):", ""]
        parts += [values.module_help(m) for m in sorted(by_module) if m not in ours]
    else:
        parts.append("--helpfull also lists the flags of absl itself (logging, flagfile).")
    return "\n".join(parts).rstrip() + "\n"


def run(main, doc, argv=None):
    """Runs `main` with absl's `app.run`, after answering the help flags (exit code 0)."""
    argv = sys.argv if argv is None else argv
    if any(a in HELP + FULL for a in argv[1:]):
        sys.stdout.write(text(doc, full=any(a in FULL for a in argv[1:])))
        sys.exit(0)
    app.run(main, argv=argv)
