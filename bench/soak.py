"""Load and soak: N concurrent streaming clients for T seconds against a specserve server on this machine.

    python bench/soak.py                                   # 64 clients x 300 s, tiny random models it builds
    python bench/soak.py --clients 16 --duration 10        # a short run
    python bench/soak.py --verifier DIR [--draft DIR]      # serve these models instead
    python bench/soak.py --url http://127.0.0.1:8000       # a server that is already running (loopback only)

Each client loops until the deadline: a streaming request (completions and chats in turn, with
usage), read to ``data: [DONE]``. A request fails when its status is not 200, an event is not JSON
or is an error, the stream ends without ``[DONE]``, or no choice finishes. After a warm-up round
the server's resident memory is read from its /metrics (``process_resident_memory_bytes``), and
again once the server is idle after the run. Prints a JSON report; exits 1 when a request failed,
the KV pool did not return to empty, or resident memory grew more than ``--max-rss-growth`` %.
Traffic goes to loopback addresses only, bounded by ``--duration`` and ``--max-requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The quick brown fox",
    "Speculative decoding lets a small draft model",
    "def add(a, b):",
    "Natalia sold clips to 48 of her friends in April",
    "To be, or not to be",
]


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {'name{labels}': value}."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def stream_once(http: httpx.AsyncClient, rng: random.Random, chat: bool, max_tokens: int) -> tuple[int, str]:
    """One streaming request read to the end: (completion tokens, '' or why it failed)."""
    prompt = f"{rng.choice(PROMPTS)} {rng.randrange(10**6)}"
    body = {
        "max_tokens": max_tokens,
        "temperature": rng.choice([0.0, 0.8]),
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": rng.random() < 0.5,
    }
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return 0, f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return 0, "the stream ended without [DONE]"
    usage, finished = None, False
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except json.JSONDecodeError:
            return 0, f"an event is not JSON: {event[:200]}"
        if "error" in chunk:
            return 0, f"error event: {chunk['error'].get('message', '')[:200]}"
        finished |= any(c.get("finish_reason") for c in chunk.get("choices", []))
        usage = chunk.get("usage") or usage
    if not finished or usage is None:
        return 0, "no choice finished, or no usage chunk"
    return usage["completion_tokens"], ""


async def soak(
    url: str,
    clients: int,
    duration: float,
    max_tokens: int = 32,
    seed: int = 0,
    api_key: str | None = None,
    max_requests: int = 1_000_000,
) -> dict:
    """Run the clients against ``url`` and report; see the module docstring."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120.0, connect=10.0)
    counts = {"requests": 0, "failed": 0, "tokens": 0}
    failures: list[str] = []

    async def client(i: int, deadline: float) -> None:
        rng = random.Random(seed * 100_003 + i)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
            while time.monotonic() < deadline and counts["requests"] < max_requests:
                counts["requests"] += 1
                try:
                    tokens, why = await stream_once(http, rng, chat=counts["requests"] % 2 == 0, max_tokens=max_tokens)
                except httpx.HTTPError as e:
                    tokens, why = 0, f"{type(e).__name__}: {e}"
                counts["tokens"] += tokens
                if why:
                    counts["failed"] += 1
                    failures.append(why)

    # warm-up: one request per client, so that lazily grown buffers exist before the baseline
    await asyncio.gather(*(_one(url, headers, i, seed, max_tokens) for i in range(clients)))
    rss_start = metrics(url).get("process_resident_memory_bytes", float("nan"))
    start = time.monotonic()
    await asyncio.gather(*(client(i, start + duration) for i in range(clients)))
    elapsed = time.monotonic() - start
    idle = _wait_idle(url)
    after = metrics(url)
    rss_end = after.get("process_resident_memory_bytes", float("nan"))
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "requests": counts["requests"],
        "failed": counts["failed"],
        "failures": failures[:5],
        "completion_tokens": counts["tokens"],
        "tokens_per_s": round(counts["tokens"] / elapsed, 1),
        "idle_after": idle,
        "kv_blocks": after["specserve_kv_cache_blocks"],
        "kv_free_blocks_after": after["specserve_kv_cache_free_blocks"],
        "kv_usage_after": after['specserve_kv_cache_usage_ratio{model="verifier"}'],
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(100.0 * (rss_end - rss_start) / rss_start, 2),
    }


async def _one(url: str, headers: dict, i: int, seed: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0) as http:
        await stream_once(http, random.Random(seed - i - 1), chat=i % 2 == 0, max_tokens=max_tokens)


def _wait_idle(url: str, timeout: float = 60.0) -> bool:
    """Whether the engine ran dry (nothing running or waiting) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["specserve_requests_running"] == 0 and m["specserve_requests_waiting"] == 0:
            return True
        time.sleep(0.1)
    return False


def passed(report: dict, max_rss_growth: float) -> bool:
    return (
        report["failed"] == 0
        and report["idle_after"]
        and report["kv_free_blocks_after"] == report["kv_blocks"]
        and report["rss_growth_pct"] < max_rss_growth
    )


def _loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"soak: --url must point at this machine (127.0.0.0/8, ::1 or localhost), got {url!r}")
    return url.rstrip("/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: argparse.Namespace, workdir: str) -> tuple[subprocess.Popen, str]:
    verifier, draft = args.verifier, args.draft
    if verifier is None:  # tiny random models, built from code like the tests' (nothing downloaded)
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_all

        tiny = build_all(workdir)
        verifier, draft = tiny["llama"], draft or tiny["draft"]
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "specserve.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--verifier",
        verifier,
        "--dtype",
        args.dtype,
        "--max-queue",
        str(max(256, 4 * args.clients)),
        "--log-level",
        "warning",
        "--data-dir",
        workdir,
    ]  # the traffic log goes to the scratch directory
    cmd += ["--draft", draft] if draft else ["--no-speculation"]
    if args.verifier is None:  # tiny models: a small pool that 64 clients keep busy
        cmd += ["--block-size", "4", "--kv-cache-memory", "0.01", "--max-num-seqs", "64"]
    server = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"soak: the server did not come up (exit status {server.poll()})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="Concurrent streaming clients (default 64).")
    p.add_argument("--duration", type=float, default=300.0, help="Seconds of load (default 300; at most 3600).")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="Stop after this many requests in all.")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32).")
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=10.0,
        metavar="PCT",
        help="Fail above this resident-memory growth in percent (default 10).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="A running server on this machine; default: start one.")
    p.add_argument("--api-key", default=os.environ.get("SPECSERVE_API_KEY"), help="Bearer key for --url.")
    p.add_argument("--verifier", default=None, help="Verifier checkpoint to serve (default: tiny random models).")
    p.add_argument("--draft", default=None, help="Draft checkpoint to serve (default with tiny models: a tiny one).")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 1024 and 0 < args.duration <= 3600):
        raise SystemExit("soak: need 1 <= --clients <= 1024 and 0 < --duration <= 3600")
    with tempfile.TemporaryDirectory() as workdir:
        server = None
        if args.url:
            url = _loopback(args.url)
        else:
            server, url = _start_server(args, workdir)
        try:
            report = asyncio.run(
                soak(url, args.clients, args.duration, args.max_tokens, args.seed, args.api_key, args.max_requests)
            )
        finally:
            if server is not None:  # SIGTERM drains; the exit status says whether it was clean
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=120)
        if server is not None:
            report["server_exit_status"] = server.returncode
    ok = passed(report, args.max_rss_growth) and report.get("server_exit_status", 0) == 0
    print(json.dumps({**report, "passed": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
