"""The README's install story: two commands, the first ending in plain `kleinserve serve`; a documented
CPU-only torch install that the project's torch requirement then accepts (so `pip install -e .` pulls
no CUDA build on top of it)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _torch_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torch")


def test_the_two_commands():
    section = README.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert [b.strip() for b in blocks] == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && kleinserve serve",
        "bash .ci/run",
    ]


def test_cpu_install_is_documented_and_accepted():
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README
    assert "## GPU or CPU" in README
    spec = _torch_requirement().specifier
    # The CPU wheels carry a local version ("2.13.0+cpu"); the range must admit them, and the CUDA
    # builds ("+cu128"), so whichever is installed first is kept.
    for v in ("2.13.0+cpu", "2.13.0+cu128", "2.9.0+cpu"):
        assert spec.contains(Version(v), prereleases=False), (v, str(spec))
    assert spec.contains(Version(torch.__version__.split("+")[0]))
