"""The draft registry: a publish directory of immutable, checksummed draft versions and a pointer to the current one.

```
DIR/versions/v0001/   HF-format draft checkpoint + manifest.json
DIR/versions/v0002/
DIR/CURRENT           the current version's name, e.g. "v0002\\n"
```

A version is written under DIR/versions/.tmp-<random>/ (files fsynced, manifest with the sha256 of every other file
last), renamed into place, and only then named by CURRENT (written to CURRENT.tmp, fsynced, os.replace). So a
writer killed at any point leaves CURRENT naming a complete version (or absent); a leftover .tmp-* directory is
never listed. Readers check a version with `verify` before trusting it.

The publish side (one writer per directory: the online trainer) and the read-only helpers live here as
functions; knows nothing about training or serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time

VERSIONS = "versions"
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
DRAFT_TYPES = ("standalone", "eagle")
VERSION_RE = re.compile(r"v(\d{4,})")
REQUIRED_FIELDS = ("heldout_acceptance", "records_seen", "tokens_seen", "verifier")
"""Fields the caller of `publish` must give; parent, parent_heldout_acceptance and draft_type have defaults."""
MANAGED_FIELDS = ("version", "created_at", "sha256")
"""Fields `publish` writes itself."""


class RegistryError(ValueError):
    """A publish directory or version that is missing, incomplete, corrupted or malformed."""


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_dir(dir: str, version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise RegistryError(f"bad version name {version!r}: expected 'v' and at least 4 digits, e.g. 'v0001'")
    return os.path.join(dir, VERSIONS, version)


def list_versions(dir: str) -> list[str]:
    """Published versions, oldest first; temporary (.tmp-*) and unrelated entries are ignored."""
    root = os.path.join(dir, VERSIONS)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if VERSION_RE.fullmatch(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=lambda n: int(n[1:]))


def current(dir: str) -> str | None:
    """The version CURRENT names, or None when nothing has been published yet."""
    try:
        with open(os.path.join(dir, CURRENT)) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.fullmatch(text):
        raise RegistryError(f"{os.path.join(dir, CURRENT)} holds {text!r}, not a version name like 'v0001'")
    return text


def load_manifest(dir: str, version: str) -> dict:
    path = os.path.join(version_dir(dir, version), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise RegistryError(f"version {version!r} of {dir!r} has no {MANIFEST}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise RegistryError(f"{path} holds a {type(manifest).__name__}, expected a JSON object")
    missing = [k for k in (*MANAGED_FIELDS, *REQUIRED_FIELDS, "parent", "draft_type") if k not in manifest]
    if missing:
        raise RegistryError(f"{path} lacks the fields {missing}")
    if manifest["version"] != version:
        raise RegistryError(f"{path} says version {manifest['version']!r}, but it lies in {version!r}")
    if not isinstance(manifest["sha256"], dict) or not manifest["sha256"]:
        raise RegistryError(f"{path}: 'sha256' must map file names to digests, got {manifest['sha256']!r}")
    return manifest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(dir: str, version: str) -> dict:
    """The version's manifest, after checking that its files are exactly those listed, with matching sha256.

    Raises RegistryError naming the first missing, unlisted or altered file (or the manifest's defect).
    """
    path = version_dir(dir, version)
    if not os.path.isdir(path):
        raise RegistryError(f"version {version!r} does not exist in {os.path.join(dir, VERSIONS)}")
    manifest = load_manifest(dir, version)
    listed = manifest["sha256"]
    present = {n for n in os.listdir(path) if n != MANIFEST}
    missing = sorted(set(listed) - present)
    if missing:
        raise RegistryError(f"version {version!r} is missing {missing} (listed in its manifest)")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise RegistryError(f"version {version!r} holds {unlisted}, which its manifest does not list")
    for name, expected in sorted(listed.items()):
        actual = sha256_file(os.path.join(path, name))
        if actual != expected:
            raise RegistryError(f"version {version!r}: {name} has sha256 {actual}, its manifest says {expected}")
    return manifest


def verifier_fingerprint(verifier_dir: str) -> str:
    """sha256 of the verifier's config.json bytes and its vocabulary size: a draft is only valid for this verifier."""
    path = os.path.join(verifier_dir, "config.json")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        vocab_size = json.loads(raw)["vocab_size"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} is not a model config with a vocab_size: {e}") from e
    return hashlib.sha256(raw + f"\nvocab_size={vocab_size}".encode()).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def set_current(dir: str, version: str) -> None:
    """Point CURRENT at an existing version, atomically (CURRENT.tmp, fsync, os.replace)."""
    if not os.path.isdir(version_dir(dir, version)):
        raise RegistryError(f"cannot make {version!r} current: it is not a version in {os.path.join(dir, VERSIONS)}")
    tmp = os.path.join(dir, CURRENT + ".tmp")
    _write_synced(tmp, version + "\n")
    os.replace(tmp, os.path.join(dir, CURRENT))
    _fsync_dir(dir)


def remove_partial(dir: str) -> list[str]:
    """Delete leftover .tmp-* directories of publishes that were killed; only for the directory's single writer."""
    root = os.path.join(dir, VERSIONS)
    if not os.path.isdir(root):
        return []
    removed = [n for n in os.listdir(root) if n.startswith(TMP_PREFIX)]
    for n in removed:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return removed


def _check_fields(fields: dict) -> dict:
    managed = [k for k in MANAGED_FIELDS if k in fields]
    if managed:
        raise ValueError(f"publish writes {managed} itself; do not pass them")
    missing = [k for k in REQUIRED_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"publish needs the manifest fields {missing}")
    out = {"parent": None, "parent_heldout_acceptance": None, "draft_type": "standalone", **fields}
    if out["draft_type"] not in DRAFT_TYPES:
        raise ValueError(f"draft_type must be one of {DRAFT_TYPES}, got {out['draft_type']!r}")
    for name in ("records_seen", "tokens_seen"):
        if not isinstance(out[name], int) or out[name] < 0:
            raise ValueError(f"{name} must be an int >= 0, got {out[name]!r}")
    for name in ("heldout_acceptance", "parent_heldout_acceptance"):
        v = out[name]
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    if out["parent"] is not None and not VERSION_RE.fullmatch(str(out["parent"])):
        raise ValueError(f"parent must be a version name like 'v0001' or None, got {out['parent']!r}")
    try:
        json.dumps(out)
    except TypeError as e:
        raise ValueError(f"manifest fields must be JSON-serialisable: {e}") from e
    return out


def publish(dir: str, checkpoint_dir: str, **manifest_fields) -> str:
    """Copy the checkpoint in `checkpoint_dir` (a flat HF directory) into the next version and make it current.

    `manifest_fields`: heldout_acceptance, records_seen, tokens_seen, verifier (a `verifier_fingerprint`) are
    required; parent, parent_heldout_acceptance (default None) and draft_type (default "standalone") optional;
    any other JSON-serialisable field is kept as given. Returns the new version's name.
    """
    fields = _check_fields(manifest_fields)
    names = sorted(n for n in os.listdir(checkpoint_dir) if n != MANIFEST)
    subdirs = [n for n in names if not os.path.isfile(os.path.join(checkpoint_dir, n))]
    if subdirs:
        raise ValueError(f"{checkpoint_dir} holds {subdirs}: a draft checkpoint must be a flat directory of files")
    if "config.json" not in names:
        raise ValueError(f"{checkpoint_dir} has no config.json: not an HF checkpoint directory")
    root = os.path.join(dir, VERSIONS)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root)
    try:
        digests = {}
        for n in names:
            shutil.copyfile(os.path.join(checkpoint_dir, n), os.path.join(tmp, n))
            with open(os.path.join(tmp, n), "rb+") as f:
                os.fsync(f.fileno())
            digests[n] = sha256_file(os.path.join(tmp, n))
        number = max((int(v[1:]) for v in list_versions(dir)), default=0) + 1
        while True:
            version = version_name(number)
            manifest = {"version": version, "created_at": time.time(), **fields, "sha256": digests}
            _write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2) + "\n")
            _fsync_dir(tmp)
            try:
                os.rename(tmp, os.path.join(root, version))
                break
            except OSError:
                if not os.path.exists(os.path.join(root, version)):
                    raise
                number += 1  # someone else took this name: a version, once published, is never replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    set_current(dir, version)
    return version
