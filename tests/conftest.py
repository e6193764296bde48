"""Shared pytest fixtures: paths to the real data and the MEDIAR reference outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures" / "mediar_reference"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"real data expected at {DATA} (clone beside ../shared)"
    return DATA


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    assert FIXTURES.is_dir(), f"MEDIAR reference fixtures expected at {FIXTURES}"
    return FIXTURES
