"""The command line's defaults are the config dataclasses' defaults: a flag never writes a default again by hand.

For each command, MAPPED lists the flags that set a config field (and how a flag's value becomes the field's);
its parsed default must equal the field's default. DIFFERENT lists the flags that share a field's name but
deliberately default otherwise, with the reason. Any other flag named after one of the command's config
fields fails the last test: map it, or say why it differs.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from specserve.cli import build_parser
from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from specserve.distill.eagle_trainer import EagleConfig
from specserve.distill.evaluate import EvalConfig
from specserve.distill.trainer import DistillConfig
from specserve.online.trainer_config import OnlineTrainerConfig
from specserve.sampling_params import SamplingParams
from specserve.server.draft_watcher import DraftWatchConfig
from specserve.server.limits import LimitsConfig
from specserve.traffic.store import StoreConfig


def same(value):
    return value


def gib_to_bytes(value: float) -> int:
    return int(value * (1 << 30))


ENGINE = [
    ("dtype", EngineConfig, "dtype", same),
    ("cuda_graphs", EngineConfig, "cuda_graphs", same),
    ("upcast_matmuls", EngineConfig, "upcast_matmuls", same),
    ("batch_invariant", EngineConfig, "batch_invariant", same),
    ("kv_cache_memory", CacheConfig, "kv_cache_memory", gib_to_bytes),
    ("block_size", CacheConfig, "block_size", same),
    ("enable_prefix_caching", CacheConfig, "enable_prefix_caching", same),
    ("max_num_seqs", SchedulerConfig, "max_num_seqs", same),
    ("max_num_batched_tokens", SchedulerConfig, "max_num_batched_tokens", same),
    ("max_model_len", SchedulerConfig, "max_model_len", same),
    ("num_speculative_tokens", SpeculativeConfig, "num_speculative_tokens", same),
    ("max_speculative_tokens", SpeculativeConfig, "max_speculative_tokens", same),
    ("ngram_min", SpeculativeConfig, "ngram_min", same),
    ("ngram_max", SpeculativeConfig, "ngram_max", same),
    ("draft", SpeculativeConfig, "draft", same),  # None; the command then picks the default verifier's draft
]
ENGINE_DIFFERENT = {
    ("device", EngineConfig): "None: cuda when torch sees one, else cpu (default_device); the library's is cpu",
    ("verifier", EngineConfig): "None: the default SmolLM2 verifier; the library requires one",
}

# distill's flags named after the field they set, per config (shared flags feed several configs)
DISTILL_FIELDS = """
verifier traffic max_prompts max_new_tokens teacher_top_m teacher_dtype loss jsd_beta temperature
hard_label_weight batch_size lr steps eval_every seed device
""".split()
EAGLE_FIELDS = """
verifier responses max_sequences max_tokens max_new_tokens teacher_dtype draft_vocab_size feature_weight
feature_noise max_minutes batch_size seed device unroll_steps unroll_decay eval_depth init_head resume feature_layers
""".split()
ONLINE_FIELDS = """
loss jsd_beta temperature batch_size lr eval_every seed device feature_weight feature_noise max_minutes
threads nice gpu_memory_fraction margin w_rejected max_steps poll_seconds
""".split()

MAPPED = {
    "generate": ENGINE
    + [
        ("top_p", SamplingParams, "top_p", same),
        ("top_k", SamplingParams, "top_k", same),
        ("seed", SamplingParams, "seed", same),
    ],
    "serve": ENGINE
    + [
        ("requests_per_minute", LimitsConfig, "requests_per_minute", same),
        ("tokens_per_minute", LimitsConfig, "tokens_per_minute", same),
        ("max_body_bytes", LimitsConfig, "max_body_bytes", same),
        ("max_prompt_tokens", LimitsConfig, "max_prompt_tokens", same),
        ("max_output_tokens", LimitsConfig, "max_output_tokens", same),
        ("draft_poll_seconds", DraftWatchConfig, "poll_seconds", same),
        ("rollback_min_tokens", DraftWatchConfig, "rollback_min_tokens", same),
        ("rollback_margin", DraftWatchConfig, "rollback_margin", same),
        ("trainer_threads", OnlineTrainerConfig, "threads", same),
        ("traffic_retention_days", StoreConfig, "retention_days", same),
        ("traffic_max_gib", StoreConfig, "max_bytes", same),  # None both: no byte bound
    ],
    "distill": [
        *[(name, DistillConfig, name, same) for name in DISTILL_FIELDS],
        *[(name, EagleConfig, name, same) for name in EAGLE_FIELDS],
        *[(name, OnlineTrainerConfig, name, same) for name in ONLINE_FIELDS],
        ("eval_k", EvalConfig, "k", same),
        ("eval_per_category", EvalConfig, "per_category", same),
        ("eval_max_tokens", EvalConfig, "max_tokens", same),
        ("eval_temperatures", EvalConfig, "temperatures", lambda v: tuple(float(t) for t in v.split(","))),
        ("eval_dtype", EvalConfig, "dtype", same),
        ("eval_out", EvalConfig, "out", same),
        ("verifier", EvalConfig, "verifier", same),
        ("seed", EvalConfig, "seed", same),
    ],
}

DIFFERENT = {
    "generate": {
        **ENGINE_DIFFERENT,
        ("max_tokens", SamplingParams): "128: a command-line answer; the API's 16 is OpenAI's",
        ("temperature", SamplingParams): "0: the command line is greedy unless asked; the API samples at 1",
    },
    "serve": {
        **ENGINE_DIFFERENT,
        ("traffic_max_records", StoreConfig): "100000: a server bounds its log; a store opened by hand does not",
        ("trainer_eval_every", OnlineTrainerConfig): "None: the trainer's own default (not passed on)",
        ("trainer_margin", OnlineTrainerConfig): "None: the trainer's own default (not passed on)",
        ("draft_registry", DraftWatchConfig): "None: no watcher (DATA_DIR/drafts with --online-distill)",
    },
    "distill": {
        # --lr, --steps and --eval-every are DistillConfig's for both draft types: with --draft-type eagle the
        # command line has always trained with 5e-4, 1000 steps, eval every 100, not EagleConfig's own defaults
        ("lr", EagleConfig): "DistillConfig's default serves both draft types (EagleConfig's: train_eagle API)",
        ("steps", EagleConfig): "DistillConfig's default serves both draft types (EagleConfig's: train_eagle API)",
        ("eval_every", EagleConfig): "DistillConfig's default serves both draft types",
        ("teacher_top_m", EagleConfig): "0 (DistillConfig's: full distribution); eagle reads 0 as EagleConfig's",
        ("verifier", OnlineTrainerConfig): "None: the default verifier; the trainer's config requires one",
        ("traffic", OnlineTrainerConfig): "None: offline unless --online (which then requires it)",
        ("draft", OnlineTrainerConfig): "None: the default verifier's stand-in draft",
        ("draft", EvalConfig): "None: --eval-only requires it",
        ("max_tokens", EvalConfig): "--max-tokens is EagleConfig's; --eval-max-tokens is EvalConfig.max_tokens",
        ("out", EvalConfig): "--out is the distilled draft's directory; --eval-out is EvalConfig.out",
        ("device", EvalConfig): "None: the command passes EvalConfig.device when no --device is given",
        ("data", DistillConfig): "None: required unless --traffic, --online or --eval-only",
        ("data", EagleConfig): "None: required with --draft-type eagle",
        ("out", DistillConfig): "None: required unless --online or --eval-only",
        ("out", EagleConfig): "None: required with --draft-type eagle",
        ("publish", OnlineTrainerConfig): "None: --online requires it",
    },
}

ENGINE_CONFIGS = {EngineConfig: ("",), CacheConfig: ("",), SchedulerConfig: ("",), SpeculativeConfig: ("",)}
CONFIGS = {
    "generate": {**ENGINE_CONFIGS, SamplingParams: ("",)},
    "serve": {
        **ENGINE_CONFIGS,
        LimitsConfig: ("",),
        DraftWatchConfig: ("", "draft_"),
        OnlineTrainerConfig: ("trainer_",),
        StoreConfig: ("traffic_",),
    },
    "distill": {DistillConfig: ("",), EagleConfig: ("",), OnlineTrainerConfig: ("",), EvalConfig: ("eval_", "")},
}
"""The configs each command's flags set, and the prefixes their flags carry (--eval-k sets EvalConfig.k)."""
REQUIRED_ARGS = {"generate": ["a prompt"], "serve": [], "distill": []}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parsed_defaults(command: str) -> argparse.Namespace:
    return subparser(command).parse_args(REQUIRED_ARGS[command])


