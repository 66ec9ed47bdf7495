"""Fixtures shared by the tests; the accuracy rule lives in accuracy.py."""
import os
import zlib

import numpy as np
import pytest

from attnkit import _runtime

# Every path this CPU supports; or, when ATTNKIT_CPU forced one at import (a
# run that tests the whole suite on that path, as tools/test_wheel.sh does
# after a run that swept them all), that one alone.
SIMD_PATHS = ([_runtime.simd_path()] if os.environ.get("ATTNKIT_CPU")
              else _runtime.supported_simd_paths())


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Run the test once on every SIMD path this CPU supports (or on the one
    ATTNKIT_CPU asked for)."""
    with _runtime.use_simd_path(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so that a failure reproduces."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
