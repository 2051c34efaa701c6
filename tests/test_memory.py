import sys

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _private import release_free_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS accounting of freed pages is Linux-specific")
def test_release_free_memory_returns_arrow_pages():
    """Arrow's pool keeps freed buffers resident; loader workers forked afterwards would inherit them."""
    rss = lambda: psutil.Process().memory_info().rss
    base = rss()
    arrays = [pc.multiply(pa.array(np.arange(i, i + 200_000, dtype=np.float64)), 2.0) for i in range(300)]
    allocated = rss() - base
    assert allocated > 300 * 2**20  # 300 arrays of 1.6 MB (and their inputs)
    del arrays
    before = rss()
    release_free_memory()
    assert before - rss() > 0.5 * allocated
