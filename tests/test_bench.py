"""`specserve bench latency|serve --quick` on the tiny models: the JSON carries every figure the benchmarks promise.

The draft is the verifier itself in float32, so every greedy draft is accepted: acceptance figures are
checked against exact values, not only ranges. Speeds are never asserted; only that they are positive.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from specserve.bench.latency import throughput_of
from specserve.bench.options import SERVE_PRESETS, resolve_presets
from specserve.cli import build_parser, main

K = 2
MAX_TOKENS = 8


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def ordered(stats: dict) -> bool:
    """A latency block: p50 <= p99, all positive."""
    return stats["n"] > 0 and positive(stats["p50"]) and stats["p50"] <= stats["p99"] and positive(stats["mean"])


def quick_args(tiny, tmp_path, bench: str) -> list[str]:
    return [
        "bench",
        bench,
        "--quick",
        "--verifier",
        tiny["llama"],
        "--draft",
        tiny["llama"],
        "--dtype",
        "float32",
        "--categories",
        "qa,translation",
        "--max-tokens",
        str(MAX_TOKENS),
        "--out",
        str(tmp_path / f"{bench}.json"),
    ]


@pytest.mark.integration
def test_latency_quick(tiny, tmp_path, capsys):
    assert main(quick_args(tiny, tmp_path, "latency") + ["--k", str(K), "--cost-reps", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\| ours-spec-k2 +\|", printed, re.M)  # a row of the Markdown table
    assert re.search(r"^\| system .*\| decode tok/s \| decode x ours-plain \|", printed, re.M)
    assert "\ndecode tokens/s by category\n" in printed and "\ntokens/s by category\n" in printed
    result = json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert (tmp_path / "latency_acceptance.png").stat().st_size > 0

    config = result["config"]
    assert config["quick"] and config["temperature"] == [0.0] and config["prompts_per_category"] == 1
    names = ["ours-plain", f"ours-spec-k{K}", "ours-hybrid-adaptive", "hf-plain", "hf-assisted"]
    assert config["systems"] == names
    cost = result["cost_ratio"]
    assert positive(cost["c"]) and positive(cost["draft_forward_ms"]) and positive(cost["verifier_forward_ms"])
    assert positive(cost["c_warm"]) and positive(cost["draft_forward_warm_ms"])
    assert len(cost["verify_cost"]) == K + 1 and all(positive(v) for v in cost["verify_cost"])

    runs = result["runs"]
    assert len(runs) == 2 * len(names)
    for r in runs:  # the first token comes after the run starts and before it ends
        assert 0 < r["ttft_s"] < r["seconds"], r

    (summary,) = result["summary"]
    assert summary["temperature"] == 0.0
    for name in names:
        s = summary["systems"][name]
        assert s["runs"] == 2 and s["output_tokens"] > 0
        mine = [r for r in runs if r["system"] == name]
        assert s["ttft_s"] == pytest.approx(sum(r["ttft_s"] for r in mine) / 2)
        decode_tokens = sum(r["output_tokens"] - 1 for r in mine)
        decode_seconds = sum(r["seconds"] - r["ttft_s"] for r in mine)
        assert s["decode_tokens_per_s"] == pytest.approx(decode_tokens / decode_seconds)
        keys = ("tokens_per_s", "speedup_vs_ours_plain", "speedup_vs_hf_plain", "ttft_s", "decode_tokens_per_s")
        for key in keys + ("decode_speedup_vs_ours_plain", "decode_speedup_vs_hf_plain"):
            assert positive(s[key]), (name, key, s[key])
        for cat in ("qa", "translation"):
            for key in ("speedup_vs_hf_plain", "ttft_s", "decode_tokens_per_s", "decode_speedup_vs_hf_plain"):
                assert positive(s["by_category"][cat][key]), (name, cat, key)
    for base in ("ours-plain", "hf-plain"):
        key = f"speedup_vs_{base.replace('-', '_')}"
        for block in [summary["systems"][base]] + list(summary["systems"][base]["by_category"].values()):
            assert block[key] == 1.0 and block[f"decode_{key}"] == 1.0

    spec = summary["speculation"][f"ours-spec-k{K}"]
    assert spec["k"] == K and spec["verification_steps"] > 0
    assert 0 < spec["mean_k"] <= K
    # the draft is the verifier: every draft is accepted, so a step emits its k drafts + 1
    assert spec["alpha"] == 1.0 and spec["acceptance_rate"] == 1.0
    assert 1.0 < spec["mean_acceptance_length"] <= K + 1
    assert spec["per_position_acceptance"] == [1.0] * K
    for key in ("predicted_speedup", "predicted_speedup_verify_cost", "achieved_speedup", "achieved_over_predicted"):
        assert positive(spec[key]), (key, spec[key])
    assert spec["achieved_decode_speedup"] == summary["systems"][f"ours-spec-k{K}"]["decode_speedup_vs_ours_plain"]
    assert positive(spec["achieved_decode_over_predicted"])
    for cat in ("qa", "translation"):
        by_cat = spec["by_category"][cat]
        assert 1.0 < by_cat["mean_acceptance_length"] <= K + 1
        assert all(0.0 <= a <= 1.0 for a in by_cat["per_position_acceptance"])
        assert positive(by_cat["achieved_over_predicted"])
    # float32 greedy speculation reproduces plain greedy decoding token for token
    assert summary["greedy_mismatches"][f"ours-spec-k{K} vs ours-plain"]["differ"] == 0
    assert summary["greedy_mismatches"]["ours-plain vs hf-plain"]["differ"] == 0


def test_throughput_of_splits_prefill_from_decoding():
    records = [
        {"output_tokens": 5, "seconds": 2.0, "ttft_s": 1.0},  # 4 tokens decoded in 1.0 s
        {"output_tokens": 3, "seconds": 1.0, "ttft_s": 0.5},  # 2 tokens decoded in 0.5 s
    ]
    t = throughput_of(records)
    assert t["tokens_per_s"] == pytest.approx(8 / 3.0) and t["ttft_s"] == pytest.approx(0.75)
    assert t["decode_tokens_per_s"] == pytest.approx(6 / 1.5)
    # one token each: nothing decoded after the first, so no decode rate
    assert throughput_of([{"output_tokens": 1, "seconds": 1.0, "ttft_s": 0.9}])["decode_tokens_per_s"] is None
    assert throughput_of([])["decode_tokens_per_s"] is None and throughput_of([])["ttft_s"] is None


@pytest.mark.integration
def test_serve_quick(tiny, tmp_path, capsys):
    # one fixed k on the spec server so that it drafts from its first step (the adaptive policy starts at k = 0);
    # a KV pool of ~10 MiB, not the default GiB, for a model this small
    args = quick_args(tiny, tmp_path, "serve") + [
        "--concurrency",
        "1,2",
        "--requests-per-client",
        "1",
        "--ignore-eos",
        f"--serve-flags=--kv-cache-memory 0.01 --num-speculative-tokens {K}",
        "--startup-timeout",
        "120",
        "--request-timeout",
        "60",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\| clients +\| server +\|", printed, re.M)
    result = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").stat().st_size > 0

    assert result["config"]["quick"] and result["config"]["time_limit"] == 60.0
    servers = result["servers"]
    assert set(servers) == {"spec", "plain"}
    for s in servers.values():
        assert s["url"].startswith("http://127.0.0.1:") and s["exit_status"] == 0  # SIGTERM drained cleanly
    assert "--no-speculation" in servers["plain"]["command"] and "--no-speculation" not in servers["spec"]["command"]

    levels = result["summary"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        c = level["concurrency"]
        for mode in ("spec", "plain"):
            s = level["modes"][mode]
            assert s["errors"] == 0 and s["error_messages"] == [], s["error_messages"]
            assert s["requests_planned"] == s["requests_sent"] == s["requests_completed"] == c
            assert s["output_tokens"] == c * MAX_TOKENS  # ignore_eos: every request runs to max_tokens
            assert positive(s["output_tokens_per_s"]) and positive(s["requests_per_s"])
            for key in ("ttft_ms", "itl_ms", "tpot_ms", "latency_ms"):
                assert ordered(s[key]), (mode, c, key, s[key])
            assert s["ttft_ms"]["p99"] <= s["latency_ms"]["p99"]
        spec = level["modes"]["spec"]["speculation"]
        assert spec["verification_steps"] > 0
        assert 1.0 < spec["mean_acceptance_length"] <= K + 1  # the draft is the verifier: all accepted
        assert spec["acceptance_rate"] == 1.0 and spec["per_position_acceptance"] == [1.0] * K
        assert level["modes"]["plain"]["speculation"] is None  # no proposer: no acceptance counters
        ratios = level["spec_over_plain"]
        assert all(positive(v) for v in ratios.values()), ratios

    requests = result["requests"]
    assert len(requests) == 2 * (1 + 2)
    assert all(r["error"] is None and r["finish_reason"] == "length" and r["prompt_tokens"] > 0 for r in requests)


def test_quick_presets_yield_to_explicit_flags():
    parser = build_parser()
    quick = parser.parse_args(["bench", "serve", "--quick", "--max-tokens", "8"])
    resolve_presets(quick, SERVE_PRESETS)
    assert (quick.max_tokens, quick.concurrency, quick.requests_per_client, quick.prompts_per_category) == (
        8,
        [1, 4],
        2,
        1,
    )
    full = parser.parse_args(["bench", "serve", "--time-limit", "5"])
    resolve_presets(full, SERVE_PRESETS)
    assert (full.max_tokens, full.concurrency, full.time_limit) == (64, [1, 4, 16, 64], 5.0)
    assert len(full.categories) == 6


@pytest.mark.parametrize("bench", ["latency", "throughput", "serve", "kernel"])
def test_every_bench_takes_quick(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", bench, "--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out


def test_serve_refuses_modes_with_url(tmp_path):
    # nothing is started or contacted: the flags are refused first
    args = ["bench", "serve", "--url", "http://127.0.0.1:9", "--modes", "spec", "--out", str(tmp_path / "s.json")]
    assert main(args) == 2
    assert not (tmp_path / "s.json").exists()


def test_kernel_bench_skips_cleanly_without_a_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernel benchmark runs instead of skipping")
    assert main(["bench", "kernel"]) == 0
    assert "skipped: no CUDA GPU" in capsys.readouterr().out


def test_llamacpp_system_is_optional_and_named_clearly(monkeypatch):
    from specserve.bench import latency

    monkeypatch.setattr(latency, "llama_cpp_available", lambda: False)
    assert latency.LLAMA_CPP not in latency.system_names([2], None, no_hf=False)
    with pytest.raises(ValueError, match="llama-cpp-python"):
        latency.system_names([2], ["ours-plain", latency.LLAMA_CPP], no_hf=False)
    monkeypatch.setattr(latency, "llama_cpp_available", lambda: True)
    assert latency.system_names([2], None, no_hf=True)[-1] == latency.LLAMA_CPP  # not an HF system
