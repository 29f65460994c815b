"""The online trainer on an EAGLE head: features recomputed from the verifier, versions that load_eagle loads.

Traffic comes from the bigram verifier of test_distill (its next token depends on the current one only, so there is
something to learn) serving greedily through our engine with a random, trimmed-vocabulary EAGLE head as its draft,
written through the real SQLite traffic store.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distill import bigram_verifier  # noqa: F401
from test_eagle import build_head
from tiny_models import CORPUS

from specserve import LLM, SamplingParams
from specserve.cli import build_parser, engine_kwargs, main, online_distillation
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.eagle_proposer import EagleProposer
from specserve.engine.engine import LLMEngine
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.model.eagle import load_eagle
from specserve.model.loader import load_model
from specserve.online import registry
from specserve.online.eagle_student import EagleExample, EagleStudent
from specserve.online.examples import is_heldout
from specserve.online.trainer import OnlineTrainer
from specserve.online.trainer_config import OnlineTrainerConfig
from specserve.online.trainer_state import STATE_FILE, TrainerState
from specserve.traffic import open_store
from specserve.traffic.record import TrafficRecord

M = 8
NUM_RECORDS = 32
HELDOUT_FRACTION = 0.25
TOKENS = 16


def prompts(n: int) -> list[str]:
    texts = sorted(set(CORPUS))
    return [texts[i % len(texts)][3 * i % 30 :][:24] for i in range(n)]


@pytest.fixture(scope="module")
def head(bigram_verifier, tmp_path_factory) -> str:  # noqa: F811
    """A random EAGLE head for the bigram verifier over three quarters of its vocabulary."""
    vocab = load_model(bigram_verifier, torch.float32, "cpu").arch.vocab_size
    keep = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[: 3 * vocab // 4]
    return build_head(bigram_verifier, str(tmp_path_factory.mktemp("eagle") / "head"), keep, seed=2)


@pytest.fixture(scope="module")
def traffic(bigram_verifier, head) -> list[TrafficRecord]:  # noqa: F811
    """NUM_RECORDS greedy requests served with the head as the draft (k = 2 a step), as records."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = SpeculativeConfig(draft=head, num_speculative_tokens=2, method="draft")
        config = EngineConfig(
            bigram_verifier, dtype="float32", cache=CacheConfig(num_blocks=512, block_size=4), speculative=spec,
            trace_topm=M,
        )  # fmt: skip
        engine = LLMEngine(config)
        assert isinstance(engine.proposer, EagleProposer)
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts(NUM_RECORDS)]
        done = {}
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    finally:
        torch.set_num_threads(threads)
    return [
        TrafficRecord.from_trace(done[i].trace, key_id="anonymous", created_at=1.0e9 + n) for n, i in enumerate(ids)
    ]


def write_store(url: str, records: list[TrafficRecord]) -> str:
    with open_store(url) as store:
        for r in records:
            store.append(r)
        store.flush(timeout=30)
    return url


def read_all(url: str) -> list[TrafficRecord]:
    with open_store(url) as store:
        return store.read(0, 100_000)


def config(verifier: str, url: str, publish: str, draft: str, **overrides) -> OnlineTrainerConfig:
    options = dict(
        traffic=url, publish=publish, verifier=verifier, draft=draft, lr=3e-3, batch_size=4, eval_every=20,
        max_steps=40, epochs_per_record=50.0, heldout_fraction=HELDOUT_FRACTION, min_heldout_records=2,
        poll_seconds=0.05, threads=1, nice=0, device="cpu", progress=False,
    )  # fmt: skip
    options.update(overrides)
    return OnlineTrainerConfig(**options)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The trainer sets torch's thread count for its process; give the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_recomputed_features_line_up_with_the_logged_targets(bigram_verifier, head, traffic):  # noqa: F811
    """The verifier's output layer over the recomputed feature at each predicting position gives the logged top-1."""
    student = EagleStudent(config(bigram_verifier, "unused", "unused", head), torch.device("cpu"))
    examples = student.examples(traffic)
    assert all(isinstance(e, EagleExample) for e in examples)
    verifier = student.verifier
    agree = rows = 0
    for r, e in zip(traffic, examples):
        assert e.features.dtype == torch.bfloat16 and e.features.shape == (e.input_ids.numel(), 64)
        # the same features as one forward over the whole sequence (nothing was cut at max_seq_tokens = 512)
        tokens = r.prompt_token_ids + r.output_token_ids[:-1]
        assert e.input_ids.tolist() == tokens
        runner = ModelRunner(verifier, 64, 4)
        every = runner.run([TokenRun(tokens, 0, list(range(64)), 1)], keep_features=True).features  # [tokens, hidden]
        torch.testing.assert_close(e.features.float(), every, atol=0.05, rtol=0.02)
        logits = verifier.compute_logits(e.features[e.first_row : e.first_row + e.rows].float())  # [rows, vocab]
        agree += int((logits.argmax(-1) == e.topm_ids[:, 0]).sum())
        rows += e.rows
    assert rows == NUM_RECORDS * TOKENS and agree >= 0.98 * rows  # bf16 storage may flip a near-tie


