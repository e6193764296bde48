"""The documentation site builds with no warning, its CLI and API pages generated from the
code (issue 41): a broken link, a renamed function or a removed option fails here."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mkdocs_build_strict_generates_cli_and_api_pages(tmp_path):
    from mediar_ray.cli import build_parser
    from mediar_ray.pipeline import report

    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr
    cli = (site / "reference/cli/index.html").read_text()
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert f"mediar-ray {name}" in cli
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in cli, (name, flag)
    api = (site / "reference/api/index.html").read_text()
    for name in ["run_slides", *report.__all__, "tissue_mask", "image_starts", "owned_windows"]:
        assert name in api, name
    assert "cpu_small" in (site / "model-card/index.html").read_text()
    assert "Archive engine" in (site / "benchmarks/index.html").read_text()
    assert not (site / "hooks").exists()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_readme_is_short_undated_and_its_links_resolve():
    """Issue 41, must show 1: under 200 lines, no dated timing, and every link into the
    repository (the bench and model-card sections its figures come from) exists."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert not re.search(r"20\d\d-\d\d-\d\d|\bUTC\b", text)
    links = re.findall(r"\]\(([^)#]+)(?:#([^)]+))?\)", text)
    local = [(p, a) for p, a in links if not p.startswith(("http://", "https://"))]
    assert any(p == "bench/README.md" and a for p, a in local)
    assert any(p.endswith("MODEL_CARD.md") and a for p, a in local)
    for path, anchor in local:
        assert (REPO / path).exists(), path
        if anchor:
            assert anchor in anchors(REPO / path), (path, anchor)


def test_every_check_names_a_test_that_exists():
    """Must show 5: each row of the table of checks names a test function (or file) that
    exists, so a renamed or removed test fails here."""
    text = (REPO / "docs/checks.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| what")]
    assert len(rows) > 20
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", row)
        assert named, row
        for file, function in named:
            source = (REPO / "tests" / file).read_text()
            assert not function or f"def {function}(" in source, (file, function)
