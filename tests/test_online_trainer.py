"""The online trainer and the publish side of the draft registry, on real traffic of the tiny models.

Traffic is made by the tiny verifier serving through our engine with a tiny draft (EngineConfig(trace_topm=m)),
turned into TrafficRecords and written through the real SQLite traffic store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from polling import wait_until
from tiny_models import CORPUS

from specserve import SamplingParams
from specserve.cli import main
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.distill.losses import TopM, distill_loss
from specserve.engine.engine import LLMEngine
from specserve.online import registry
from specserve.online.evaluation import evaluate, expected_acceptance
from specserve.online.examples import is_heldout, prepare, rejected_positions
from specserve.online.standalone_student import load_draft
from specserve.online.trainer import OnlineTrainer, trainer_command
from specserve.online.trainer_config import OnlineTrainerConfig
from specserve.online.trainer_state import STATE_FILE, TrainerState
from specserve.traffic import open_store
from specserve.traffic.record import TrafficRecord

M = 8
NUM_RECORDS = 40
HELDOUT_FRACTION = 0.25


@pytest.fixture(scope="module")
def traffic(tiny) -> list[TrafficRecord]:
    """NUM_RECORDS finished requests of the tiny verifier (greedy, k = 2 draft tokens a step), as records."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = SpeculativeConfig(draft=tiny["draft"], num_speculative_tokens=2, method="draft")
        config = EngineConfig(
            tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=512, block_size=4), speculative=spec,
            trace_topm=M,
        )  # fmt: skip
        engine = LLMEngine(config)
        texts = sorted(set(CORPUS))
        prompts = [texts[i % len(texts)][3 * i % 30 :][:24] for i in range(NUM_RECORDS)]
        ids = [
            engine.add_request(p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
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


def write_store(path: str, records: list[TrafficRecord]) -> str:
    url = f"sqlite:///{path}"
    with open_store(url) as store:
        for r in records:
            store.append(r)
        store.flush(timeout=30)
    return url


def read_all(url: str) -> list[TrafficRecord]:
    with open_store(url) as store:
        return store.read(0, 100_000)


def config(tiny, url: str, publish: str, **overrides) -> OnlineTrainerConfig:
    options = dict(
        traffic=url, publish=publish, verifier=tiny["llama"], draft=tiny["draft"], lr=1e-2, batch_size=4,
        eval_every=20, max_steps=60, epochs_per_record=50.0, heldout_fraction=HELDOUT_FRACTION, min_heldout_records=2,
        poll_seconds=0.05,
        threads=1, nice=0, device="cpu", progress=False,
    )  # fmt: skip
    options.update(overrides)
    return OnlineTrainerConfig(**options)


def training_records(records: list[TrafficRecord]) -> list[TrafficRecord]:
    return [r for r in records if not is_heldout(r.record_id, HELDOUT_FRACTION)]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The trainer sets torch's thread count for its process; give the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- the registry ------------------------------------------------------------------------------------------------


def publish_draft(tiny, publish: str, **fields) -> str:
    return registry.publish(
        publish,
        tiny["draft"],
        heldout_acceptance=fields.pop("heldout_acceptance", 0.5),
        records_seen=fields.pop("records_seen", 3),
        tokens_seen=fields.pop("tokens_seen", 30),
        verifier=registry.verifier_fingerprint(tiny["llama"]),
        **fields,
    )


def test_publish_writes_the_contract_layout_and_manifest(tiny, tmp_path):
    publish = str(tmp_path / "registry")
    assert registry.current(publish) is None and registry.list_versions(publish) == []
    v1 = publish_draft(tiny, publish)
    v2 = publish_draft(tiny, publish, parent=v1, parent_heldout_acceptance=0.5, heldout_acceptance=0.6, note="x")
    assert (v1, v2) == ("v0001", "v0002")
    assert registry.list_versions(publish) == [v1, v2]
    with open(os.path.join(publish, "CURRENT")) as f:
        assert f.read().strip() == v2
    assert registry.current(publish) == v2
    path = os.path.join(publish, "versions", v2)
    source_files = sorted(os.listdir(tiny["draft"]))
    assert sorted(os.listdir(path)) == sorted([*source_files, "manifest.json"])
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["version"] == v2 and manifest["parent"] == v1 and manifest["draft_type"] == "standalone"
    assert manifest["heldout_acceptance"] == 0.6 and manifest["parent_heldout_acceptance"] == 0.5
    assert manifest["records_seen"] == 3 and manifest["tokens_seen"] == 30 and manifest["note"] == "x"
    assert manifest["verifier"] == registry.verifier_fingerprint(tiny["llama"])
    assert abs(manifest["created_at"] - time.time()) < 3600
    for name in source_files:
        with open(os.path.join(tiny["draft"], name), "rb") as f:
            assert manifest["sha256"][name] == hashlib.sha256(f.read()).hexdigest()
    assert set(manifest["sha256"]) == set(source_files)
    assert registry.verify(publish, v2) == manifest == registry.load_manifest(publish, v2)
    assert registry.load_manifest(publish, v1)["parent"] is None


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip a byte of the weights", "sha256"),
        ("delete the weights", "missing"),
        ("add a file", "does not list"),
        ("truncate the manifest", "not valid JSON"),
        ("drop a manifest field", "lacks"),
    ],
)
def test_verify_rejects_a_damaged_version(tiny, tmp_path, damage, message):
    publish = str(tmp_path / "registry")
    version = publish_draft(tiny, publish)
    path = os.path.join(publish, "versions", version)
    weights = os.path.join(path, "model.safetensors")
    manifest = os.path.join(path, "manifest.json")
    if damage == "flip a byte of the weights":
        with open(weights, "r+b") as f:
            f.seek(os.path.getsize(weights) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete the weights":
        os.remove(weights)
    elif damage == "add a file":
        with open(os.path.join(path, "extra.bin"), "wb") as f:
            f.write(b"x")
    elif damage == "truncate the manifest":
        with open(manifest, "r+") as f:
            f.truncate(os.path.getsize(manifest) // 2)
    else:
        with open(manifest) as f:
            data = json.load(f)
        del data["verifier"]
        with open(manifest, "w") as f:
            json.dump(data, f)
    with pytest.raises(registry.RegistryError, match=message):
        registry.verify(publish, version)


def test_partial_versions_are_never_current_or_listed(tiny, tmp_path, monkeypatch):
    publish = str(tmp_path / "registry")
    v1 = publish_draft(tiny, publish)
    # a publish killed before its rename leaves a .tmp- directory: invisible
    partial = os.path.join(publish, "versions", registry.TMP_PREFIX + "abc123")
    shutil.copytree(tiny["draft"], partial)
    os.makedirs(os.path.join(publish, "versions", "not-a-version"))
    assert registry.list_versions(publish) == [v1] and registry.current(publish) == v1
    # a publish that fails at the rename leaves CURRENT and the listing as they were, and no temporary directory
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(registry.TMP_PREFIX):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        publish_draft(tiny, publish, parent=v1)
    monkeypatch.undo()
    assert registry.list_versions(publish) == [v1] and registry.current(publish) == v1
    assert sorted(os.listdir(os.path.join(publish, "versions"))) == sorted(
        [v1, registry.TMP_PREFIX + "abc123", "not-a-version"]
    )
    assert registry.remove_partial(publish) == [registry.TMP_PREFIX + "abc123"]
    assert not os.path.exists(partial)
    assert publish_draft(tiny, publish, parent=v1) == "v0002"


def test_publish_and_current_refuse_bad_input(tiny, tmp_path):
    publish = str(tmp_path / "registry")
    with pytest.raises(ValueError, match="tokens_seen"):
        registry.publish(publish, tiny["draft"], heldout_acceptance=0.5, records_seen=1, verifier="f")
    with pytest.raises(ValueError, match="heldout_acceptance"):
        registry.publish(publish, tiny["draft"], heldout_acceptance=1.5, records_seen=1, tokens_seen=1, verifier="f")
    with pytest.raises(ValueError, match="writes"):
        publish_draft(tiny, publish, version="v0009")
    assert registry.list_versions(publish) == []
    os.makedirs(publish, exist_ok=True)
    with open(os.path.join(publish, "CURRENT"), "w") as f:
        f.write("../../etc")
    with pytest.raises(registry.RegistryError, match="not a version name"):
        registry.current(publish)


def test_verifier_fingerprint_tells_verifiers_apart(tiny, tmp_path):
    prints = {name: registry.verifier_fingerprint(tiny[name]) for name in ("llama", "qwen2", "draft")}
    assert len(set(prints.values())) == 3
    copy = str(tmp_path / "llama-copy")
    shutil.copytree(tiny["llama"], copy)
    assert registry.verifier_fingerprint(copy) == prints["llama"]


# ---- the pieces of the trainer -------------------------------------------------------------------------------


def test_rejected_positions_follow_the_steps():
    steps = [("none", 0, 0), ("draft", 3, 1), ("draft", 3, 3), ("ngram", 2, 0), ("draft", 2, 0), ("draft", 4, 2)]
    # emitted: [0] | [1, 2] (rejected at 2) | [3..6] (all accepted + bonus) | [7] (n-gram) | [8] (rejected) | [9..11]
    assert rejected_positions(steps, 12) == [2, 8, 11]
    assert rejected_positions(steps, 10) == [2, 8]  # the request stopped early: positions past it do not exist


def test_prepare_keeps_the_tail_and_aligns_rows():
    n, m = 4, 3
    record = TrafficRecord(
        prompt_token_ids=[10, 11, 12, 13, 14],
        output_token_ids=[20, 21, 22, 23],
        topm_ids=torch.arange(n * m, dtype=torch.int32).reshape(n, m),
        topm_logprobs=torch.full((n, m), -1.0),
        steps=[("none", 0, 0), ("draft", 2, 0), ("draft", 2, 2)],
        draft_version="v0001",
        key_id="anonymous",
        record_id=7,
    )
    e = prepare(record, max_seq_tokens=100, w_rejected=2.0)
    assert e.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert e.first_row == 4 and e.rows == 4  # token 14 predicts output 0
    assert e.weights.tolist() == [1.0, 2.0, 1.0, 1.0]  # the draft step after output 0 was rejected at once
    cut = prepare(record, max_seq_tokens=4, w_rejected=2.0)  # keeps [14, 20, 21, 22]: all four rows
    assert cut.input_ids.tolist() == [14, 20, 21, 22] and cut.first_row == 0 and cut.rows == 4
    cut = prepare(record, max_seq_tokens=2, w_rejected=2.0)  # keeps [21, 22]: rows of outputs 2 and 3
    assert cut.input_ids.tolist() == [21, 22] and cut.first_row == 0
    assert cut.topm_ids.tolist() == record.topm_ids[2:].tolist() and cut.weights.tolist() == [1.0, 1.0]


def test_expected_acceptance_is_the_overlap_on_the_logged_support():
    vocab = 6
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]])
    top = TopM(*reversed(torch.log(p).topk(3, dim=-1)))  # ids, logprobs of the 3 best
    same = torch.log(p)  # the draft is the verifier
    assert expected_acceptance(same, top).item() == pytest.approx(0.9)  # p(S): the unlogged tail is not counted
    full = TopM(*reversed(torch.log(p).topk(vocab, dim=-1)))
    assert expected_acceptance(same, full).item() == pytest.approx(1.0)
    disjoint = torch.tensor([[-30.0, -30.0, -30.0, 0.0, 0.0, 0.0]])
    assert expected_acceptance(disjoint, top).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.log(torch.tensor([[0.25, 0.6, 0.05, 0.05, 0.03, 0.02]]))
    assert expected_acceptance(half, top).item() == pytest.approx(0.25 + 0.3 + 0.05)