@pytest.mark.integration
def test_trainer_publishes_an_eagle_version_that_beats_the_initial_head(bigram_verifier, head, traffic, tmp_path):  # noqa: F811
    url = write_store(f"sqlite:///{tmp_path / 'traffic.db'}", traffic)
    records = read_all(url)
    publish = str(tmp_path / "registry")
    cfg = config(bigram_verifier, url, publish, head)
    result = OnlineTrainer(cfg).run()
    assert result.steps == 40 and [e["step"] for e in result.evaluations] == [20, 40]
    assert result.published, result.evaluations
    version = registry.current(publish)
    manifest = registry.verify(publish, version)
    assert manifest["draft_type"] == "eagle" and manifest["loss"] == "fkl"
    assert manifest["verifier"] == registry.verifier_fingerprint(bigram_verifier)
    train = [r for r in records if not is_heldout(r.record_id, HELDOUT_FRACTION)]
    assert manifest["records_seen"] == len(train) and manifest["tokens_seen"] == TOKENS * len(train)
    lineage = [registry.load_manifest(publish, v) for v in result.published]
    assert lineage[0]["parent"] is None and all(m["draft_type"] == "eagle" for m in lineage)

    # the version is an EAGLE checkpoint of this verifier, with the initial head's draft vocabulary
    path = registry.version_dir(publish, version)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["draft_type"] == "eagle"
    verifier = load_model(bigram_verifier, torch.float32, "cpu")
    published, initial = load_eagle(path, verifier, bigram_verifier), load_eagle(head, verifier, bigram_verifier)
    assert published.trimmed and torch.equal(published.draft_vocab, initial.draft_vocab)
    assert manifest["draft_vocab_size"] == initial.draft_vocab_size

    # the claim, measured again: on the held-out records it beats the initial head by the margin, at least
    student = EagleStudent(cfg, torch.device("cpu"))
    heldout = [e for e in student.examples([r for r in records if is_heldout(r.record_id, HELDOUT_FRACTION)]) if e]
    before, after = student.evaluate(student.load(head), heldout), student.evaluate(student.load(path), heldout)
    assert before["acceptance"] == pytest.approx(lineage[0]["parent_heldout_acceptance"], abs=1e-5)
    assert after["acceptance"] == pytest.approx(manifest["heldout_acceptance"], abs=1e-5)
    assert after["acceptance"] >= before["acceptance"] + 0.01 * len(lineage)
    assert after["greedy_agreement"] > before["greedy_agreement"]

    # served as the draft: greedy output is the verifier's, and more of its tokens are accepted than the initial's
    cache = CacheConfig(num_blocks=256, block_size=4)
    check = prompts(NUM_RECORDS + 6)[NUM_RECORDS:]
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    plain = [c.token_ids for c in LLM(bigram_verifier, dtype="float32", cache=cache).generate(check, params)]
    rates = []
    for draft in (head, path):
        llm = LLM(bigram_verifier, draft=draft, dtype="float32", num_speculative_tokens=2, cache=cache)
        assert [c.token_ids for c in llm.generate(check, params)] == plain
        rates.append(llm.engine.metrics.total_speculation().acceptance_rate)
    assert rates[1] > rates[0], rates


def test_the_trainer_follows_current_to_another_draft_type(tiny, bigram_verifier, head, traffic, tmp_path):  # noqa: F811
    url = write_store(f"sqlite:///{tmp_path / 'traffic.db'}", traffic)
    publish = str(tmp_path / "registry")
    trainer = OnlineTrainer(config(bigram_verifier, url, publish, head, max_steps=4, eval_every=2, margin=0.9))
    assert trainer.poll() == NUM_RECORDS
    window = sorted(e.record_id for e in (*trainer.buffer, *trainer.heldout))
    assert window == [r.record_id for r in read_all(url)]
    assert trainer.kind.draft_type == "eagle" and all(isinstance(e, EagleExample) for e in trainer.buffer)
    standalone = registry.publish(  # an operator points CURRENT at a standalone draft of the same vocabulary
        publish, tiny["draft"], heldout_acceptance=0.5, records_seen=0, tokens_seen=0,
        verifier=registry.verifier_fingerprint(bigram_verifier),
    )  # fmt: skip
    result = trainer.run()
    assert trainer.version == standalone and trainer.kind.draft_type == "standalone"
    assert not any(isinstance(e, EagleExample) for e in (*trainer.buffer, *trainer.heldout))
    assert sorted(e.record_id for e in (*trainer.buffer, *trainer.heldout)) == window  # the same window, remade
    assert result.steps == 4 and result.published == [] and registry.current(publish) == standalone


def test_serve_online_distill_takes_an_eagle_draft_and_its_trainer_trains_it(bigram_verifier, head, traffic, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    args = build_parser().parse_args(
        ["serve", "--verifier", bigram_verifier, "--draft", head, "--online-distill", "--data-dir", str(data)]
    )
    watch, argv = online_distillation(args, engine_kwargs(args))
    assert watch.registry == str(data / "drafts") and argv[argv.index("--draft") + 1] == head
    os.makedirs(data)
    url = write_store(argv[argv.index("--traffic") + 1], traffic)
    # the subprocess's command line, run here: it must train the head (a standalone loader would refuse it)
    distill = argv[argv.index("distill") :]
    assert main([*distill, "--max-steps", "3", "--eval-every", "1000", "--nice", "0", "--device", "cpu"]) == 0
    state = TrainerState.load(os.path.join(watch.registry, STATE_FILE))
    assert state.steps == 3 and state.last_record_id == read_all(url)[-1].record_id
    assert main(["distill", "--online", "--draft-type", "eagle", "--traffic", url, "--publish", str(tmp_path)]) == 2
