"""The README a new user follows: its install and test lines are the ones CI runs, every file it or the docs
link to is in the repository, and it points at no method spec that users do not have."""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = [README, *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))), os.path.join(REPO, "bench", "README.md"),
        os.path.join(REPO, "recipes", "data", "README.md")]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Backticked paths into these folders must exist too (output folders such as out/ are not among them).
TRACKED = ("recipes/", "bench/", "docs/", "tests/", "examples/", "lor2c_hf/", "accelerate_configs/", "ds_configs/", ".ci/")
CODE_PATH = re.compile(r"`((?:%s)[\w./-]+)`" % "|".join(re.escape(t) for t in TRACKED))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def commands(block_text: str) -> list[str]:
    """The shell commands of the ```bash blocks in `block_text`, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", block_text, re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def normalized(command: str) -> str:
    """`python -m pip install -q X` and `pip install X` are the same install line."""
    command = re.sub(r"^python -m ", "", command)
    return re.sub(r"\s-q(?=\s)", "", command)


def ci_commands() -> list[str]:
    lines = [line.strip() for line in read(os.path.join(REPO, ".ci", "run")).splitlines()]
    return [normalized(line) for line in lines if line.startswith(("python -m pip install", "python -m pytest"))
            and "--upgrade pip" not in line]


def test_readme_install_and_test_lines_are_the_ones_ci_runs():
    text = read(README)
    install, tests = commands(section(text, "Install")), commands(section(text, "Tests"))
    assert install[0] == "pip install torch==2.13.0", "the CPU torch line comes first"
    assert [normalized(c) for c in install + tests] == ci_commands()
    assert 'torch==2.13.0" > .venv-ci/constraints.txt' in read(os.path.join(REPO, ".ci", "run"))  # kept as a constraint
    assert "--index-url https://download.pytorch.org/whl/cpu" in section(text, "Install")
    assert "python recipes/quickstart.py" in commands(section(text, "Quickstart"))


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, REPO) for p in DOCS])
def test_every_linked_file_is_in_the_repository(path):
    text = read(path)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
        if not os.path.exists(file):
            missing.append(target)
    for target in CODE_PATH.findall(text):
        if not any(c in target for c in "<*{") and not os.path.exists(os.path.join(REPO, target.rstrip("."))):
            missing.append(target)
    assert not missing, f"{os.path.relpath(path, REPO)} points at files the repository does not contain: {missing}"
    assert "SPEC" not in text, "users' clones have no method spec: link docs/method.md instead"


def test_readme_is_short_and_in_the_order_users_need():
    text = read(README)
    assert len(text.splitlines()) <= 280
    order = ["What it is", "Install", "Quickstart", "Swap the Trainer", "Use it with any trainer",
             "Methods and parameter counts", "Recipes", "Results", "Limitations", "Tests"]
    headings = [h for h in re.findall(r"^## (.+)$", text, re.M)]
    positions = [next(i for i, h in enumerate(headings) if h.startswith(name)) for name in order]
    assert positions == sorted(positions), headings
    for stale in ("now defaults", "the old default", "as before", "this release", "prepared but not yet run"):
        assert stale not in text
