"""Training EAGLE heads: data readers, one short run that learns and serves, two ranks under DDP, the head
unrolled on its own features exactly as it drafts, resuming a run and its budget."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distill import CHECK_PROMPTS, GREEDY, _free_port, bigram_verifier, prompt_file  # noqa: F401
from tiny_models import PROMPTS

from specserve import LLM
from specserve.config import CacheConfig
from specserve.distill import eagle_trainer
from specserve.distill.data import apply_chat_template
from specserve.distill.eagle_data import read_pairs
from specserve.distill.eagle_trainer import EagleConfig, pack_batch, train_eagle
from specserve.distill.eagle_unroll import UnrolledHead
from specserve.engine.eagle_proposer import EagleProposer
from specserve.model.attention import AttentionMetadata
from specserve.model.eagle import EagleHead
from specserve.model.loader import load_model


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


@pytest.mark.integration
def test_eagle_head_learns_and_serves(tiny, bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    out = tmp_path / "head"
    result = train_eagle(config(bigram_verifier, prompt_file, out))
    record = json.load(open(out / "distill.json"))
    evals = [h for h in record["history"] if "agreement" in h]
    assert [h["step"] for h in evals] == [0, 20, 40]
    assert evals[-1]["agreement"] > evals[0]["agreement"] + 0.3  # bigram structure: the head reads x_i
    assert 0 <= evals[-1]["expected_acceptance"] <= 1
    assert result["best"]["accepted_tokens"] == max(h["accepted_tokens"] for h in evals)
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


@pytest.mark.integration
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


def _drafted(head: EagleHead, ids: torch.Tensor, feats: torch.Tensor, t: int, depth: int) -> list[torch.Tensor]:
    """What drafting computes: a prefill of 0..t on true features, then one step at a time on its own."""
    a = head.arch
    kv = torch.zeros(1, 2, ids.numel(), a.num_kv_heads, a.head_dim)
    fin = torch.cat([torch.zeros(1, feats.shape[1]), feats[:-1]])
    meta = AttentionMetadata.build([t + 1], [t + 1], torch.arange(t + 1), torch.arange(t + 1)[None])
    g = head(ids[: t + 1], torch.arange(t + 1), kv, meta, fin[: t + 1])[t]
    out = [g]
    for p in range(t + 1, t + depth):
        meta = AttentionMetadata.build([1], [p + 1], torch.tensor([p]), torch.arange(p + 1)[None])
        g = head(ids[p : p + 1], torch.tensor([p]), kv, meta, g[None])[0]
        out.append(g)
    return out


@torch.no_grad()
def test_unrolled_steps_are_what_drafting_computes(tiny):
    torch.manual_seed(0)
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    head = EagleHead(verifier)
    for p in head.parameters():
        if p.dim() > 1:
            p.normal_(0, 0.2)
    h, vocab, depth = verifier.arch.hidden_size, verifier.arch.vocab_size, 3
    lens = [7, 5]
    ids = [torch.randint(0, vocab, (n,)) for n in lens]
    feats = [torch.randn(n, h) for n in lens]
    batch = pack_batch(
        ids, feats, [torch.zeros(n, 2, dtype=torch.int64) for n in lens], [torch.zeros(n, 2) for n in lens],
        [torch.ones(n, dtype=torch.bool) for n in lens], "cpu",
    )  # fmt: skip
    unrolled = UnrolledHead(head, depth)(batch.input_ids, batch.positions, batch.in_features, batch.seq_lens)
    assert unrolled.shape == (depth, sum(lens), h)
    start = 0
    for k, n in enumerate(lens):
        for t in range(n - depth + 1):
            for s, want in enumerate(_drafted(head, ids[k], feats[k], t, depth)):
                torch.testing.assert_close(unrolled[s, start + t + s], want, atol=1e-4, rtol=1e-4)
        start += n
    # step 1 alone is plain teacher forcing
    plain = eagle_trainer.head_forward(head, head, batch, 0.0)
    # (within fp32 rounding, not bit for bit: the two run attention and norms on different kernels)
    torch.testing.assert_close(unrolled[0], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_unrolled_training_learns_and_reports_each_position(bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    out = tmp_path / "head"
    train_eagle(config(bigram_verifier, prompt_file, out, unroll_steps=3, eval_depth=4))
    record = json.load(open(out / "distill.json"))
    losses = [h["loss"] for h in record["history"] if "loss" in h]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert all(len(h["kl_at"]) == 3 for h in record["history"] if "loss" in h)
    first, last = [h for h in record["history"] if "agreement" in h][:: 2]
    for h in (first, last):
        assert len(h["acceptance_at"]) == len(h["agreement_at"]) == 4
        assert all(0 <= x <= 1 for x in h["acceptance_at"] + h["agreement_at"])
        assert h["accepted_tokens"] == pytest.approx(sum(h["acceptance_at"]))
    assert last["agreement_at"][0] > first["agreement_at"][0] + 0.3
    assert last["agreement_at"][2] > first["agreement_at"][2] + 0.2  # the third draft, read off its own features
    assert (out / "distill.png").exists() and (out / "training_state.pt").exists()


@pytest.mark.integration
def test_resume_continues_as_if_never_stopped(bigram_verifier, prompt_file, tmp_path, monkeypatch):  # noqa: F811
    kw = dict(unroll_steps=2, eval_depth=2, steps=30, eval_every=10)
    whole = train_eagle(config(bigram_verifier, prompt_file, tmp_path / "whole", **kw))

    out = tmp_path / "stopped"
    calls = {"n": 0}
    real = eagle_trainer.unrolled_losses

    def interrupt_at_step_25(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eagle_trainer, "unrolled_losses", interrupt_at_step_25)
    assert train_eagle(config(bigram_verifier, prompt_file, out, **kw))["steps"] == 25
    monkeypatch.setattr(eagle_trainer, "unrolled_losses", real)
    # the budget counts this run: none left, so it stops at once, where the last evaluation left the state
    assert train_eagle(config(bigram_verifier, prompt_file, out, resume=True, max_minutes=0.0, **kw))["steps"] == 20
    resumed = train_eagle(config(bigram_verifier, prompt_file, out, resume=True, **kw))
    assert resumed["steps"] == 30
    a, b = whole["head"].state_dict(), resumed["head"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loss = lambda d: [(h["step"], h["loss"]) for h in json.load(open(d / "distill.json"))["history"] if "loss" in h]  # noqa: E731
    assert loss(out) == loss(tmp_path / "whole")
    with pytest.raises(ValueError, match="other settings"):
        train_eagle(config(bigram_verifier, prompt_file, out, resume=True, **{**kw, "seed": 1}))
    with pytest.raises(ValueError, match="no training_state"):
        train_eagle(config(bigram_verifier, prompt_file, tmp_path / "empty", resume=True, **kw))


@pytest.mark.integration
def test_budget_stops_training(bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    result = train_eagle(config(bigram_verifier, prompt_file, tmp_path / "head", max_minutes=0.0, unroll_steps=2))
    assert result["steps"] == 0
    record = json.load(open(tmp_path / "head" / "distill.json"))
    assert [h["step"] for h in record["history"]] == [0]
