"""Build the CPU kernels (cpu_linear.c, cpu_packed.c, cpu_amx.c, cpu_norm.c, cpu_attention.c, cpu_pointwise.c,
cpu_decoder.c) with the system's C compiler at first use, and load them.

One shared library from every source, compiled once per source, compiler and CPU into ~/.cache/specserve/kernels
(SPECSERVE_KERNEL_CACHE moves it: not $SPECSERVE_CACHE, which a container may mount read-only with the converted
models) with `cc -O3 -march=native -fopenmp`, and loaded with ctypes. Where there is no compiler, the build fails,
or SPECSERVE_CPU_LINEAR=0, `library()` is None and every caller keeps torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / f"cpu_{name}.c" for name in ("linear", "packed", "amx", "norm", "attention", "pointwise", "decoder")]
HEADERS = [HERE / "cpu_simd.h"]
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared"]


def cache_dir() -> Path:
    """Where built kernels are kept: $SPECSERVE_KERNEL_CACHE, else ~/.cache/specserve/kernels."""
    explicit = os.environ.get("SPECSERVE_KERNEL_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "specserve" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str) -> Path:
    """Compile the library unless a build for these sources, compiler and CPU is cached; return its path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [p.read_text() for p in [*SOURCES, *HEADERS]]
    key = hashlib.sha256("\0".join([*texts, cc, version, " ".join(FLAGS), _cpu_signature()]).encode())
    target = cache_dir() / f"specserve_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # another process may build it at the same time
        built = Path(tmp) / target.name
        result = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-lm", "-o", str(built)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None where they cannot be had (logged once)."""
    if os.environ.get("SPECSERVE_CPU_LINEAR", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the CPU kernels are off (torch's kernels instead)")
        return None
    try:
        return ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("the CPU kernels could not be built (torch's kernels instead): %s", exc)
        return None


def functions(signatures: dict[str, tuple]) -> ctypes.CDLL | None:
    """The library with these functions' ctypes signatures set ({name: (restype, [argtypes])}), or None."""
    lib = library()
    if lib is None:
        return None
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def serves(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels take these tensors: fp32, on the CPU, no gradient wanted (training keeps torch's
    differentiable ops). Callers add whether their functions are built."""
    grad = torch.is_grad_enabled()
    for t in tensors:  # (a loop, not all() over a generator: this runs ~150 times a decode step)
        if t.dtype != torch.float32 or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True
