"""The documentation site builds with no warning, its CLI and API pages generated from the
code (issue 41): a broken link, a renamed function or a removed option fails here."""

from __future__ import annotations

import argparse
import os
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
