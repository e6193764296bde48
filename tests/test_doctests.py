"""The Examples sections of the torch-free functions a user calls run as doctests: an
example that no longer matches what the function returns fails here (issue 41)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mediar_ray.windows",
    "mediar_ray.pipeline.stitch",
    "mediar_ray.pipeline.utilization",
    "mediar_ray.pipeline.report",
    "mediar_ray.tissue",
    "mediar_ray.cells.measure",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
