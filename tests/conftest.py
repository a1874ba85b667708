# SPDX-License-Identifier: MIT
"""Shared test setup: a per-test seeded rng, hypothesis profiles and the ISA levels to run."""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest
from hypothesis import settings

# Test modules import the oracle as `from reference import adam_step`, whatever
# pytest's import mode or the directory pytest was started from.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# `ci` keeps the property tests to a few seconds and reproducible run to run;
# `dev` (HYPOTHESIS_PROFILE=dev) explores the space properly.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every level name the core may be built with, lowest first.
ALL_LEVELS = ("baseline", "avx2", "avx512", "neon")


def supported_levels() -> list[str]:
    """The ISA levels this build contains and this CPU can run."""
    import cpuadam

    return list(cpuadam.build_info()["isa_supported"])


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: different per test, the same every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
