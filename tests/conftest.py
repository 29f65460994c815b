"""Shared pytest setup for the specserve test suite."""

import os

import torch

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when its module is first
# imported, so the switch must be set before any test imports triton. Without a GPU the
# interpreter is the only way to run Triton kernels (on CPU tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from postgres_server import PostgresServer, skip_reason  # noqa: E402
from tiny_models import build_all  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny random checkpoints: 'llama' (GQA), 'qwen2' (q/k/v bias, tied), 'draft', 'tokenizer'."""
    return build_all(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (tests/postgres_server.py), one per test module; skips the test
    with the reason when none can be started here (no server binaries, no psycopg)."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the real SmolLM2 model (minutes on a CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    """A test that takes the `postgres` fixture starts a PostgreSQL server: it is an integration test."""
    for item in items:
        if "postgres" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