def field_default(cls, name: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    assert field.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no plain default"
    return field.default


@pytest.mark.parametrize("command", sorted(MAPPED))
def test_flag_defaults_are_the_config_defaults(command):
    args = parsed_defaults(command)
    wrong = []
    for dest, cls, name, to_config in MAPPED[command]:
        got, want = to_config(getattr(args, dest)), field_default(cls, name)
        if got != want:
            wrong.append(f"--{dest.replace('_', '-')} = {got!r}, {cls.__name__}.{name} = {want!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", sorted(MAPPED))
def test_every_flag_named_after_a_config_field_is_mapped_or_explained(command):
    mapped = {(dest, cls) for dest, cls, _, _ in MAPPED[command]}
    unexplained = []
    for dest in vars(parsed_defaults(command)):
        for cls, prefixes in CONFIGS[command].items():
            fields = {f.name for f in dataclasses.fields(cls)}
            names = {dest.removeprefix(p) for p in prefixes if dest.startswith(p)} & fields
            if names and (dest, cls) not in mapped and (dest, cls) not in DIFFERENT[command]:
                unexplained.append(f"--{dest.replace('_', '-')} ~ {cls.__name__}.{names.pop()}")
    assert not unexplained, "map these flags in MAPPED or give the reason in DIFFERENT:\n" + "\n".join(unexplained)


def test_the_kv_cache_default_is_the_one_serve_has_always_used():
    """1 GiB: what `specserve serve` reserved before CacheConfig became the flag's source (it held 2 GiB)."""
    assert CacheConfig().kv_cache_memory == 1 << 30
    assert parsed_defaults("serve").kv_cache_memory == 1.0


@pytest.mark.parametrize("command", sorted(MAPPED))
def test_the_explained_differences_name_real_flags_and_fields(command):
    args = vars(parsed_defaults(command))
    stale = []
    for (dest, cls), _why in DIFFERENT[command].items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        name = next((dest.removeprefix(p) for p in CONFIGS[command][cls] if dest.removeprefix(p) in fields), dest)
        field = fields.get(name)
        if dest not in args or field is None:
            stale.append(f"--{dest.replace('_', '-')}: no such flag or {cls.__name__} field")
    assert not stale, "\n".join(stale)
