"""SmolLM2-135M's linear layers (30 x qkv, o, gate_up, down, then the 49,152-row output layer; random weights of
bf16 numbers, packed in forward order on 2 MB pages as the engine packs them, so every call streams from DRAM as
in a forward) over 1-64 rows: the AMX kernel (cpu_amx.c) against the outer-product kernel (cpu_packed.c),
interleaved in one process.

    .venv/bin/python bench/figures/2026-12-03-amx/linear_ab.py [OUT.json]
"""

import json
import statistics
import sys
import time

import torch

from specserve.kernels import cpu_linear, hugepages

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
ROWS = [1, 2, 4, 5, 6, 8, 10, 16, 64]


def main() -> None:
    if not cpu_linear.set_amx(True):
        sys.exit("this CPU (or its kernel, or compiler) has no AMX")
    torch.manual_seed(0)
    weights = [(torch.randn(n, k) * 0.05).bfloat16().float() for n, k in SHAPES]
    packed = {}
    for amx in (True, False):
        cpu_linear.set_amx(amx)
        packed[amx] = hugepages.pack([cpu_linear.pack_bf16(w) for w in weights])  # on 2 MB pages, as served
    inputs = {m: [torch.randn(m, k) for _, k in SHAPES] for m in ROWS}

    def layers(amx: bool, m: int) -> float:
        cpu_linear.set_amx(amx)
        t = time.perf_counter()
        for w, p, x in zip(weights, packed[amx], inputs[m]):
            cpu_linear.linear_f32(x, w, None, p)
        return time.perf_counter() - t

    times = {(amx, m): [] for amx in (True, False) for m in ROWS}
    for _ in range(2):  # warm-up
        for m in ROWS:
            layers(True, m), layers(False, m)
    for r in range(12):
        for m in ROWS:
            for amx in ((True, False) if r % 2 == 0 else (False, True)):
                times[(amx, m)].append(layers(amx, m))
    cpu_linear.set_amx(True)
    result = {"rows": ROWS, "threads": torch.get_num_threads()}
    for amx, name in ((True, "amx_ms"), (False, "outer_product_ms")):
        result[name] = [round(1e3 * statistics.median(times[(amx, m)]), 2) for m in ROWS]
    print("rows:          ", " ".join(f"{m:6d}" for m in ROWS))
    print("AMX (ms):      ", " ".join(f"{v:6.2f}" for v in result["amx_ms"]))
    print("outer-product: ", " ".join(f"{v:6.2f}" for v in result["outer_product_ms"]))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
