"""TrainerState: what a restarted online trainer needs besides the registry, in DIR/trainer_state.json.

Replaced atomically (a temporary file, fsync, os.replace) after every poll that read records. Knows nothing about
training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a restarted trainer needs besides the registry; DIR/trainer_state.json, replaced atomically."""

    last_record_id: int = 0
    """The newest record read from the store."""
    window_after_id: int = 0
    """Every record in the buffer or the held-out slice has a larger id: a restart re-reads from here."""
    records_seen: int = 0
    """Training records read, over every run of this publish directory (held-out records not counted)."""
    tokens_seen: int = 0
    """Output tokens of those records."""
    steps: int = 0
    """Optimizer steps, over every run."""

    @staticmethod
    def load(path: str) -> TrainerState | None:
        try:
            with open(path) as f:
                data = json.load(f)
            return TrainerState(**{k: int(data[k]) for k in asdict(TrainerState())})
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is not a trainer state file ({e}); delete it to start from the first record"
            ) from e

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
