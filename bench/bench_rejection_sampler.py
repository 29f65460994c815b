"""The kernel benchmark as a script: the same entry point as `specserve bench kernel` (see bench/README.md).

Times the rejection sampler, Triton kernel vs PyTorch reference, on a GPU; without one it says so and exits 0.

    python bench/bench_rejection_sampler.py                       # the default grid on the GPU, or a skip
    python bench/bench_rejection_sampler.py --batch 64 --k 8 --vocab 128256 --greedy 0.5
    python bench/bench_rejection_sampler.py --device cpu --quick  # the PyTorch reference alone, on the CPU
"""

import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specserve.bench.kernel import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