def test_weighted_distill_loss_is_a_weighted_mean_of_rows():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    labels = torch.randint(0, 11, (5,))
    teacher = TopM.from_logits(t, 4)
    for w in (0.0, 0.3, 1.0):
        plain = distill_loss(s, teacher, "jsd", labels=labels, hard_label_weight=w)
        ones = distill_loss(s, teacher, "jsd", labels=labels, hard_label_weight=w, weights=torch.ones(5))
        torch.testing.assert_close(ones, plain)
        # weight 2 on row 1 is row 1 counted twice
        weighted = distill_loss(
            s, teacher, "jsd", labels=labels, hard_label_weight=w, weights=torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
        )
        rows = [0, 1, 1, 2, 3, 4]
        twice = distill_loss(
            s[rows], TopM(teacher.ids[rows], teacher.logprobs[rows]), "jsd", labels=labels[rows], hard_label_weight=w
        )
        torch.testing.assert_close(weighted, twice)
    with pytest.raises(ValueError, match="one entry per row"):
        distill_loss(s, teacher, weights=torch.ones(4))


def test_heldout_split_is_stable_and_about_the_fraction():
    ids = range(1, 4001)
    first = [is_heldout(i, 0.1) for i in ids]
    assert first == [is_heldout(i, 0.1) for i in ids]
    assert 0.08 < sum(first) / len(first) < 0.12


