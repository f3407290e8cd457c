"""Under `make test-asan` the kernels must be the instrumented build, or the run proves
nothing: this checks which _C was imported (a no-op in the ordinary test run)."""
import os

import pytest

import tensorslim as ts


def test_the_sanitized_core_is_the_one_imported():
    if "SKBUILD_EDITABLE_SKIP" not in os.environ:
        pytest.skip("not a sanitizer run: any _C is the right one")
    assert "build-asan" in os.path.realpath(ts._C.__file__)
    # ASan's runtime is in the process (preloaded): its interface symbol resolves.
    import ctypes
    assert hasattr(ctypes.CDLL(None), "__asan_init")
