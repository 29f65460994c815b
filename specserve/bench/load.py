"""HTTP load on one OpenAI-compatible server: closed-loop streaming chat clients, and what the server reports.

A level is C clients, each sending its requests one after another; each request records when its
content chunks arrived, its usage and any error (an HTTP status, an error event, a broken stream, a
timeout). Also asks the server for its model name and, from a specserve server, its acceptance
counters (/metrics). Knows nothing about starting servers or about summaries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
from tqdm.auto import tqdm

from specserve.evaluation.acceptance import ratio

WARMUP_TOKENS = 8


def served_model(url: str, headers: dict) -> str:
    """The first model /v1/models lists."""
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0, trust_env=False)
    if r.status_code != 200:
        raise RuntimeError(
            f"GET {url}/v1/models answered {r.status_code}: {r.text[:300]}; pass --model (and "
            "--api-key if the server needs one)"
        )
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"GET {url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def speculation_counters(url: str) -> dict | None:
    """specserve's acceptance counters from /metrics, summed over proposers; None if the server has none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(f"{url}/metrics", timeout=10.0, trust_env=False)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    totals = {"drafted": 0.0, "accepted": 0.0, "verify_steps": 0.0}
    per_position: dict[str, dict[int, float]] = {"drafted": {}, "accepted": {}}
    names = {
        "specserve_spec_draft_tokens_total": "drafted",
        "specserve_spec_accepted_tokens_total": "accepted",
        "specserve_spec_verify_steps_total": "verify_steps",
    }
    position_names = {
        "specserve_spec_draft_tokens_per_position_total": "drafted",
        "specserve_spec_accepted_tokens_per_position_total": "accepted",
    }
    found = False
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
                found = True
            elif sample.name in position_names:
                counts = per_position[position_names[sample.name]]
                j = int(sample.labels["position"])
                counts[j] = counts.get(j, 0.0) + sample.value
    return {**totals, "per_position": per_position} if found else None


def speculation_delta(before: dict | None, after: dict | None) -> dict | None:
    """Acceptance over one level: the counters' growth, as rates."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in ("drafted", "accepted", "verify_steps")}
    positions = sorted(after["per_position"]["drafted"])
    drafted = [after["per_position"]["drafted"][j] - before["per_position"]["drafted"].get(j, 0.0) for j in positions]
    accepted = [
        after["per_position"]["accepted"].get(j, 0.0) - before["per_position"]["accepted"].get(j, 0.0)
        for j in positions
    ]
    while drafted and drafted[-1] == 0:  # positions no request reached during this level
        drafted.pop()
        accepted.pop()
    steps = d["verify_steps"]
    return {
        "drafted_tokens": int(d["drafted"]),
        "accepted_tokens": int(d["accepted"]),
        "verification_steps": int(steps),
        "acceptance_rate": ratio(d["accepted"], d["drafted"]),
        "mean_acceptance_length": (d["accepted"] + steps) / steps if steps else None,
        "per_position_acceptance": [ratio(a, n) for a, n in zip(accepted, drafted, strict=True)],
    }


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming chat completion: when each content chunk arrived, the usage, and any error."""
    chunk_times: list[float] = []
    usage = finish_reason = error = None
    done = False
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = f"error event: {json.dumps(event['error'])[:300]}"
                        break
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunk_times.append(time.perf_counter() - t0)
                        finish_reason = choice.get("finish_reason") or finish_reason
                if error is None and not done:
                    error = "the stream ended without data: [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    latency = time.perf_counter() - t0
    return {
        "latency_s": latency,
        "ttft_s": chunk_times[0] if chunk_times else None,
        "itl_s": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "content_chunks": len(chunk_times),
        # the usage chunk counts tokens; a server that sends none leaves only the chunk count
        "output_tokens": usage["completion_tokens"] if usage else len(chunk_times),
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        "finish_reason": finish_reason,
        "error": error,
    }


def request_body(args: argparse.Namespace, model: str, prompt: dict, index: int, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt["text"]}],
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "seed": index,  # request i draws the same random numbers from every server
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def http_client(args: argparse.Namespace, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(
        timeout=httpx.Timeout(args.request_timeout, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers=headers,
        trust_env=False,  # no proxy between the clients and the server
    )


async def run_level(
    args: argparse.Namespace, mode: str, url: str, model: str, prompts: list[dict], concurrency: int
) -> tuple[list[dict], float]:
    """C clients in closed loops until the level's requests are sent or its time is up: (records, wall seconds)."""
    planned = concurrency * args.requests_per_client
    records: list[dict] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + args.time_limit
    bar = tqdm(total=planned, desc=f"{mode} x{concurrency}", unit="req")

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        nonlocal issued
        while issued < planned and time.perf_counter() < deadline:
            i = issued
            issued += 1
            prompt = prompts[i % len(prompts)]
            sent = time.perf_counter() - start
            record = await stream_chat(client, url, request_body(args, model, prompt, i, args.max_tokens))
            records.append(
                {
                    "mode": mode,
                    "concurrency": concurrency,
                    "index": i,
                    "client": c,
                    "question_id": prompt["question_id"],
                    "category": prompt["category"],
                    "start_s": sent,
                    **record,
                }
            )
            bar.update(1)

    async with http_client(args, concurrency) as client:
        await asyncio.gather(*(client_loop(client, c) for c in range(concurrency)))
    wall = time.perf_counter() - start
    bar.close()
    return sorted(records, key=lambda r: r["index"]), wall


async def warm_up(args: argparse.Namespace, url: str, model: str, prompt: dict) -> None:
    """One short request, not counted: the first one pays for lazy initialisation."""
    async with http_client(args, 1) as client:
        record = await stream_chat(
            client, url, request_body(args, model, prompt, 0, min(WARMUP_TOKENS, args.max_tokens))
        )
    if record["error"]:
        raise RuntimeError(f"the warm-up request to {url} failed: {record['error']}")