# ---- the trainer on real traffic ---------------------------------------------------------------------------------


def test_trainer_raises_heldout_acceptance_and_publishes_a_checked_version(tiny, traffic, tmp_path):
    url = write_store(str(tmp_path / "traffic.db"), traffic)
    records = read_all(url)
    publish = str(tmp_path / "registry")
    result = OnlineTrainer(config(tiny, url, publish)).run()
    assert result.steps == 60 and [e["step"] for e in result.evaluations] == [20, 40, 60]
    assert result.published, result.evaluations
    version = registry.current(publish)
    assert version == result.published[-1] and registry.list_versions(publish) == result.published
    manifest = registry.verify(publish, version)
    train = training_records(records)
    assert manifest["records_seen"] == len(train)
    assert manifest["tokens_seen"] == sum(len(r.output_token_ids) for r in train)
    assert manifest["verifier"] == registry.verifier_fingerprint(tiny["llama"])
    assert manifest["last_record_id"] == records[-1].record_id
    lineage = [registry.load_manifest(publish, v) for v in result.published]
    assert lineage[0]["parent"] is None and [m["parent"] for m in lineage[1:]] == result.published[:-1]
    for m in lineage:
        assert m["heldout_acceptance"] - m["parent_heldout_acceptance"] >= 0.01
    # the claim, checked independently: the published draft beats the initial one on the held-out records
    heldout = [
        prepare(r, 512, 2.0) for r in records if is_heldout(r.record_id, HELDOUT_FRACTION) and r.output_token_ids
    ]
    with open(os.path.join(tiny["llama"], "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cpu = torch.device("cpu")
    before = evaluate(load_draft(tiny["draft"], vocab, cpu), heldout, 512, cpu)
    after = evaluate(load_draft(registry.version_dir(publish, version), vocab, cpu), heldout, 512, cpu)
    assert after["acceptance"] == pytest.approx(manifest["heldout_acceptance"], abs=1e-5)
    assert before["acceptance"] == pytest.approx(lineage[0]["parent_heldout_acceptance"], abs=1e-5)
    assert after["acceptance"] >= before["acceptance"] + 0.01 * len(lineage)
    # the published checkpoint loads in our engine as a draft
    from specserve.model.loader import load_model

    assert load_model(registry.version_dir(publish, version), "float32", "cpu") is not None


def test_a_candidate_short_of_the_margin_is_not_published(tiny, traffic, tmp_path):
    url = write_store(str(tmp_path / "traffic.db"), traffic)
    publish = str(tmp_path / "registry")
    result = OnlineTrainer(config(tiny, url, publish, margin=0.9)).run()
    assert len(result.evaluations) == 3
    assert all(e["candidate"] - e["current"] < 0.9 and e["published"] is None for e in result.evaluations)
    assert result.published == [] and registry.current(publish) is None and registry.list_versions(publish) == []
    # the current draft stayed the initial one: its acceptance is the same at every evaluation
    assert len({round(e["current"], 6) for e in result.evaluations}) == 1


@pytest.mark.integration
def test_the_trainer_trains_a_budget_per_record_then_evaluates_and_idles(tiny, traffic, tmp_path):
    url = write_store(str(tmp_path / "traffic.db"), traffic)
    publish = str(tmp_path / "registry")
    options = dict(epochs_per_record=1.0, eval_every=1000, max_steps=None, max_minutes=0.05, margin=0.0)
    trainer = OnlineTrainer(config(tiny, url, publish, **options))
    result = trainer.run()
    train = training_records(read_all(url))
    assert trainer.state.records_seen == len(train)  # read in the first poll: fewer than a page
    earned = len(train) / 4  # one epoch of batches of 4
    # whatever this machine's speed: the 3 s either outlast the budget (then the trainer idles) or run out
    # first; every step is paid for out of the budget, never more steps than it holds
    assert result.steps <= int(earned)
    assert result.steps + trainer.budget == pytest.approx(earned)
    # one evaluation of what was trained: on going idle, or at the deadline; none repeated while idle
    assert [e["step"] for e in result.evaluations] == ([result.steps] if result.steps else [])


def test_restart_resumes_after_the_last_record_id(tiny, traffic, tmp_path):
    half = NUM_RECORDS // 2
    url = write_store(str(tmp_path / "traffic.db"), traffic[:half])
    publish = str(tmp_path / "registry")
    first = OnlineTrainer(config(tiny, url, publish, max_steps=40, margin=0.0))
    with pytest.raises(ValueError, match="another online trainer"):
        OnlineTrainer(config(tiny, url, publish))
    result = first.run()
    assert result.published, result.evaluations
    old = read_all(url)
    state = TrainerState.load(os.path.join(publish, STATE_FILE))
    assert state.last_record_id == old[-1].record_id
    assert state.records_seen == len(training_records(old))

    with open_store(url) as store:  # the server keeps logging
        for r in traffic[half:]:
            store.append(r)
        store.flush(timeout=30)
    new = [r for r in read_all(url) if r.record_id > state.last_record_id]
    assert len(new) == NUM_RECORDS - half

    second = OnlineTrainer(config(tiny, url, publish, max_steps=5, margin=0.9))
    # it starts from the published version, with the previous window back in memory and nothing counted twice
    current = load_draft(registry.version_dir(publish, registry.current(publish)), second.student.config.vocab_size,
                         torch.device("cpu"))  # fmt: skip
    for a, b in zip(second.student.state_dict().values(), current.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(e.record_id for e in (*second.buffer, *second.heldout)) == [r.record_id for r in old]
    assert second.state.records_seen == state.records_seen
    second.run()
    state2 = TrainerState.load(os.path.join(publish, STATE_FILE))
    assert state2.last_record_id == new[-1].record_id
    assert state2.records_seen == state.records_seen + len(training_records(new))


def test_the_trainer_follows_a_rollback_of_current(tiny, traffic, tmp_path):
    url = write_store(str(tmp_path / "traffic.db"), traffic)
    publish = str(tmp_path / "registry")
    v1 = publish_draft(tiny, publish)  # the 1-layer tiny draft
    v2 = registry.publish(  # a 2-layer one: the verifier itself
        publish, tiny["llama"], parent=v1, heldout_acceptance=0.9, records_seen=3, tokens_seen=30,
        verifier=registry.verifier_fingerprint(tiny["llama"]),
    )  # fmt: skip
    trainer = OnlineTrainer(config(tiny, url, publish, max_steps=20, margin=0.9))
    assert trainer.version == v2 and trainer.student.config.num_hidden_layers == 2
    registry.set_current(publish, v1)  # an operator rolls back
    result = trainer.run()
    assert trainer.version == v1 and trainer.student.config.num_hidden_layers == 1
    records = read_all(url)
    heldout = [prepare(r, 512, 2.0) for r in records if is_heldout(r.record_id, HELDOUT_FRACTION)]
    cpu = torch.device("cpu")
    baseline = evaluate(load_draft(registry.version_dir(publish, v1), trainer.vocab_size, cpu), heldout, 512, cpu)
    assert result.evaluations[0]["current"] == pytest.approx(baseline["acceptance"], abs=1e-6)
    assert registry.current(publish) == v1 and result.published == []


@pytest.mark.integration
def test_killing_the_trainer_leaves_a_verifiable_current_version_and_the_traffic(tiny, traffic, tmp_path):
    url = write_store(str(tmp_path / "traffic.db"), traffic)
    with open_store(url) as store:
        count = store.count()
    publish = str(tmp_path / "registry")
    cmd = trainer_command(url, publish, tiny["draft"], threads=1, verifier=tiny["llama"], device="cpu", eval_every=3,
                          margin=0.0, poll_seconds=0.1, lr=1e-2)  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until(lambda: registry.current(publish) is not None or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert registry.current(publish) is not None, "the trainer published nothing in 300 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    version = registry.current(publish)
    registry.verify(publish, version)
    for v in registry.list_versions(publish):
        registry.verify(publish, v)
    with open_store(url) as store:
        assert store.count() == count
    state = TrainerState.load(os.path.join(publish, STATE_FILE))
    assert 0 < state.last_record_id <= read_all(url)[-1].record_id
    # a new trainer starts from what the killed one published
    again = OnlineTrainer(config(tiny, url, publish, max_steps=1))
    assert again.version == version
    again.close()


def test_cli_checks_the_online_flags(tiny, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    assert main(["distill", "--online", "--publish", str(tmp_path / "r"), "--verifier", tiny["llama"]]) == 2
    assert "--traffic" in capsys.readouterr().err
    online = ["--online", "--traffic", url, "--publish", str(tmp_path / "r"), "--verifier", tiny["llama"]]
    assert main(["distill", *online, "--data", "x.jsonl"]) == 2
    assert "offline" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["distill", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--publish", "d"]) == 2
    assert "--online" in capsys.readouterr().err
    # without any draft to start from
    assert main(["distill", *online, "--max-steps", "1", "--nice", "0"]) == 2
    assert "--draft" in capsys.readouterr().err
