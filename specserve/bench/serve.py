"""Serving benchmark: streaming chat requests from C concurrent HTTP clients, speculation on vs off.

By default it starts `specserve serve` on 127.0.0.1 once per mode, both at once on free ports (`spec`:
the default speculation; `plain`: --no-speculation), loads them level by level, alternating which goes
first so drift hits both alike, and stops them with SIGTERM at the end. With --url it loads that server
alone and starts nothing. At a level of C clients each client sends --requests-per-client streaming chat
completions one after another (Spec-Bench first turns, round-robin), and none starts after --time-limit.

Per level and server: output tokens/s and requests/s (over the level's wall time), time to first token,
inter-token latency (the gap between two content chunks: with speculation one chunk can carry several
tokens), time per output token (a request's time after its first token over its other tokens), end-to-end
latency, errors; from a specserve server also the acceptance counters of /metrics over the level.
`local_server` starts and stops the servers, `load` runs the clients; this module runs the levels and
reports; of the models it only resolves the default checkpoints' paths. Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from pathlib import Path

import numpy as np

from specserve.bench.load import run_level, served_model, speculation_counters, speculation_delta, warm_up
from specserve.bench.local_server import LocalServer, wait_healthy
from specserve.bench.options import SERVE_PRESETS, add_serve_args, resolve_draft, resolve_presets, resolve_verifier
from specserve.bench.report import environment, plot_lines, table, write_json
from specserve.evaluation.acceptance import ratio
from specserve.evaluation.prompts import category_of, load_questions, select

MODES = ("spec", "plain")
URL_MODE = "server"  # the one mode of a --url run
MAX_ERROR_MESSAGES = 3


def server_flags(args: argparse.Namespace, mode: str, verifier: str, draft: str | None) -> list[str]:
    flags = ["--verifier", verifier, "--dtype", args.dtype, "--device", args.device]
    flags += ["--upcast-matmuls", args.upcast_matmuls]
    flags += ["--draft", draft] if mode == "spec" else ["--no-speculation"]
    return flags + shlex.split(args.serve_flags)


def chat_prompts(args: argparse.Namespace) -> list[dict]:
    """The selected Spec-Bench questions' first turns, as the user messages of chat requests."""
    questions = select(load_questions(args.prompts_file), args.prompts_per_category, args.categories)
    return [
        {
            "question_id": q["question_id"],
            "category": category_of(q["category"]),
            "subcategory": q["category"],
            "text": q["turns"][0],
        }
        for q in questions
    ]


# ---- summary ------------------------------------------------------------------------------------


def percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    ms = 1e3 * np.asarray(values)
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "n": len(values),
    }


