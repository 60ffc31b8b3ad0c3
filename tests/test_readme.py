"""The README's commands are the ones CI runs, and the packaging metadata they build."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def first_bash_block(readme: str, heading: str) -> str:
    section = readme.split(f"\n## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_setup_and_test_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for heading in ("Setup", "Test"):
        block = first_bash_block(readme, heading).splitlines()
        runs = [ci[i : i + len(block)] for i in range(len(ci) - len(block) + 1)]
        assert block in runs, f"README's {heading} commands are not lines of .ci/run: {block}"


def test_license_is_an_spdx_string_and_setup_installs_a_setuptools_that_reads_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package supports 3.10
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # PEP 639 strings: setuptools 77
    assert '"setuptools>=77"' in first_bash_block((ROOT / "README.md").read_text(), "Setup")


def test_the_trimap_picture_is_committed_small_and_shown():
    picture = ROOT / "docs" / "trimap.png"
    assert 0 < picture.stat().st_size < 100_000
    assert "](docs/trimap.png)" in (ROOT / "README.md").read_text()
