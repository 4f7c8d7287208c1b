"""The commands README.md and WORKSPACE.md quote stay runnable: every ``python -m MODULE`` answers
``--helpfull``, and every flag a quoted command passes is one that module defines (``--config.KEY``: a
config key). The README's test command is the one CI runs (.ci/run reads it from the README)."""

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

DOCS = ("README.md", "WORKSPACE.md")
COMMAND = re.compile(r"python -m ([\w.]+)((?:[ \t]+(?:[^\s`|#]+))*)")


def quoted_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, flags) of every `python -m` command in the docs (flags as written, without values)."""
    found = []
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as handle:
            text = handle.read()
        for match in COMMAND.finditer(text):
            module, rest = match.group(1), match.group(2)
            names = [arg.split("=", 1)[0] for arg in rest.split() if arg.startswith("--")]
            found.append((doc, module, names))
    return found


def help_text(module: str) -> tuple[int, str]:
    """The exit status and output of ``python -m MODULE --helpfull``."""
    proc = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc.returncode, proc.stdout + proc.stderr


def test_the_docs_quote_commands():
    modules = {module for _, module, _ in quoted_commands()}
    assert {"lgmrec_jax.train", "pytest", "lgmrec_jax.crosscheck", "lgmrec_jax.export", "experiments.grid"} <= modules


def test_every_quoted_command_runs_with_the_flags_it_shows():
    from lgmrec_jax.configs import default

    commands = [c for c in quoted_commands() if c[1] != "pytest"]
    modules = sorted({module for _, module, _ in commands})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        helps = dict(zip(modules, pool.map(help_text, modules)))
    config_keys = set(default.get_config().keys())
    problems = []
    for module, (code, text) in helps.items():
        if code not in (0, 1) or "Traceback" in text or not text.strip():  # absl exits 1 after --helpfull
            problems.append(f"python -m {module} --helpfull exits {code}: {text.strip().splitlines()[-1:]}")
    for doc, module, names in commands:
        code, text = helps[module]
        for name in names:
            if name.startswith("--config."):
                if name[len("--config."):] not in config_keys:
                    problems.append(f"{doc}: python -m {module}: {name} is no config key")
            elif not re.search(rf"--(\[no\])?{re.escape(name[2:])}\b", text):
                problems.append(f"{doc}: python -m {module}: {name} is not one of its flags")
    assert problems == []


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, "README.md")) as handle:
        blocks = re.findall(r"```bash\n(.*?)```", handle.read(), re.S)
    assert blocks[1].strip() == "pip install -e '.[test]' && python -m pytest -q"
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        ci = handle.read()
    assert "block==2" in ci and 'eval "$test_command"' in ci


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_stay_short_and_speak_of_the_project(doc):
    with open(os.path.join(REPO, doc)) as handle:
        text = handle.read()
    limit = {"README.md": 120 * 110, "WORKSPACE.md": 10_500}[doc]
    assert len(text) <= limit
    if doc == "README.md":
        assert len(text.splitlines()) <= 125
    assert not re.search(r"\bsessions?\b", text, re.I)
