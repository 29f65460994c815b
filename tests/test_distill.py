"""Offline draft distillation: the losses' maths, the prompt readers, the student, and short runs on the tiny verifier
(one process, and two under a torchrun-like environment) whose checkpoint serves as a draft."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig
from specserve.distill.data import Example, apply_chat_template, load_prompts, read_prompts, read_sharegpt, read_text
from specserve.distill.losses import LOSSES, TopM, distill_loss, forward_kl, jsd, reverse_kl, total_variation
from specserve.distill.student import StudentSpec, build_student, parse_layers
from specserve.distill.trainer import DistillConfig, collate, distill

DIVERGENCES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": lambda s, t, temperature=1.0: jsd(s, t, temperature, beta=0.3),
    "tv": total_variation,
}


# ---- losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_divergence_is_zero_when_equal(name):
    logits = torch.randn(6, 17, generator=torch.Generator().manual_seed(0))
    f = DIVERGENCES[name]
    torch.testing.assert_close(f(logits, logits.clone(), 1.7), torch.zeros(6), atol=1e-6, rtol=0)
    # a top-m teacher equals a student that puts all its mass on the same m tokens in the same proportions
    student = torch.full((6, 17), -1e4)
    top = TopM.from_logits(logits, 5)
    student.scatter_(-1, top.ids, top.logprobs)
    torch.testing.assert_close(f(student, top, 1.0), torch.zeros(6), atol=1e-5, rtol=0)


def test_divergences_on_a_hand_example():
    # teacher p = (1/2, 1/2), student q = (1/4, 3/4); logits = log-probs
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    t, s = p.log(), q.log()
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]  # (p + q) / 2
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert forward_kl(s, t).item() == pytest.approx(fkl, abs=1e-6)
    assert reverse_kl(s, t).item() == pytest.approx(rkl, abs=1e-6)
    assert jsd(s, t, beta=0.5).item() == pytest.approx(js, abs=1e-6)
    assert total_variation(s, t).item() == pytest.approx(0.25, abs=1e-6)
    # temperature 2 on doubled logits gives back the same distributions
    assert forward_kl(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(fkl, abs=1e-6)


def test_sparse_teacher_on_a_hand_example():
    # teacher keeps tokens 0 and 1 with log-probs log .3, log .1 -> renormalised (3/4, 1/4), 0 for token 2
    top = TopM(torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.1]]).log())
    q = torch.tensor([[0.5, 0.3, 0.2]])  # student, q_rest = 0.2
    s = q.log()
    assert total_variation(s, top).item() == pytest.approx(0.5 * (0.25 + 0.05 + 0.2), abs=1e-6)
    assert forward_kl(s, top).item() == pytest.approx(
        0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.3), abs=1e-6
    )
    # reverse KL on the support (the student renormalised over {0, 1} is (5/8, 3/8)) plus -log q(S), q(S) = 0.8
    assert reverse_kl(s, top).item() == pytest.approx(
        0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25) - math.log(0.8), abs=1e-6
    )
    beta = 0.3
    p = torch.tensor([0.75, 0.25, 0.0])
    mix = beta * p + (1 - beta) * q[0]
    expected = beta * sum(p[i] * math.log(p[i] / mix[i]) for i in range(2)) + (1 - beta) * sum(
        q[0, i] * math.log(q[0, i] / mix[i]) for i in range(3)
    )
    assert jsd(s, top, beta=beta).item() == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_sparse_top_m_equals_full_when_m_is_the_vocabulary(name):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 23, generator=g), 3 * torch.randn(5, 23, generator=g)
    f = DIVERGENCES[name]
    torch.testing.assert_close(f(s, TopM.from_logits(t, 23), 1.5), f(s, t, 1.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_flow(name, sparse):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 13, generator=g, requires_grad=True)
    t = torch.randn(4, 13, generator=g)
    teacher = TopM.from_logits(t, 4) if sparse else t
    labels = t.argmax(-1)
    loss = distill_loss(s, teacher, name, temperature=2.0, beta=0.3, labels=labels, hard_label_weight=0.2)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_hard_label_weight_mixes_cross_entropy():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    labels = torch.tensor([1, 2, 3, 4])
    ce, kl = F.cross_entropy(s, labels), forward_kl(s, t).mean()
    torch.testing.assert_close(distill_loss(s, t, "fkl", labels=labels, hard_label_weight=1.0), ce)
    torch.testing.assert_close(distill_loss(s, t, "fkl"), kl)
    torch.testing.assert_close(distill_loss(s, t, "fkl", labels=labels, hard_label_weight=0.25), 0.75 * kl + 0.25 * ce)
    with pytest.raises(ValueError, match="loss must be one of"):
        distill_loss(s, t, "kl")
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss(s, t, "fkl", hard_label_weight=0.5)


# ---- data -----------------------------------------------------------------------------------------


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_variants(tmp_path):
    records = [
        {"question_id": 1, "turns": ["first turn", "second turn"]},
        {"question": "How many clips?", "answer": "72"},
        {"prompt": "Write a haiku."},
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi there"}]},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"}]},
        {"answer": "no prompt here"},
        {"question": "   "},
    ]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_prompts(path) == ["first turn", "How many clips?", "Write a haiku.", "hi there", "hello"]
    assert read_prompts(path, limit=2) == ["first turn", "How many clips?"]
    with pytest.raises(ValueError, match="no prompts found"):
        read_prompts(write(tmp_path / "none.jsonl", json.dumps({"answer": "x"})))


def test_truncated_sharegpt(tmp_path):
    convs = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}],
        }
        for i in range(5)
    ]
    text = json.dumps(convs, indent=1)
    cut = text[: text.index('"question 4"') + 5]  # cut off inside the last conversation
    path = write(tmp_path / "sg.json", cut)
    assert read_sharegpt(path) == [f"question {i}" for i in range(4)]
    assert read_prompts(path, limit=2) == ["question 0", "question 1"]
    assert read_prompts(write(tmp_path / "whole.json", text)) == [f"question {i}" for i in range(5)]


def test_text_chunks(tmp_path):
    paragraphs = [f"Speaker {i}:\n" + "word " * 30 for i in range(10)]
    path = write(tmp_path / "t.txt", "\n\n".join(paragraphs))
    chunks = read_text(path, chunk_chars=400)
    assert len(chunks) > 1 and all(len(c) <= 400 for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == "".join(paragraphs).replace("\n", "").replace(" ", "")
    assert read_prompts(path, limit=1) == read_text(path)[:1]


def test_spec_bench_is_refused(tmp_path):
    good = write(tmp_path / "good.jsonl", json.dumps({"prompt": "x"}))
    bench = write(tmp_path / "spec_bench_question.jsonl", json.dumps({"turns": ["x"]}))
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(bench)
    for path in (bench, str(link)):
        with pytest.raises(ValueError, match="evaluation only"):
            read_prompts(path)
    with pytest.raises(ValueError, match="evaluation only"):
        load_prompts([good, bench])


def test_load_prompts_interleaves_files(tmp_path):
    a = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"prompt": f"a{i}"}) for i in range(5)))
    b = write(tmp_path / "b.txt", "b0\n\nb1")
    assert load_prompts([a, b], max_prompts=4) == ["a0", "b0\n\nb1", "a1", "a2"]
    assert load_prompts([a, b]) == ["a0", "b0\n\nb1", "a1", "a2", "a3", "a4"]


def test_collate_marks_response_positions():
    b = collate([Example([1, 2, 3], [4, 5]), Example([6], [7, 8, 9])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t + 1: the rows are the prompt's last token up to the response's second-last
    assert b.rows.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert b.labels.tolist() == [4, 5, 7, 8, 9]
    assert b.input_ids[b.rows.roll(1, dims=1)].tolist() == b.labels.tolist()


# ---- student ---------------------------------------------------------------------------------------


def test_fresh_student_shares_vocabulary_and_projected_embeddings(tiny):
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    student = build_student(tiny["llama"], StudentSpec(layers=1, hidden=32, heads=2, kv_heads=1))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        1,
        32,
        2,
        1,
        16,
    )
    assert c.vocab_size == verifier.config.vocab_size and c.intermediate_size == 64
    e_v, e_s = verifier.model.embed_tokens.weight, student.model.embed_tokens.weight
    assert e_s.dtype == torch.float32
    torch.testing.assert_close(e_s.pow(2).mean(), e_v.pow(2).mean(), rtol=1e-4, atol=0)
    # the projection keeps the geometry: inner products of the top principal part
    assert torch.corrcoef(torch.stack([(e_s @ e_s.T).flatten(), (e_v @ e_v.T).flatten()]))[0, 1] > 0.5
    with pytest.raises(ValueError, match="must divide"):
        build_student(tiny["llama"], StudentSpec(hidden=30, heads=4))


def test_student_from_verifier_layers(tiny):
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32).state_dict()
    student = build_student(tiny["llama"], StudentSpec(init_from_layers=parse_layers("1"))).state_dict()
    assert parse_layers("0-2,5") == (0, 1, 2, 5)
    for name, t in student.items():
        source = name.replace("layers.0.", "layers.1.")
        torch.testing.assert_close(t, verifier[source], rtol=0, atol=0)
    with pytest.raises(ValueError, match="drop --student-hidden"):
        StudentSpec(hidden=32, init_from_layers=(0,))
    with pytest.raises(ValueError, match="verifier has layers 0..1"):
        build_student(tiny["llama"], StudentSpec(init_from_layers=(0, 2)))


# ---- distillation runs -------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
CHECK_PROMPTS = ["The quick brown fox", "def add(a, b):", "To be, or not to be", "Natalia sold clips"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    from tiny_models import CORPUS

    words = " ".join(CORPUS[:6]).split()
    prompts = [" ".join(words[i : i + 3 + i % 5]) for i in range(0, 64, 2)]  # 32 prompts
    path = tmp_path_factory.mktemp("distill_data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    return str(path)


@pytest.fixture(scope="module")
def bigram_verifier(tiny, tmp_path_factory) -> str:
    """tiny["llama"] with its attention and MLP outputs zeroed: the next token depends on the current one only.

    A random-weight verifier's greedy text has no structure a student could learn in 30 steps from 24
    sequences (held-out agreement stays at the frequency of its commonest token); this one's follows a
    fixed token -> token map, so held-out agreement measures whether distillation teaches the student it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path = str(tmp_path_factory.mktemp("bigram"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["llama"]).save_pretrained(path)
    return path


def small_config(verifier: str, prompt_file, out, **kw) -> DistillConfig:
    args = dict(
        data=(prompt_file,),
        out=str(out),
        verifier=verifier,
        loss="fkl",
        student=StudentSpec(layers=1, hidden=32, heads=2, kv_heads=1),
        max_prompts=32,
        max_new_tokens=16,
        generate_batch_size=32,
        batch_size=8,
        lr=1e-2,
        steps=30,
        eval_every=15,
        eval_fraction=0.25,
        device="cpu",
        progress=False,
    )
    args.update(kw)
    return DistillConfig(**args)


@pytest.mark.integration
def test_distillation_raises_agreement_and_serves_as_draft(tiny, bigram_verifier, prompt_file, tmp_path):
    out = str(tmp_path / "draft")
    result = distill(small_config(bigram_verifier, prompt_file, out))
    assert result.final_agreement > result.initial_agreement
    assert result.final_agreement > 0.5  # 0.84 when written; the untrained student: 0
    assert [h["step"] for h in result.history] == [0, 15, 30]
    assert result.cost_ratio["c"] > 0 and 0 < result.cost_ratio["param_ratio"] < 1
    record = json.load(open(os.path.join(out, "distill.json")))
    assert record["status"] == "finished" and record["steps_done"] == 30
    assert record["final_agreement"] == result.final_agreement and record["config"]["loss"] == "fkl"
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")

    cache = CacheConfig(num_blocks=128, block_size=4)
    plain = LLM(tiny["llama"], dtype="float32", cache=cache)
    spec = LLM(tiny["llama"], draft=out, dtype="float32", num_speculative_tokens=2, cache=cache)
    expected = [c.token_ids for c in plain.generate(CHECK_PROMPTS, GREEDY)]
    assert [c.token_ids for c in spec.generate(CHECK_PROMPTS, GREEDY)] == expected
    assert spec.engine.metrics.total_speculation().drafted_tokens > 0
    # served with its own teacher on chat prompts like those it was trained on, its tokens are mostly accepted
    own = LLM(bigram_verifier, draft=out, dtype="float32", num_speculative_tokens=2, cache=cache)
    own.generate(apply_chat_template(own.tokenizer, CHECK_PROMPTS), GREEDY)
    stats = own.engine.metrics.total_speculation()
    assert stats.accepted_tokens > 0.5 * stats.drafted_tokens


def test_config_validation():
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillConfig(data=("x",), out="o", loss="kl")
    with pytest.raises(ValueError, match="jsd_beta"):
        DistillConfig(data=("x",), out="o", jsd_beta=1.0)
    with pytest.raises(ValueError, match="at least one --data"):
        DistillConfig(data=(), out="o")
    with pytest.raises(ValueError, match="evaluation only"):
        DistillConfig(data=("a.txt", "data/spec_bench_question.jsonl"), out="o")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: DistillConfig) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = distill(config)
    assert (result.final_agreement is not None) == (rank == 0)
    with open(os.path.join(os.path.dirname(config.out), f"rank{rank}.sha256"), "w") as f:
        f.write(result.weights_sha256)


