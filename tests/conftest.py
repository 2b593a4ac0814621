"""Test-suite settings: point the data root at ../shared/data when it exists, never download."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tests must not reach the network; the real datasets come from ../shared/data when it is there.
os.environ.setdefault("SSAH_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if SHARED_DATA.is_dir():
    os.environ.setdefault("SSAH_DATA_ROOT", str(SHARED_DATA))


@pytest.fixture
def shared_data() -> Path:
    """The folder of real public datasets beside the project; skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real public datasets) is not beside this checkout")
    return SHARED_DATA
