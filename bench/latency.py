"""The latency benchmark as a script: the same entry point as `specserve bench latency` (see bench/README.md).

python bench/latency.py --help
"""

import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specserve.bench.latency import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
