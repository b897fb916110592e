"""The README's code runs: every Python block as written, every shell command's flags.

So that README and code cannot drift apart:
- every fenced ```python block of README.md is executed in-process, verbatim, in a
  temporary folder; only its size is shrunk, by a fixture that caps what any split of
  `again_tf.data.load`/`load_arrays` returns (`README_IMAGES` images) and the epochs of
  `fit` (1). Set AGAIN_TF_README_FULL=1 to run the blocks at their written size.
- every `python <script> ...` command in README.md and the pages under docs/ (indented,
  fenced or inline) is parsed by its script's own flags and its configuration validated,
  all scripts in the test process (the scripts define their flags at import; each script's
  are removed before the next). The main job itself, `python train.py`, runs end to end in
  tests/test_training.py's CLI test.
"""

import os
import re
import shlex

import again_tf
from again_tf import data  # noqa: F401  (first: imports TensorFlow quietly)
import keras
import pytest
from helpers import ROOT, load_script

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_IMAGES = 128  # one training batch of the README's 128
FULL = os.environ.get("AGAIN_TF_README_FULL") == "1"


def readme(path=README):
    with open(path, encoding="utf-8") as f:
        return f.read()


def pages():
    """README.md, then the Markdown pages under docs/ (each must be linked from README.md)."""
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS)
                             if name.endswith(".md"))


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", readme(), flags=re.S | re.M)


def shell_commands():
    """`python X.py ...` commands of the README's and the docs pages' code (fenced, indented
    or inline), one string each."""
    commands = []
    text = "\n".join(readme(path) for path in pages())
    # Every fence in order (a closing fence must not open the next block), then the shell ones.
    code = [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
            if tag in ("", "sh", "bash", "shell")]
    code += re.findall(r"((?:^    .*\n)+)", text, flags=re.M)
    code += [" ".join(span.split()) for span in re.findall(r"`(python\s[^`]+)`", text)]  # may wrap
    for chunk in code:
        for line in chunk.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("python ") and ".py" in part.split()[1]:
                    commands.append(part)
    return sorted(set(commands))


def capped_split(split):
    """`split` limited to its first README_IMAGES examples."""
    match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
    if not match:
        return split
    name, start, stop = match.group(1), int(match.group(2) or 0), match.group(3)
    stop = min(int(stop), start + README_IMAGES) if stop else start + README_IMAGES
    return f"{name}[{start}:{stop}]"


@pytest.fixture
def shrunk(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if FULL:
        return
    for name in ("load", "load_arrays"):
        original = getattr(again_tf.data, name)

        def capped(dataset, split, *args, _original=original, **kwargs):
            return _original(dataset, capped_split(split), *args, **kwargs)

        monkeypatch.setattr(again_tf.data, name, capped)
    original_fit = keras.Model.fit

    def one_epoch(self, *args, **kwargs):
        kwargs["epochs"] = min(kwargs.get("epochs", 1), 1)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", one_epoch)


def test_the_readme_has_code_to_check():
    assert len(python_blocks()) >= 2
    scripts = {shlex.split(c)[1] for c in shell_commands()}
    assert {"train.py", "evaluate.py", "tune.py"} <= scripts, scripts
    # No editing leftovers: half comments, placeholders, unbalanced code fences.
    for path in pages():
        text = readme(path)
        assert text.count("<!--") == text.count("-->") == 0, path
        assert text.count("```") % 2 == 0, path
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        headings = re.findall(r"^#+ .*$", prose, flags=re.M)
        assert len(headings) == len(set(headings)), f"a heading appears twice in {path}"
    # Every page under docs/ is reachable from the README.
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", readme()))
    unlinked = {os.path.relpath(p, ROOT) for p in pages()[1:]} - linked
    assert not unlinked, f"pages under docs/ that README.md does not link: {sorted(unlinked)}"


def test_python_blocks_run_in_order(shrunk):
    """All blocks, in README order, in one folder: a later block may use an earlier one's
    files (the SavedModel block serves the export of the training block)."""
    for index, code in enumerate(python_blocks()):
        exec(compile(code, f"README.md python block {index + 1}", "exec"),
             {"__name__": "readme"})


def _check_script_commands(by_script):
    """Parses each command's flags with its script's definitions and validates the config,
    in this process (no TensorFlow start-up of its own): {script: failures}. absl keeps one
    set of flags per process; `load_script` drops each script's flags before the next
    script defines its own, as `run_main` does."""
    from absl import flags

    results, cwd = {}, os.getcwd()
    os.chdir(ROOT)  # the commands name files relative to the project
    try:
        for script, commands in by_script.items():
            module = load_script(script)
            failures = results[script] = []
            for command in commands:
                argv = shlex.split(command, comments=True)[1:]
                if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
                    continue  # help is tested in tests/test_cli.py
                flags.FLAGS.unparse_flags()
                try:
                    if "parse_args" in module:  # an argparse script
                        module["parse_args"](argv[1:])
                        continue
                    flags.FLAGS(argv)
                    # train.py and the benchmarks name it check_flags, evaluate.py validate.
                    check = module.get("check_flags") or module.get("validate")
                    if check is not None:
                        check()
                except (Exception, SystemExit) as e:  # one line per failing command
                    failures.append(f"{' '.join(argv)} -> {type(e).__name__}: {e}")
    finally:
        os.chdir(cwd)
        flags.FLAGS.unparse_flags()
    return results


def commands_by_script():
    by_script = {}
    for command in shell_commands():
        by_script.setdefault(shlex.split(command)[1], []).append(command)
    return by_script


@pytest.fixture(scope="module")
def command_failures():
    scripts = {s: c for s, c in commands_by_script().items()
               if os.path.exists(os.path.join(ROOT, s))}
    return _check_script_commands(scripts)


@pytest.mark.parametrize("script", sorted(commands_by_script()))
def test_shell_commands_parse_and_validate(script, command_failures):
    assert os.path.exists(os.path.join(ROOT, script)), f"README runs {script}, which is missing"
    assert command_failures[script] == [], command_failures[script]
