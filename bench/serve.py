"""The serving benchmark as a script: the same entry point as `specserve bench serve` (see bench/README.md).

python bench/serve.py --help
"""

import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specserve.bench.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
