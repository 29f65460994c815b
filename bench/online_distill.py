"""Online distillation, shown: the draft's acceptance rises version after version on traffic from a new domain.

    python bench/online_distill.py                                   # default models, Shakespeare, 30 minutes
    python bench/online_distill.py --draft DIR --domain gsm8k        # a draft distilled elsewhere, maths traffic
    python bench/online_distill.py --tiny --minutes 1                # smoke run on tiny random models it builds

Phase 1, the demonstration: `specserve serve --online-distill` starts with ``--draft`` (default: the default draft)
and a fresh data directory (traffic log, draft registry). ``--concurrency`` clients stream completions of passages
from ``--domain`` (never the same passage twice while passages last) for ``--minutes``; /metrics is read every
``--sample-seconds``. The acceptance rate of a sampling window is its accepted / proposed draft tokens, over every
draft version; a change of ``specserve_draft_version`` is a swap. Draft proposals use a fixed
``--num-speculative-tokens`` (method ``draft``), so every step measures acceptance (the adaptive length would stop
proposing from a draft that accepts little).

Phase 2, the trainer's cost: a server without a trainer serves the registry's final version (same models, traffic
log off) while the clients go on; phases of ``--latency-phase-seconds`` alternate without and with a standalone
trainer (`specserve distill --online` on phase 1's traffic, ``--trainer-threads`` threads, publishing into a scratch
registry this server does not watch). A "with" phase starts once the trainer has read traffic. Reported per phase:
the server's mean inter-token latency (its histogram's growth) and the clients' time per output token.

Writes ``--out`` (JSON) and a PNG beside it: acceptance vs time with the swaps marked, and latency without / with
the trainer. Starts servers on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from specserve.bench.local_server import LocalServer, wait_healthy  # noqa: E402
from specserve.bench.report import table, write_json  # noqa: E402
from specserve.data import TINY_SHAKESPEARE  # noqa: E402
from specserve.online import registry  # noqa: E402

DOMAINS = {
    "shakespeare": TINY_SHAKESPEARE,  # shipped in the package
    # GSM8K's training split is not shipped (4.2 MB): it is read from ../shared/data beside the repository
    "gsm8k": ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl",
}
FOLLOWED = {
    "specserve_draft_swaps_total": "swaps",
    "specserve_draft_rollbacks_total": "rollbacks",
    "specserve_trainer_up": "trainer_up",
    "specserve_trainer_restarts_total": "trainer_restarts",
    "specserve_inter_token_latency_seconds_sum": "itl_sum",
    "specserve_inter_token_latency_seconds_count": "itl_count",
    "specserve_traffic_records_written_total": "records_written",
}
"""/metrics samples read as they are, by the name this benchmark gives them."""
MANIFEST_FIELDS = (
    "version",
    "parent",
    "created_at",
    "heldout_acceptance",
    "parent_heldout_acceptance",
    "records_seen",
    "tokens_seen",
)


# ---- traffic ------------------------------------------------------------------------------------------------


def request_bodies(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(route, body) of every request the domain offers, shuffled: Shakespeare passages of consecutive speeches (at
    most ``passage_chars``) to continue (completions), or GSM8K questions to answer (chat)."""
    domain, path, max_tokens, temperature = args.domain, DOMAINS[args.domain], args.max_tokens, args.temperature
    common = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if not path.exists():
        raise SystemExit(f"--domain {domain}: its traffic file {path} is missing")
    bodies = []
    if domain == "shakespeare":
        speeches = [s.strip() for s in path.read_text().split("\n\n") if s.strip()]
        passage = ""
        for speech in speeches:
            passage = f"{passage}\n\n{speech}" if passage else speech
            if len(passage) >= args.passage_chars // 2:
                bodies.append(("/v1/completions", {"prompt": passage[-args.passage_chars :] + "\n\n", **common}))
                passage = ""
    else:
        for line in path.read_text().splitlines():
            question = json.loads(line)["question"]
            bodies.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": question}], **common}))
    random.Random(args.seed).shuffle(bodies)
    return bodies