@pytest.mark.integration
@pytest.mark.slow  # two fresh interpreters importing torch and transformers: ~40 s on two busy cores
def test_two_process_run_writes_one_checkpoint(tiny, prompt_file, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "draft"
    config = small_config(tiny["llama"], prompt_file, out, steps=4, eval_every=0, max_prompts=16)
    mp.spawn(_worker, args=(2, _free_port(), config), nprocs=2, join=True)
    record = json.load(open(out / "distill.json"))
    assert record["world_size"] == 2 and record["status"] == "finished"
    assert record["num_train_examples"] + record["num_held_out_examples"] == 16
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(str(out) + ".tmp")
    # both ranks end with identical weights (DDP averaged every step's gradients)
    digests = [(tmp_path / f"rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_every_trainer_builds_its_optimizer_from_one_config(prompt_file):
    from specserve.distill.eagle_trainer import EagleConfig
    from specserve.distill.optimizer import OptimizerConfig
    from specserve.online.trainer_config import OnlineTrainerConfig

    assert DistillConfig(data=(prompt_file,), out="o").optimizer_config == OptimizerConfig(5e-4, 0.0, 0.05, 1.0)
    assert EagleConfig(data=(prompt_file,), out="o").optimizer_config == OptimizerConfig(1e-3, 0.0, 0.03, 1.0)
    online = OnlineTrainerConfig(traffic="t.db", publish="p", verifier="v")
    assert online.optimizer_config == OptimizerConfig(5e-4, 0.0, 0.0, 1.0)
    opt = OptimizerConfig(2e-3, 0.1, 0.25, 0.5)
    adamw = opt.adamw([torch.nn.Parameter(torch.ones(2))])
    assert adamw.defaults["lr"] == 2e-3 and adamw.defaults["weight_decay"] == 0.1
    assert opt.warmup_steps(10) == 2
    with pytest.raises(ValueError, match="lr"):
        OptimizerConfig(0.0)
