"""Wall time of ``import schce`` and ``schce --help``, each in fresh interpreters (median of ``--repeat`` runs).

Also reports whether torch was loaded, which it must not be: the light entry points defer every heavy library.

Run: ``.venv/bin/python benchmarks/import_time.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "import schce": "import schce",
    "import schce.hierarchy": "import schce.hierarchy",
    "schce --help": "import sys\nfrom schce.cli import main\nsys.argv = ['schce', '--help']\ntry:\n    main()\n"
    "except SystemExit:\n    pass",
    "schce.HCEClassifier (for comparison)": "import schce\nschce.HCEClassifier",
}


def _time(code: str) -> tuple[float, bool]:
    probe = f"{code}\nimport sys\nprint('TORCH', 'torch' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, "TORCH True" in out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh interpreters per case (the median is shown)")
    args = parser.parse_args()
    for name, code in CASES.items():
        runs = [_time(code) for _ in range(args.repeat)]
        median = statistics.median(t for t, _ in runs)
        print(f"{name:40s} {median:6.2f} s (median of {args.repeat}); torch loaded: {runs[0][1]}")


if __name__ == "__main__":
    main()
