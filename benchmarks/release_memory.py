"""How much freed Arrow / heap memory :func:`schce._memory.release_free_memory` hands back to the OS (Linux RSS).

Loader workers are forked after it runs, so every page it returns is a page no worker inherits. Prints one line:
the resident memory 300 freed Arrow arrays left behind, how much of it the call returned, and the threshold (half).
"""

from __future__ import annotations

import sys

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from schce._memory import release_free_memory

THRESHOLD = 0.5  # share of the freed arrays' resident memory that must go back to the OS


def main() -> None:
    if not sys.platform.startswith("linux"):
        print("skipped: RSS accounting of freed pages is Linux-specific")
        return
    rss = lambda: psutil.Process().memory_info().rss
    base = rss()
    arrays = [pc.multiply(pa.array(np.arange(i, i + 200_000, dtype=np.float64)), 2.0) for i in range(300)]
    allocated = rss() - base
    del arrays
    before = rss()
    release_free_memory()
    returned = before - rss()
    share = returned / allocated if allocated > 0 else float("nan")
    verdict = "ok" if share > THRESHOLD else "BELOW THRESHOLD"
    print(
        f"release_free_memory: {allocated / 2**20:.0f} MiB resident for 300 Arrow arrays, {returned / 2**20:.0f} MiB "
        f"returned after del ({share:.2f}; threshold {THRESHOLD}) {verdict}"
    )


if __name__ == "__main__":
    main()