def summarize_level(records: list[dict], wall: float, planned: int, speculation: dict | None) -> dict:
    ok = [r for r in records if r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    tokens = sum(r["output_tokens"] for r in ok)
    tpot = [
        (r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1)
        for r in ok
        if r["ttft_s"] is not None and r["output_tokens"] > 1
    ]
    return {
        "requests_planned": planned,
        "requests_sent": len(records),
        "requests_completed": len(ok),
        "errors": len(failed),
        "error_messages": list(dict.fromkeys(r["error"] for r in failed))[:MAX_ERROR_MESSAGES],
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if records and wall > 0 else None,
        "requests_per_s": len(ok) / wall if records and wall > 0 else None,
        "ttft_ms": percentiles_ms([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "itl_ms": percentiles_ms([gap for r in ok for gap in r["itl_s"]]),
        "tpot_ms": percentiles_ms(tpot),
        "latency_ms": percentiles_ms([r["latency_s"] for r in ok]),
        "speculation": speculation,
    }


def spec_over_plain(spec: dict, plain: dict) -> dict:
    """spec / plain: above 1 is better for the rates, below 1 for the latencies."""
    return {
        "output_tokens_per_s": ratio(spec["output_tokens_per_s"], plain["output_tokens_per_s"]),
        "requests_per_s": ratio(spec["requests_per_s"], plain["requests_per_s"]),
        **{f"{key}_p50": ratio(spec[key]["p50"], plain[key]["p50"]) for key in ("ttft_ms", "itl_ms", "tpot_ms")},
    }


def print_summary(levels: list[dict]) -> None:
    rows = []
    for level in levels:
        for mode, s in level["modes"].items():
            cmp = level["spec_over_plain"] if mode == "spec" else None
            rows.append(
                [
                    level["concurrency"],
                    mode,
                    s["requests_completed"],
                    s["errors"],
                    s["output_tokens_per_s"],
                    cmp["output_tokens_per_s"] if cmp else None,
                    s["requests_per_s"],
                    s["ttft_ms"]["p50"],
                    s["ttft_ms"]["p99"],
                    s["itl_ms"]["p50"],
                    s["itl_ms"]["p99"],
                    s["tpot_ms"]["p50"],
                    (s["speculation"] or {}).get("mean_acceptance_length"),
                ]
            )
    print(
        table(
            [
                "clients",
                "server",
                "requests",
                "errors",
                "out tok/s",
                "x plain",
                "req/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "ITL p50 ms",
                "ITL p99 ms",
                "TPOT p50 ms",
                "MAL",
            ],
            rows,
        )
    )
    for level in levels:
        for mode, s in level["modes"].items():
            for message in s["error_messages"]:
                print(f"error ({mode}, {level['concurrency']} clients): {message}")


def plot(path: str, levels: list[dict]) -> bool:
    modes = list(levels[0]["modes"])
    xs = [level["concurrency"] for level in levels]

    def line(mode: str, get, style: str) -> tuple[list, list, str]:
        points = [(x, get(level["modes"][mode])) for x, level in zip(xs, levels, strict=True)]
        points = [(x, y) for x, y in points if y is not None]
        return [x for x, _ in points], [y for _, y in points], style

    color = {m: f"C{i}" for i, m in enumerate(modes)}  # a mode keeps its colour; p99 is dashed
    panels = [
        ("output tokens/s", {m: line(m, lambda s: s["output_tokens_per_s"], color[m] + "-") for m in modes}),
        ("requests/s", {m: line(m, lambda s: s["requests_per_s"], color[m] + "-") for m in modes}),
    ]
    for key, title in (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency (between chunks)")):
        series = {}
        for m in modes:
            series[f"{m} p50"] = line(m, lambda s, key=key: s[key]["p50"], color[m] + "-")
            series[f"{m} p99"] = line(m, lambda s, key=key: s[key]["p99"], color[m] + "--")
        panels.append((title, series))
    return plot_lines(path, panels, "concurrent clients", ["tokens/s", "requests/s", "ms", "ms"], log2_x=True)


# ---- the run ------------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, urls: dict[str, str], models: dict[str, str], prompts: list[dict]
) -> tuple[list[dict], list[dict]]:
    """Every concurrency level on every server, the servers' order alternating from level to level:
    (one summary per level, every request's record)."""
    modes = list(urls)
    levels, records = [], []
    for n, concurrency in enumerate(args.concurrency):
        order = modes[n % len(modes) :] + modes[: n % len(modes)]
        by_mode = {}
        for mode in order:
            before = speculation_counters(urls[mode])
            recs, wall = asyncio.run(run_level(args, mode, urls[mode], models[mode], prompts, concurrency))
            spec = speculation_delta(before, speculation_counters(urls[mode]))
            by_mode[mode] = summarize_level(recs, wall, concurrency * args.requests_per_client, spec)
            records += recs
        both = all(m in by_mode for m in MODES)
        levels.append(
            {
                "concurrency": concurrency,
                "modes": {m: by_mode[m] for m in modes},
                "spec_over_plain": spec_over_plain(by_mode["spec"], by_mode["plain"]) if both else None,
            }
        )
    return levels, records


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    resolve_presets(args, SERVE_PRESETS)
    if args.url and args.modes is not None:
        raise ValueError(f"--modes {','.join(args.modes)} starts servers; with --url {args.url} nothing is started")
    modes = [URL_MODE] if args.url else (args.modes or list(MODES))
    bad = [m for m in modes if m not in MODES] if not args.url else []
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = chat_prompts(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    verifier = draft = None
    servers: dict[str, LocalServer] = {}
    urls = {URL_MODE: args.url} if args.url else {}
    # SIGTERM (a `timeout`, a CI runner) unwinds like Ctrl-C, so the servers below are stopped, not orphaned
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if not args.url:
            verifier = resolve_verifier(args)
            draft = resolve_draft(args, verifier) if "spec" in modes else None
            out = Path(args.out)
            for mode in modes:
                log = out.with_name(f"{out.stem}_{mode}_server.log")
                servers[mode] = LocalServer(mode, server_flags(args, mode, verifier, draft), log)
                urls[mode] = servers[mode].url
            wait_healthy(list(servers.values()), args.startup_timeout)
        models = {mode: args.model or served_model(url, headers) for mode, url in urls.items()}
        for mode, url in urls.items():
            asyncio.run(warm_up(args, url, models[mode], prompts[0]))
        levels, records = measure(args, urls, models, prompts)
    except RuntimeError as e:
        print(f"specserve bench serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        for server in servers.values():
            server.stop()
        signal.signal(signal.SIGTERM, previous_handler)

    print(
        f"\nstreaming chat, {len(prompts)} Spec-Bench prompts, max_tokens {args.max_tokens}"
        f"{' (ignore_eos)' if args.ignore_eos else ''}, temperature {args.temperature:g}, "
        f"{args.requests_per_client} requests per client, at most {args.time_limit:g} s per level"
    )
    print_summary(levels)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench", "api_key")}
    config.update(verifier=verifier, draft=draft, modes=modes)
    write_json(
        args.out,
        {
            "benchmark": "serve",
            "config": config,
            "environment": environment(args.device),
            "servers": {
                mode: {
                    "url": url,
                    "model": models[mode],
                    "command": servers[mode].command if mode in servers else None,
                    "log": str(servers[mode].log_path) if mode in servers else None,
                    "exit_status": servers[mode].exit_status if mode in servers else None,
                }
                for mode, url in urls.items()
            },
            "prompts": [{k: v for k, v in p.items() if k != "text"} for p in prompts],
            "summary": levels,
            "requests": records,
        },
    )
    print(f"\nwrote {args.out}")
    png = str(Path(args.out).with_suffix(".png"))
    if plot(png, levels):
        print(f"wrote {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve bench serve",
        description="HTTP load with concurrent streaming chat clients on Spec-Bench prompts, against two "
        "`specserve serve` it starts on 127.0.0.1 (speculation on and off) or a --url: output tokens/s, requests/s, "
        "time to first token and inter-token latency p50/p99, errors. Writes JSON and a PNG plot.",
    )
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"specserve bench serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
