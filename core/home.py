"""Where things live: TUNERY_HOME and the folders under it, paths as the registry stores them, and folders written
atomically (a crash leaves nothing half-written)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import TuneryError


def home() -> Path:
    """TUNERY_HOME (default ./.tunery): registry.duckdb, datasets, artifacts, exports, base models."""
    path = Path(os.environ.get("TUNERY_HOME") or ".tunery").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def registry_path() -> Path:
    return home() / "registry.duckdb"


HOME_MARK = "$TUNERY_HOME/"


def home_relative(path: str | Path | None) -> str | None:
    """A path as the registry stores it: `$TUNERY_HOME/REST` when it lies inside TUNERY_HOME, so a worker that mounts
    the shared storage at another path finds it (`in_home` turns it back); anything else (a path outside it, a hub
    id) is kept exactly as given."""
    if path is None or not os.path.isabs(path):
        return None if path is None else str(path)
    p = Path(os.path.abspath(path))
    for root in {home(), Path(os.path.abspath(os.environ.get("TUNERY_HOME") or ".tunery"))}:
        try:
            return HOME_MARK + p.relative_to(root).as_posix()
        except ValueError:
            continue
    return str(path)


def in_home(stored: str | None) -> str | None:
    """The local path of a value the registry stored (see home_relative)."""
    if stored is None or not stored.startswith(HOME_MARK):
        return stored
    return str(home() / stored[len(HOME_MARK):])


def artifacts_dir() -> Path:
    return home() / "artifacts"


def datasets_dir() -> Path:
    return home() / "datasets"


def base_models_dir() -> Path:
    return home() / "base_models"


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `final` only if the block succeeds.

    A crash or an error leaves no half-written artifact behind: the temporary folder is removed. What a user
    recorded is never replaced: an existing `final` is an error, unless `replace` says it is a cache (rebuilt when
    its completion marker is missing).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)

    def refuse() -> None:
        if (final.exists() or final.is_symlink()) and not replace:
            raise TuneryError(f"{final} already exists; tunery never replaces a recorded folder (move it away "
                              "if it is not needed)")

    refuse()
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        refuse()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
