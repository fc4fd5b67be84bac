"""Content-keyed on-disk cache for generated artefacts, safe across concurrent processes."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when generation code changes in a way that alters outputs, so old caches are not reused.
GENERATOR_VERSION = "1"
COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    """Root of all cached artefacts: $SGLANG_FORK_CACHE or ~/.cache/sglang-fork."""
    env = os.environ.get("SGLANG_FORK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sglang-fork"


def params_key(params: dict[str, Any]) -> str:
    """Short stable hash of the generation parameters plus the generator version."""
    blob = json.dumps(params, sort_keys=True, default=str) + GENERATOR_VERSION
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def keyed_dir(kind: str, params: dict[str, Any]) -> Path:
    """Directory where the artefact of `kind` built from `params` lives (may not exist yet)."""
    return cache_root() / "checkpoints" / f"{kind}-{params_key(params)}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def ensure_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first if needed.

    `build(tmp)` fills a fresh temp dir beside `target`; it is renamed into place only when
    complete, so readers never see a half-written dir. An fcntl lock on a sibling lock file
    serialises concurrent builders (e.g. two pytest processes): the loser waits and reuses.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_complete(target):
                return target
            if target.exists():  # stale leftover without marker (crashed builder)
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
            try:
                build(tmp)
                (tmp / COMPLETE_MARKER).write_text("")
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def ensure_file(target: Path, build: Callable[[Path], None]) -> Path:
    """Like ensure_dir for a single file: `build(tmp_file)` writes it, then an atomic rename."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # identical content from any racer, so last-writer-wins is fine
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
