"""Latency benchmark: batch-1 generation on Spec-Bench, every system on every prompt, interleaved.

Systems: `ours-plain` (our engine, no draft), `ours-spec-k{K}` (fixed k), `ours-spec-adaptive`,
`hf-plain` (HF `generate`) and `hf-assisted` (HF assisted generation with the same draft). Every
system loads its models once; for each prompt and temperature all of them run back to back, in an
order that rotates from prompt to prompt, so drift hits them alike. Per run it records output
tokens, wall seconds, the time to the first output token (TTFT: mostly prefill, the same work with or
without speculation) and, for our speculative systems, the (k, accepted) of every engine step.

The report: tokens/s end to end and decode tokens/s (the tokens after each run's first over the
time after it: what speculation changes, while prefill stays the same) per system and category, both
as speedups over ours-plain and hf-plain, acceptance (mean acceptance length, per-position rates) by
category, the measured draft/verifier cost ratio c, the speedup Leviathan et al.'s formula predicts
from the measured acceptance rate alpha and c, and how often greedy outputs differ between systems.
It prints ratios; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specserve.bench.options import (
    LATENCY_PRESETS,
    add_latency_args,
    resolve_draft,
    resolve_gguf,
    resolve_presets,
    resolve_verifier,
)
from specserve.bench.report import environment, plot_grouped_bars, plot_lines, table, write_json
from specserve.config import SpeculativeConfig
from specserve.evaluation.acceptance import acceptance_summary, ratio, spec_counts
from specserve.evaluation.prompts import BenchPrompt, load_prompts
from specserve.evaluation.systems import (
    HFSystem,
    LlamaCppSystem,
    OursSystem,
    Run,
    kv_blocks_for,
    llama_cpp_available,
    synchronize,
)

SPEC_PREFIX = "ours-spec-"
ADAPTIVE = "ours-spec-adaptive"  # the draft model only
NGRAM = "ours-ngram-adaptive"  # prompt lookup only, no draft model
HYBRID = "ours-hybrid-adaptive"  # n-gram when the context tail recurs, else the draft model
LLAMA_CPP = "llamacpp-plain"  # llama.cpp on the verifier's GGUF (optional package llama-cpp-python)
METHODS = {NGRAM: "ngram", HYBRID: "hybrid"}
ADAPTIVE_MAX_K = SpeculativeConfig().max_speculative_tokens  # the adaptive system runs with the default bound
WARMUP_TOKENS = 16
COST_WARMUP = 3


# ---- systems --------------------------------------------------------------------------------


def system_names(k_list: list[int], systems: list[str] | None, no_hf: bool, quick: bool = False) -> list[str]:
    adaptive = [HYBRID] if quick else [ADAPTIVE, NGRAM, HYBRID]
    default = ["ours-plain"] + [f"{SPEC_PREFIX}k{k}" for k in k_list] + adaptive + ["hf-plain", "hf-assisted"]
    if llama_cpp_available():  # optional: llama.cpp on the same GGUF, when llama-cpp-python is installed
        default.append(LLAMA_CPP)
    names = systems or default
    pattern = re.compile(
        r"ours-plain|ours-spec-k\d+|ours-spec-adaptive|ours-ngram-adaptive|ours-hybrid-adaptive"
        r"|hf-plain|hf-assisted|llamacpp-plain"
    )
    bad = [n for n in names if not pattern.fullmatch(n)]
    if bad:
        raise ValueError(
            f"unknown systems {bad}; choose from ours-plain, ours-spec-k<K> (e.g. ours-spec-k4), "
            "ours-spec-adaptive, ours-ngram-adaptive, ours-hybrid-adaptive, hf-plain, hf-assisted, llamacpp-plain"
        )
    if LLAMA_CPP in names and not llama_cpp_available():
        raise ValueError("llamacpp-plain needs the llama-cpp-python package: pip install llama-cpp-python")
    if no_hf:
        names = [n for n in names if not n.startswith("hf-")]
    if not names:
        raise ValueError("no system left to run (--no-hf removed every system given to --systems)")
    return list(dict.fromkeys(names))


def fixed_k(name: str) -> int | None:
    """K of an ours-spec-k{K} system; None for the others."""
    m = re.fullmatch(r"ours-spec-k(\d+)", name)
    return int(m.group(1)) if m else None


def is_spec(name: str) -> bool:
    return name.startswith(SPEC_PREFIX) or name in METHODS


def build_systems(names: list[str], verifier: str, draft: str, args, max_seq_len: int, eos: list[int], pad: int):
    systems = {}
    for name in names:
        print(f"loading {name}", file=sys.stderr, flush=True)
        if name == "ours-plain":
            systems[name] = OursSystem(
                name, verifier, None, None, args.dtype, args.device, max_seq_len, upcast_matmuls=args.upcast_matmuls
            )
        elif is_spec(name):
            method = METHODS.get(name, "draft")
            systems[name] = OursSystem(
                name,
                verifier,
                None if method == "ngram" else draft,
                fixed_k(name),
                args.dtype,
                args.device,
                max_seq_len,
                method=method,
                upcast_matmuls=args.upcast_matmuls,
            )
        elif name == LLAMA_CPP:
            threads = torch.get_num_threads()  # the threads our engine and HF use
            systems[name] = LlamaCppSystem(name, resolve_gguf(args, verifier), max_seq_len, eos, threads)
        else:
            hf_draft = hf_assistant(verifier, draft) if name == "hf-assisted" else None
            systems[name] = HFSystem(name, verifier, hf_draft, args.dtype, args.device, eos, pad)
    return systems


def hf_assistant(verifier: str, draft: str) -> str:
    """The draft HF assisted generation runs: ours, unless it is an EAGLE head (HF cannot run one; then
    the standalone 4-layer stand-in, and the JSON says so)."""
    from specserve.model.default_models import layer_slice_draft
    from specserve.model.eagle import is_eagle_checkpoint

    if not is_eagle_checkpoint(draft):
        return draft
    try:
        stand_in = layer_slice_draft(verifier)
    except ValueError:  # a verifier of <= 4 layers (the tests' tiny one)
        stand_in = layer_slice_draft(verifier, 1)
    print(f"hf-assisted: HF cannot run the EAGLE head {draft}; it assists with {stand_in} instead", file=sys.stderr)
    return stand_in


# ---- the draft / verifier cost ratio ------------------------------------------------------------


def measure_cost_ratio(engine, context_ids: list[int], max_k: int, device: str, reps: int) -> dict:
    """c = time of one single-token draft forward / one single-token verifier forward, at the same context;
    c_warm the same for a draft forward right after another (the engine's draft steps after a step's first).

    Each model runs on its own fresh ModelRunner (a small private KV pool, so the engine's state is not
    touched): prefill `context_ids`, then time forwards at the next position, round-robin so drift hits
    all alike: the draft with 1 token, the verifier with 1 .. max_k + 1 tokens (what verifying k drafts
    costs; Leviathan's formula takes it as free). Medians over `reps` after COST_WARMUP. Forward
    passes only: the engine's sampling around them is not included.
    """
    import torch

    from specserve.engine.drafts import num_params
    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.engine.proposer import draft_forward
    from specserve.model.eagle import EagleHead

    block_size = 16
    n = len(context_ids)
    sizes = list(range(1, max_k + 2))
    blocks = list(range(kv_blocks_for(n + max_k + 1, block_size)))
    verifier = ModelRunner(engine.runner.model, len(blocks), block_size)
    draft = ModelRunner(engine.proposer.runner.model, len(blocks), block_size)
    eagle = isinstance(engine.proposer.runner.model, EagleHead)

    def features(runner, m: int, own: bool = False):  # an EAGLE head reads features (zeros cost the same as real
        # ones): the verifier's as wide as it reads them (fused), or after a draft step its own, hidden wide
        if not (eagle and runner is draft):
            return None
        return torch.zeros(m, runner.model.arch.hidden_size if own else runner.model.feature_width)

    for runner in (verifier, draft):
        runner.forward([TokenRun(list(context_ids), 0, blocks, 1)], features(runner, n))
    probe = (context_ids * (max_k + 2))[: max_k + 1]  # any tokens: the cost does not depend on which
    def forward(runner, run, m: int, own: bool = False) -> None:  # as the engine runs each: a trimmed head over
        if runner is draft:  # its own vocabulary
            draft_forward(runner, run, features(runner, m, own))
        else:
            runner.forward(run, features(runner, m))

    # the draft twice in a row, after a verifier forward: cold (its weights evicted by the verifier's, as for
    # the first draft step of a speculation step) and warm (the steps after it); the verifier's counts in turn
    drafts = [("draft", draft, 1), ("draft_warm", draft, 1)]
    checks = [(f"verifier_{m}", verifier, m) for m in sizes]
    times: dict[str, list[float]] = {name: [] for name, _, _ in drafts + checks}
    for i in range(COST_WARMUP + reps):
        for name, runner, m in drafts + (checks if i % 2 == 0 else checks[::-1]):
            run = [TokenRun(probe[:m], n, blocks, m)]
            synchronize(device)
            t0 = time.perf_counter()
            forward(runner, run, m, own=name == "draft_warm")  # a later draft step reads the head's own features
            synchronize(device)
            if i >= COST_WARMUP:
                times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "c": median["draft"] / median["verifier_1"],
        "c_warm": median["draft_warm"] / median["verifier_1"],
        "draft_forward_ms": 1e3 * median["draft"],
        "draft_forward_warm_ms": 1e3 * median["draft_warm"],
        "verifier_forward_ms": 1e3 * median["verifier_1"],
        "verify_cost": [median[f"verifier_{m}"] / median["verifier_1"] for m in sizes],
        "context_tokens": n,
        "reps": reps,
        "param_ratio": num_params(draft.model) / num_params(verifier.model),
    }


# ---- summary ------------------------------------------------------------------------------------


def throughput_of(records: list[dict]) -> dict:
    """End to end (prefill included) and decode only: the tokens after each run's first over the time after it."""
    tokens = sum(r["output_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    ttft = sum(r["ttft_s"] for r in records)
    decode_tokens = sum(max(r["output_tokens"] - 1, 0) for r in records)
    decode_seconds = seconds - ttft
    return {
        "runs": len(records),
        "output_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "mean_latency_s": seconds / len(records) if records else None,
        "ttft_s": ttft / len(records) if records else None,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_tokens and decode_seconds > 0 else None,
    }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def mismatches(outputs: dict, names: list[str], temperature: float, prompts: list[BenchPrompt]) -> dict:
    """Greedy only: how often two systems' outputs differ (bf16 rounding may cause it; fp32 should not)."""
    pairs = [(n, "ours-plain") for n in names if is_spec(n)] + [("ours-plain", "hf-plain"), ("hf-assisted", "hf-plain")]
    pairs.append((LLAMA_CPP, "ours-plain"))
    result = {}
    for a, b in pairs:
        if a not in names or b not in names:
            continue
        differing = []
        for p in prompts:
            x, y = outputs[(a, temperature, p.question_id)], outputs[(b, temperature, p.question_id)]
            i = first_divergence(x, y)
            if i is not None:
                differing.append({"question_id": p.question_id, "category": p.category, "first_divergence": i})
        result[f"{a} vs {b}"] = {"differ": len(differing), "compared": len(prompts), "prompts": differing}
    return result


def summarize(
    records: list[dict],
    names: list[str],
    temperature: float,
    categories: list[str],
    cost: dict | None,
    outputs: dict,
    prompts: list[BenchPrompt],
) -> dict:
    recs = [r for r in records if r["temperature"] == temperature]
    systems = {}
    for name in names:
        mine = [r for r in recs if r["system"] == name]
        systems[name] = throughput_of(mine)
        systems[name]["by_category"] = {
            cat: throughput_of([r for r in mine if r["category"] == cat]) for cat in categories
        }
    for name in names:
        for base, prefix in (("ours-plain", "speedup_vs_ours_plain"), ("hf-plain", "speedup_vs_hf_plain")):
            ref = systems.get(base)
            for rate, key in (("tokens_per_s", prefix), ("decode_tokens_per_s", f"decode_{prefix}")):
                systems[name][key] = ratio(systems[name][rate], ref[rate]) if ref else None
                for cat in categories:
                    ref_cat = ref["by_category"][cat][rate] if ref else None
                    block = systems[name]["by_category"][cat]
                    block[key] = ratio(block[rate], ref_cat)
    speculation = {}
    for name in names:
        if not is_spec(name):
            continue
        mine = [r for r in recs if r["system"] == name]
        s = acceptance_summary(mine, cost)
        s["k"] = fixed_k(name)
        s["achieved_speedup"] = systems[name]["speedup_vs_ours_plain"]
        s["achieved_over_predicted"] = ratio(s["achieved_speedup"], s["predicted_speedup"])
        s["achieved_decode_speedup"] = systems[name]["decode_speedup_vs_ours_plain"]
        s["achieved_decode_over_predicted"] = ratio(s["achieved_decode_speedup"], s["predicted_speedup"])
        s["by_category"] = {}
        for cat in categories:
            sc = acceptance_summary([r for r in mine if r["category"] == cat], cost)
            sc["achieved_speedup"] = systems[name]["by_category"][cat]["speedup_vs_ours_plain"]
            sc["achieved_over_predicted"] = ratio(sc["achieved_speedup"], sc["predicted_speedup"])
            sc["achieved_decode_speedup"] = systems[name]["by_category"][cat]["decode_speedup_vs_ours_plain"]
            sc["achieved_decode_over_predicted"] = ratio(sc["achieved_decode_speedup"], sc["predicted_speedup"])
            s["by_category"][cat] = sc
        speculation[name] = s
    out = {"temperature": temperature, "systems": systems, "speculation": speculation}
    if temperature == 0:
        out["greedy_mismatches"] = mismatches(outputs, names, temperature, prompts)
    return out


# ---- printing -----------------------------------------------------------------------------------


def print_summary(s: dict, categories: list[str], dtype: str) -> None:
    t = s["temperature"]
    print(f"\n=== temperature {t:g}{' (greedy)' if t == 0 else ''} ===")
    rows = []
    for name, v in s["systems"].items():
        sp = s["speculation"].get(name, {})
        rows.append(
            [
                name,
                v["output_tokens"],
                v["seconds"],
                v["tokens_per_s"],
                v["speedup_vs_ours_plain"],
                v["speedup_vs_hf_plain"],
                v["decode_tokens_per_s"],
                v["decode_speedup_vs_ours_plain"],
                sp.get("mean_k"),
                sp.get("mean_acceptance_length"),
                sp.get("alpha"),
                sp.get("predicted_speedup"),
                sp.get("achieved_over_predicted"),
                sp.get("predicted_speedup_verify_cost"),
            ]
        )
    print(
        table(
            [
                "system",
                "tokens",
                "seconds",
                "tok/s",
                "x ours-plain",
                "x hf-plain",
                "decode tok/s",
                "decode x ours-plain",
                "mean k",
                "MAL",
                "alpha",
                "predicted",
                "achieved/pred",
                "pred+verify",
            ],
            rows,
        )
    )
    for rate, title in (
        ("tokens_per_s", "tokens/s by category"),
        ("decode_tokens_per_s", "decode tokens/s by category"),
    ):
        print(f"\n{title}")
        print(
            table(
                ["system"] + categories,
                [[n] + [v["by_category"][c][rate] for c in categories] for n, v in s["systems"].items()],
            )
        )
    if s["speculation"]:
        print("\nmean acceptance length (tokens per verification step) by category")
        print(
            table(
                ["system"] + categories,
                [
                    [n] + [v["by_category"][c]["mean_acceptance_length"] for c in categories]
                    for n, v in s["speculation"].items()
                ],
            )
        )
        print("\nper-position acceptance: accepted / drafted at draft position 1, 2, ...")
        width = max(len(v["per_position_acceptance"]) for v in s["speculation"].values())
        print(
            table(
                ["system"] + [str(j + 1) for j in range(width)],
                [
                    [n] + v["per_position_acceptance"] + [None] * (width - len(v["per_position_acceptance"]))
                    for n, v in s["speculation"].items()
                ],
            )
        )
    for pair, m in s.get("greedy_mismatches", {}).items():
        note = ""
        if m["differ"] and dtype == "float32" and pair.startswith(SPEC_PREFIX):
            note = "  <- unexpected in float32: speculation should reproduce plain greedy output exactly"
        print(f"greedy outputs differing, {pair}: {m['differ']}/{m['compared']}{note}")


def acceptance_panels(summary: list[dict], categories: list[str]) -> list[tuple[str, dict]]:
    """One panel per temperature and speculative system that drafted: acceptance at each draft position, one line
    per category that drafted there and one for all prompts together."""
    panels = []
    for s in summary:
        for name, sp in s["speculation"].items():
            if not sp["drafted_tokens"]:
                continue
            series = {}
            for label, values in [(c, sp["by_category"][c]["per_position_acceptance"]) for c in categories] + [
                ("all", sp["per_position_acceptance"])
            ]:
                points = [(j + 1, v) for j, v in enumerate(values) if v is not None]
                if points:
                    series[label] = ([x for x, _ in points], [y for _, y in points], "k-" if label == "all" else ":")
            panels.append((f"{name}, temperature {s['temperature']:g}", series))
    return panels


# ---- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import transformers
    from transformers import AutoTokenizer

    from specserve.engine.engine import eos_token_ids

    transformers.logging.set_verbosity_error()
    resolve_presets(args, LATENCY_PRESETS)
    names = system_names(args.k, args.systems, args.no_hf, args.quick)
    bad_t = [t for t in args.temperature if t < 0]
    if bad_t:
        raise ValueError(f"temperatures must be >= 0, got {bad_t}")
    verifier = resolve_verifier(args)
    if LLAMA_CPP in names and args.systems is None and args.verifier and not args.gguf:
        names.remove(LLAMA_CPP)  # in the default set only for the default verifier, whose GGUF we know
        print(f"{LLAMA_CPP} skipped: pass --gguf FILE to time llama.cpp on this verifier", file=sys.stderr)
    draft = resolve_draft(args, verifier) if any(is_spec(n) or n == "hf-assisted" for n in names) else None
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = load_prompts(tokenizer, args.prompts_per_category, args.categories, args.prompts_file)
    max_k = max([fixed_k(n) or 0 for n in names] + [ADAPTIVE_MAX_K if ADAPTIVE in names else 0])
    max_seq_len = max(len(p.token_ids) for p in prompts) + args.max_tokens + max_k + 1
    eos = sorted(eos_token_ids(verifier, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    systems = build_systems(names, verifier, draft, args, max_seq_len, eos, pad)

    print("warm-up", file=sys.stderr, flush=True)
    for system in systems.values():
        for t in args.temperature:
            system.run(prompts[0].token_ids, t, min(WARMUP_TOKENS, args.max_tokens), args.seed)
    spec_engines = [s.engine for n, s in systems.items() if is_spec(n) and s.engine.proposer is not None]
    cost = None
    if spec_engines:
        context = sorted(prompts, key=lambda p: len(p.token_ids))[len(prompts) // 2].token_ids
        cost = measure_cost_ratio(spec_engines[0], context, max_k, args.device, args.cost_reps)

    records: list[dict] = []
    outputs: dict[tuple[str, float, int], list[int]] = {}
    for i, prompt in enumerate(tqdm(prompts, desc="latency", unit="prompt")):
        for t in args.temperature:
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                result: Run = systems[name].run(prompt.token_ids, t, args.max_tokens, args.seed + i)
                outputs[(name, t, prompt.question_id)] = result.token_ids
                record = {
                    "system": name,
                    "temperature": t,
                    "question_id": prompt.question_id,
                    "category": prompt.category,
                    "prompt_tokens": len(prompt.token_ids),
                    "output_tokens": len(result.token_ids),
                    "seconds": result.seconds,
                    "ttft_s": result.ttft,
                }
                if is_spec(name):
                    record["spec"] = spec_counts(result.steps)
                records.append(record)

    summary = [summarize(records, names, t, args.categories, cost, outputs, prompts) for t in args.temperature]
    if cost is not None:
        print(
            f"\ncost ratio c = draft / verifier single-token forward = {cost['draft_forward_ms']:.2f} ms / "
            f"{cost['verifier_forward_ms']:.2f} ms = {cost['c']:.3f} (parameter ratio {cost['param_ratio']:.3f}); "
            f"a draft step right after another: {cost['draft_forward_warm_ms']:.2f} ms, c = {cost['c_warm']:.3f}"
        )
        print(
            "verifier forward of k + 1 tokens / of 1 token, k = 0, 1, ...: "
            + " ".join(f"{v:.2f}" for v in cost["verify_cost"])
        )
    from specserve.model.loader import resolve_dtype

    dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")  # what 'auto' meant here
    for s in summary:
        print_summary(s, args.categories, dtype)

    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench")}
    config.update(verifier=verifier, draft=draft, systems=names, resolved_dtype=dtype)
    write_json(
        args.out,
        {
            "benchmark": "latency",
            "config": config,
            "environment": environment(args.device),
            "prompts": [
                {k: v for k, v in asdict(p).items() if k not in ("text", "token_ids")}
                | {"prompt_tokens": len(p.token_ids)}
                for p in prompts
            ],
            "cost_ratio": cost,
            "summary": summary,
            "runs": records,
        },
    )
    print(f"\nwrote {args.out}")
    png = str(Path(args.out).with_suffix(".png"))
    panels = []
    for s in summary:
        series = {
            n: {
                **{c: v["by_category"][c]["decode_tokens_per_s"] for c in args.categories},
                "all": v["decode_tokens_per_s"],
            }
            for n, v in s["systems"].items()
        }
        panels.append((f"temperature {s['temperature']:g}", series))
    ylabel = "decode tokens/s (batch 1, after the first token)"
    if plot_grouped_bars(png, panels, list(args.categories) + ["all"], ylabel):
        print(f"wrote {png}")
    png = str(Path(args.out).with_name(Path(args.out).stem + "_acceptance.png"))
    if plot_lines(png, acceptance_panels(summary, args.categories), "draft position", "accepted / drafted"):
        print(f"wrote {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve bench latency",
        description="Batch-1 latency on Spec-Bench: our engine plain / speculative (fixed k, adaptive) and "
        "HF transformers plain / assisted, interleaved per prompt. Prints tokens/s end to end and after the first "
        "token (decode), speedups, acceptance and "
        "the speedup Leviathan's formula predicts; writes JSON (and a PNG plot if matplotlib is installed).",
    )
    add_latency_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"specserve bench latency: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