async def stream_one(http: httpx.AsyncClient, route: str, body: dict) -> dict:
    """One streaming request read to [DONE]: when it started, when content arrived, its tokens, or its error."""
    start = time.monotonic()
    arrivals, tokens, error = [], 0, None
    try:
        async with http.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                return {"start": start, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    error = chunk["error"].get("message", "error event")
                for choice in chunk.get("choices", []):
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        arrivals.append(time.monotonic())
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    except httpx.HTTPError as e:
        error = repr(e)
    end = time.monotonic()
    out = {"start": start, "end": end, "tokens": tokens, "error": error}
    if len(arrivals) >= 2 and tokens >= 2:
        out["tpot"] = (arrivals[-1] - arrivals[0]) / (tokens - 1)
    return out


async def send_traffic(
    url: str, bodies: list[tuple[str, dict]], cursor: list[int], concurrency: int, seconds: float
) -> list[dict]:
    """``concurrency`` closed-loop clients for ``seconds``, taking bodies in turn from ``cursor[0]`` (advanced)."""
    deadline = time.monotonic() + seconds
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False) as http:

        async def client() -> None:
            while time.monotonic() < deadline:
                route, body = bodies[cursor[0] % len(bodies)]
                cursor[0] += 1
                results.append(await stream_one(http, route, body))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


# ---- what the server says -----------------------------------------------------------------------------------


