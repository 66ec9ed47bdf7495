"""Fixtures shared by the tests; the accuracy rule lives in accuracy.py."""
import zlib

import numpy as np
import pytest

from attnkit import _runtime

SIMD_PATHS = _runtime.supported_simd_paths()


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Run the test once on every SIMD path this CPU supports."""
    with _runtime.use_simd_path(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so that a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
