"""Training EAGLE heads: data readers, one short run that learns and serves, two ranks under DDP."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distill import CHECK_PROMPTS, GREEDY, _free_port, bigram_verifier, prompt_file  # noqa: F401
from tiny_models import PROMPTS

from specserve import LLM
from specserve.config import CacheConfig
from specserve.distill.data import apply_chat_template
from specserve.distill.eagle_data import read_pairs
from specserve.distill.eagle_trainer import EagleConfig, train_eagle
from specserve.engine.eagle_proposer import EagleProposer


def test_read_pairs_from_each_format(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "no answer"}))
    assert read_pairs(str(jsonl)) == [("2+2?", "4")]
    sharegpt = tmp_path / "sg.json"
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    sharegpt.write_text("[" + json.dumps(conv) + ", " + json.dumps(conv)[:20])  # cut off mid-way
    assert read_pairs(str(sharegpt)) == [("hi", "hello")]
    text = tmp_path / "t.txt"
    text.write_text("abcdefghi " * 20)
    ((prompt, response),) = read_pairs(str(text))
    assert prompt.startswith("Continue this text") and response
    with pytest.raises(ValueError, match="evaluation only"):
        read_pairs(str(tmp_path / "spec_bench_question.jsonl"))


def config(verifier: str, data: str, out, **kw) -> EagleConfig:
    args = dict(
        data=(data,),
        out=str(out),
        verifier=verifier,
        responses="verifier",
        max_sequences=32,
        max_tokens=64,
        max_new_tokens=24,
        draft_vocab_size=128,
        teacher_top_m=8,
        steps=40,
        batch_size=8,
        lr=3e-3,
        eval_every=20,
        eval_fraction=0.25,
        device="cpu",
        progress=False,
    )
    args.update(kw)
    return EagleConfig(**args)


def test_eagle_head_learns_and_serves(tiny, bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    out = tmp_path / "head"
    result = train_eagle(config(bigram_verifier, prompt_file, out))
    record = json.load(open(out / "distill.json"))
    evals = [h for h in record["history"] if "agreement" in h]
    assert [h["step"] for h in evals] == [0, 20, 40]
    assert evals[-1]["agreement"] > evals[0]["agreement"] + 0.3  # bigram structure: the head reads x_i
    assert 0 <= evals[-1]["expected_acceptance"] <= 1
    assert result["best"]["expected_acceptance"] == max(h["expected_acceptance"] for h in evals)
    assert record["draft_vocab_size"] == 128 and os.path.exists(out / "distill.png")
    cfg = json.load(open(out / "config.json"))
    assert cfg["draft_type"] == "eagle" and cfg["draft_vocab_size"] == 128

    cache = CacheConfig(num_blocks=128, block_size=4)
    own = LLM(bigram_verifier, draft=str(out), dtype="float32", num_speculative_tokens=3, cache=cache)
    plain = LLM(bigram_verifier, dtype="float32", cache=cache)
    assert isinstance(own.engine.proposer, EagleProposer)
    prompts = CHECK_PROMPTS + PROMPTS[:2]
    assert [c.token_ids for c in own.generate(prompts, GREEDY)] == [
        c.token_ids for c in plain.generate(prompts, GREEDY)
    ]
    # on chat prompts like those it trained on, many of its tokens are accepted (an untrained head: ~1 / 128)
    own.engine.metrics.speculation.clear()
    own.generate(apply_chat_template(own.tokenizer, CHECK_PROMPTS), GREEDY)
    stats = own.engine.metrics.total_speculation()
    assert stats.accepted_tokens > 0.2 * stats.drafted_tokens
    # the head belongs to its verifier: another one refuses it
    with pytest.raises(ValueError, match="trained for verifier"):
        LLM(tiny["qwen2"], draft=str(out), dtype="float32")


def test_config_validation():
    with pytest.raises(ValueError, match="responses"):
        EagleConfig(data=("x.jsonl",), out="o", responses="model")
    with pytest.raises(ValueError, match="evaluation only"):
        EagleConfig(data=("spec_bench_question.jsonl",), out="o")


def _worker(rank: int, world: int, port: int, cfg: EagleConfig, result_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = train_eagle(cfg)
    torch.save(result["head"].state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_two_ranks_train_one_head(bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    import torch.multiprocessing as mp

    out = tmp_path / "head"
    cfg = config(bigram_verifier, prompt_file, out, steps=4, eval_every=4)
    mp.spawn(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    assert (out / "model.safetensors").exists()
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # DDP keeps the ranks' weights identical


def test_eval_only_reports_held_out_acceptance_by_category(tiny, tmp_path):
    from test_eagle import build_head

    from specserve.cli import main

    head = build_head(tiny["llama"], str(tmp_path / "head"))
    out = tmp_path / "eval.json"
    argv = [
        "distill",
        "--eval-only",
        "--draft",
        head,
        "--verifier",
        tiny["llama"],
        "--eval-k",
        "3",
        "--eval-per-category",
        "1",
        "--eval-max-tokens",
        "8",
        "--eval-dtype",
        "float32",
        "--eval-out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.load(open(out))
    assert set(result["temperatures"]) == {"0.0", "0.7"}
    for r in result["temperatures"].values():
        assert r["by_category"] and r["overall"]["verification_steps"] > 0
        for s in [r["overall"], *r["by_category"].values()]:
            assert 1.0 <= s["mean_acceptance_length"] <= 4.0
            assert all(0.0 <= x <= 1.0 for x in s["per_position_acceptance"] if x is not None)
            assert len(s["per_position_acceptance"]) == 3
    assert (tmp_path / "eval.png").exists()
