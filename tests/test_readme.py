"""The README's commands are the ones CI runs, and the packaging metadata they build."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_bash_block(readme: str, heading: str) -> str:
    section = readme.split(f"\n## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_setup_and_test_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for heading in ("Setup", "Test"):
        assert first_bash_block(readme, heading) in ci, heading


def test_license_is_an_spdx_string_and_setup_installs_a_setuptools_that_reads_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]  # PEP 639 strings: setuptools 77
    assert '"setuptools>=77"' in first_bash_block((ROOT / "README.md").read_text(), "Setup")


def test_the_trimap_picture_is_committed_small_and_shown():
    picture = ROOT / "docs" / "trimap.png"
    assert 0 < picture.stat().st_size < 100_000
    assert "](docs/trimap.png)" in (ROOT / "README.md").read_text()