def scrape(url: str) -> dict:
    """The /metrics numbers this benchmark follows."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30.0, trust_env=False).text
    s = {"drafted": {}, "accepted": {}, "rejected": {}, "version": None}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "specserve_spec_draft_tokens_total" and labels.get("source") == "draft":
                s["drafted"][labels["draft_version"]] = value
            elif name == "specserve_spec_accepted_tokens_total" and labels.get("source") == "draft":
                s["accepted"][labels["draft_version"]] = value
            elif name == "specserve_draft_version":
                s["version"] = labels["version"]
            elif name == "specserve_draft_rejected_total":
                s["rejected"][labels["reason"]] = value
            elif name in FOLLOWED:
                s[FOLLOWED[name]] = value
    return s


async def sample_metrics(url: str, every: float, seconds: float, t0: float) -> list[dict]:
    samples = []
    deadline = time.monotonic() + seconds
    while True:
        s = await asyncio.to_thread(scrape, url)
        samples.append({"t": time.monotonic() - t0, **s})
        if time.monotonic() >= deadline:
            return samples
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


def windows(samples: list[dict]) -> list[dict]:
    """Acceptance between consecutive samples: draft tokens accepted / proposed, over every version."""
    out = []
    for a, b in zip(samples, samples[1:]):
        drafted = sum(b["drafted"].values()) - sum(a["drafted"].values())
        accepted = sum(b["accepted"].values()) - sum(a["accepted"].values())
        out.append(
            {
                "t0": a["t"],
                "t1": b["t"],
                "version": b["version"],
                "drafted": drafted,
                "accepted": accepted,
                "acceptance": accepted / drafted if drafted else None,
            }
        )
    return out


def acceptance_between(ws: list[dict], t0: float, t1: float) -> float | None:
    drafted = sum(w["drafted"] for w in ws if t0 <= w["t0"] and w["t1"] <= t1)
    return sum(w["accepted"] for w in ws if t0 <= w["t0"] and w["t1"] <= t1) / drafted if drafted else None


# ---- the two phases -----------------------------------------------------------------------------------------


def model_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dtype", args.dtype, "--speculative-method", "draft", "--num-speculative-tokens", str(args.k)]
    if args.verifier:
        flags += ["--verifier", args.verifier]
    if args.draft:
        flags += ["--draft", args.draft]
    if args.tiny:
        flags += ["--block-size", "4", "--kv-cache-memory", "0.05"]
    return flags


def demonstrate(args: argparse.Namespace, work: Path, bodies: list, cursor: list[int]) -> dict:
    data = work / "data"
    flags = [
        *model_flags(args),
        "--data-dir",
        str(data),
        "--online-distill",
        "--trainer-threads",
        str(args.trainer_threads),
        "--draft-poll-seconds",
        str(args.sample_seconds / 2),
    ]
    if args.trainer_eval_every is not None:
        flags += ["--trainer-eval-every", str(args.trainer_eval_every)]
    if args.trainer_margin is not None:
        flags += ["--trainer-margin", str(args.trainer_margin)]
    server = LocalServer("online-distill", flags, work / "serve_online.log")
    try:
        wait_healthy([server], args.startup_timeout)
        seconds = 60.0 * args.minutes
        print(f"phase 1: {args.domain} traffic for {seconds:.0f} s, {args.concurrency} clients", file=sys.stderr)

        async def both() -> tuple[list[dict], list[dict]]:
            t0 = time.monotonic()
            return await asyncio.gather(
                send_traffic(server.url, bodies, cursor, args.concurrency, seconds),
                sample_metrics(server.url, args.sample_seconds, seconds, t0),
            )

        requests, samples = asyncio.run(both())
    finally:
        status = server.stop()
    ws = windows(samples)
    swaps = [
        {"t": b["t"], "from": a["version"], "to": b["version"]}
        for a, b in zip(samples, samples[1:])
        if a["version"] != b["version"]
    ]
    last = samples[-1]
    per_version = {
        v: {"drafted": d, "accepted": last["accepted"].get(v, 0.0), "acceptance": last["accepted"].get(v, 0.0) / d}
        for v, d in last["drafted"].items()
        if d
    }
    end = samples[-1]["t"]
    first_swap = swaps[0]["t"] if swaps else end
    span = args.report_minutes * 60.0
    initial = acceptance_between(ws, 0.0, min(first_swap, span))
    final = acceptance_between(ws, max(0.0, end - span), end)
    registry_dir = data / "drafts"
    manifests = []
    for v in registry.list_versions(str(registry_dir)):
        m = registry.load_manifest(str(registry_dir), v)
        manifests.append({k: m.get(k) for k in MANIFEST_FIELDS})
    return {
        "server_exit_status": status,
        "requests": len(requests),
        "errors": [r["error"] for r in requests if r.get("error")][:10],
        "num_errors": sum(1 for r in requests if r.get("error")),
        "completion_tokens": sum(r.get("tokens", 0) for r in requests),
        "samples": samples,
        "windows": ws,
        "swaps": swaps,
        "per_version": per_version,
        "published": manifests,
        "initial_acceptance": initial,
        "final_acceptance": final,
        "acceptance_gain": None if initial is None or final is None else final - initial,
        "rollbacks": last.get("rollbacks", 0.0),
        "rejected": last["rejected"],
        "trainer_restarts": last.get("trainer_restarts", 0.0),
        "registry": str(registry_dir),
        "traffic_store": f"sqlite://{(data / 'traffic.db').resolve()}",
    }


def trainer_cost(args: argparse.Namespace, work: Path, bodies: list, cursor: list[int], phase1: dict) -> dict:
    from specserve.online.trainer import trainer_command
    from specserve.server.trainer_process import TrainerProcess

    flags = [*model_flags(args), "--draft-registry", phase1["registry"], "--no-traffic-log"]
    server = LocalServer("serving", flags, work / "serve_plain.log")
    phases = []
    try:
        wait_healthy([server], args.startup_timeout)
        version = scrape(server.url)["version"]
        for round_ in range(args.latency_rounds):
            for with_trainer in (False, True):
                trainer = None
                if with_trainer:  # a fresh scratch registry each time: the trainer starts from the initial draft
                    scratch = work / f"scratch_registry_{round_}"
                    verifier = args.verifier or default_verifier()
                    draft = args.draft or default_draft(verifier)
                    argv = trainer_command(
                        phase1["traffic_store"],
                        str(scratch),
                        draft,
                        args.trainer_threads,
                        verifier=verifier,
                        poll_seconds=1.0,
                    )
                    log = str(work / f"trainer_{round_}.log")
                    trainer = TrainerProcess(argv, threads=args.trainer_threads, log_path=log)
                    trainer.start()
                    state = scratch / "trainer_state.json"
                    deadline = time.monotonic() + args.startup_timeout
                    while not state.exists() and time.monotonic() < deadline:  # it has read traffic: training
                        time.sleep(0.5)
                try:
                    before = scrape(server.url)
                    requests = asyncio.run(
                        send_traffic(server.url, bodies, cursor, args.concurrency, args.latency_phase_seconds)
                    )
                    after = scrape(server.url)
                finally:
                    if trainer is not None:
                        trainer.stop()
                count = after["itl_count"] - before["itl_count"]
                total = after["itl_sum"] - before["itl_sum"]
                tpot = [r["tpot"] for r in requests if "tpot" in r and not r.get("error")]
                phases.append(
                    {
                        "round": round_,
                        "trainer": with_trainer,
                        "requests": len(requests),
                        "errors": sum(1 for r in requests if r.get("error")),
                        "server_itl_mean_ms": 1e3 * total / count if count else None,
                        "client_tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else None,
                        "client_tpot_p50_ms": 1e3 * statistics.median(tpot) if tpot else None,
                        "client_tpot_p90_ms": 1e3 * statistics.quantiles(tpot, n=10)[-1] if len(tpot) >= 2 else None,
                    }
                )
    finally:
        status = server.stop()

    def mean(key: str, with_trainer: bool) -> float | None:
        values = [p[key] for p in phases if p["trainer"] == with_trainer and p[key] is not None]
        return statistics.fmean(values) if values else None

    off, on = mean("server_itl_mean_ms", False), mean("server_itl_mean_ms", True)
    return {
        "server_exit_status": status,
        "draft_version": version,
        "phases": phases,
        "itl_without_trainer_ms": off,
        "itl_with_trainer_ms": on,
        "itl_ratio": on / off if on and off else None,
        "tpot_without_trainer_ms": mean("client_tpot_mean_ms", False),
        "tpot_with_trainer_ms": mean("client_tpot_mean_ms", True),
    }


def default_verifier() -> str:
    from specserve.model.default_models import default_verifier as verifier

    return verifier()


def default_draft(verifier: str) -> str:
    from specserve.model.default_models import layer_slice_draft

    return layer_slice_draft(verifier)


# ---- report -------------------------------------------------------------------------------------------------


def plot(path: str, result: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)", file=sys.stderr)
        return False
    demo, cost = result["demonstration"], result.get("trainer_cost")
    fig, axes = plt.subplots(
        1,
        2 if cost else 1,
        figsize=(13 if cost else 8, 4.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 1] if cost else [1]},
    )
    ax = axes[0, 0]
    ws = [w for w in demo["windows"] if w["acceptance"] is not None]
    ax.plot([w["t1"] / 60 for w in ws], [w["acceptance"] for w in ws], ".", alpha=0.35, label="per sample window")
    smooth = 60.0 * result["config"]["report_minutes"] / 2
    xs, ys = [], []
    for w in ws:
        a = acceptance_between(ws, w["t1"] - smooth, w["t1"])
        if a is not None:
            xs.append(w["t1"] / 60)
            ys.append(a)
    ax.plot(xs, ys, "-", label=f"over the last {smooth / 60:g} min")
    for s in demo["swaps"]:
        ax.axvline(s["t"] / 60, color="C3", alpha=0.5, linestyle="--")
        ax.text(s["t"] / 60, 1.0, s["to"], rotation=90, va="top", ha="right", fontsize="x-small", color="C3")
    ax.set_xlabel("minutes of traffic")
    ax.set_ylabel("draft acceptance rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"acceptance on {result['config']['domain']} traffic; swaps dashed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    if cost:
        ax = axes[0, 1]
        values = [cost["itl_without_trainer_ms"] or 0.0, cost["itl_with_trainer_ms"] or 0.0]
        ax.bar(["no trainer", "trainer"], values, color=["C0", "C1"])
        ax.set_ylabel("mean inter-token latency (ms)")
        ratio = cost["itl_ratio"]
        ax.set_title(f"ITL with / without the trainer: x{ratio:.2f}" if ratio else "ITL without / with the trainer")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_summary(result: dict) -> None:
    demo = result["demonstration"]
    rows = [[v, s["drafted"], s["acceptance"]] for v, s in demo["per_version"].items()]
    print(table(["draft version", "draft tokens", "live acceptance"], rows, digits=3), file=sys.stderr)
    gain = demo["acceptance_gain"]
    print(
        f"acceptance: first {result['config']['report_minutes']:g} min {demo['initial_acceptance']} -> last "
        f"{result['config']['report_minutes']:g} min {demo['final_acceptance']} (gain {gain}); "
        f"{len(demo['swaps'])} swaps, {demo['rollbacks']:g} rollbacks, {demo['num_errors']} request errors",
        file=sys.stderr,
    )
    cost = result.get("trainer_cost")
    if cost:
        print(
            f"trainer's cost: mean ITL {cost['itl_without_trainer_ms']} ms without, {cost['itl_with_trainer_ms']} "
            f"ms with (x{cost['itl_ratio']})",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", default=None, help="Verifier checkpoint (default: SmolLM2-135M-Instruct).")
    p.add_argument(
        "--draft",
        default=None,
        help="The draft to start from, distilled on another domain (default: the default draft).",
    )
    p.add_argument("--tiny", action="store_true", help="Tiny random models built from code (a smoke run).")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "bfloat16", "float32", "float16"],
        help="Default: auto (float32 on the CPU, bfloat16 on CUDA), float32 with --tiny.",
    )
    p.add_argument("--domain", default="shakespeare", choices=sorted(DOMAINS), help="Traffic (default shakespeare).")
    p.add_argument("--minutes", type=float, default=30.0, help="Minutes of phase 1 traffic (default 30).")
    p.add_argument("--concurrency", type=int, default=4, help="Concurrent streaming clients (default 4).")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64).")
    p.add_argument("--temperature", type=float, default=0.0, help="Of each request (default 0: greedy).")
    p.add_argument(
        "--passage-chars",
        type=int,
        default=None,
        help="Longest Shakespeare passage, in characters (default 800; --tiny: 250, its context is short).",
    )
    p.add_argument("--k", type=int, default=3, help="Draft tokens per step, fixed (default 3).")
    p.add_argument("--sample-seconds", type=float, default=10.0, help="Seconds between /metrics reads (default 10).")
    p.add_argument(
        "--report-minutes",
        type=float,
        default=3.0,
        help="Acceptance is reported over the first and the last this many minutes (default 3).",
    )
    p.add_argument("--trainer-threads", type=int, default=1, help="CPU threads of the trainer (default 1).")
    p.add_argument(
        "--trainer-eval-every",
        type=int,
        default=None,
        help="Steps between the trainer's evaluations (default: the trainer's; --tiny: 5).",
    )
    p.add_argument(
        "--trainer-margin",
        type=float,
        default=None,
        help="The trainer's publish margin (default: the trainer's; --tiny: 0).",
    )
    p.add_argument(
        "--latency-phase-seconds",
        type=float,
        default=60.0,
        help="Seconds of each phase 2 phase, without and with the trainer (default 60; 0: no phase 2).",
    )
    p.add_argument("--latency-rounds", type=int, default=2, help="Phase 2 rounds of (without, with) (default 2).")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="Seconds a server or trainer may take to start (default 600).",
    )
    p.add_argument("--seed", type=int, default=0, help="Order of the passages (default 0).")
    p.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results" / "online_distill.json"),
        help="JSON output; the PNG goes beside it (default bench/results/online_distill.json).",
    )
    p.add_argument("--workdir", default=None, help="Where servers keep data and logs (default: a temporary one).")
    args = p.parse_args(argv)
    if not (args.minutes > 0 and args.concurrency >= 1 and args.sample_seconds > 0 and args.k >= 1):
        p.error("need --minutes > 0, --concurrency >= 1, --sample-seconds > 0, --k >= 1")
    if args.tiny and (args.verifier or args.draft):
        p.error("--tiny builds its own models: leave out --verifier and --draft")
    args.dtype = args.dtype or ("float32" if args.tiny else "auto")
    args.passage_chars = args.passage_chars or (250 if args.tiny else 800)
    with tempfile.TemporaryDirectory(prefix="online_distill_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.tiny:  # tiny random models, built from code like the tests' (nothing downloaded)
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import build_all

            tiny = build_all(str(work / "tiny"))
            args.verifier, args.draft = tiny["llama"], tiny["draft"]
            args.trainer_eval_every = args.trainer_eval_every or 5
            args.trainer_margin = 0.0 if args.trainer_margin is None else args.trainer_margin
        bodies = request_bodies(args)
        cursor = [0]
        result = {"config": {k: v for k, v in vars(args).items() if k != "workdir"}}
        result["demonstration"] = demonstrate(args, work, bodies, cursor)
        if args.latency_phase_seconds > 0:
            result["trainer_cost"] = trainer_cost(args, work, bodies, cursor, result["demonstration"])
        result["passages_used"] = cursor[0]
        result["passages_available"] = len(bodies)
    write_json(args.out, result)
    png = str(Path(args.out).with_suffix(".png"))
    plot(png, result)
    print_summary(result)
    print(f"wrote {args.out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
