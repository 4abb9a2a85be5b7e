"""What every stage shares: the user-facing error type, where things live under TUNERY_HOME, device choice."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class TuneryError(Exception):
    """A problem the user can fix (bad data, bad config, unknown version). The CLI prints it without a traceback."""


class RegistryBusy(TuneryError):
    """The registry stayed locked by another process for longer than the retries wait: trying later can help."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Validate a model name before it becomes part of a path or a version string (`NAME:N`)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise TuneryError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


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


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_utf8(path: Path) -> str:
    """A text file's contents; TuneryError naming the file and the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TuneryError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as "
                          "UTF-8") from None


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@dataclass
class StageResult:
    """What a stage hands to the next one: files on disk plus a small record, never a live model."""

    stage: str
    artifact_path: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    adapter: bool = False  # artifact_path is a LoRA adapter on the model the stage started from
    quantization: dict[str, Any] | None = None  # the QuantizationConfig that adapter was trained against


def resolve_device(requested: str, quantized: bool = False) -> str:
    """Turn `auto|cpu|cuda|mps` into the device to use, applying each backend's fallbacks.

    auto prefers cuda, then mps, then cpu; bitsandbytes has no MPS kernels, so a quantized run under `auto`
    on a Mac uses the CPU (where bitsandbytes works, slowly). Asking for a device that is absent is an error.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if has_cuda:
            return "cuda"
        if has_mps and not quantized:
            return "mps"
        return "cpu"
    if requested == "cuda" and not has_cuda:
        raise TuneryError("device 'cuda' was requested but torch sees no CUDA GPU; use device: auto or cpu")
    if requested == "mps":
        if not has_mps:
            raise TuneryError("device 'mps' was requested but this torch build has no Apple MPS backend")
        if quantized:
            raise TuneryError(
                "quantization (bitsandbytes) does not run on Apple MPS: set quantization.mode: none, or device: cpu"
            )
    return requested


def resolve_precision(requested: str, device: str) -> str:
    """`auto` picks bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU and MPS.

    fp32 on the CPU is deliberate: CPU bf16 autocast was 1.4x faster here but reached a worse loss at an equal
    learning rate (measured on the 2-core CPU the README reports on), and a speed-up only counts at equal loss.
    """
    import torch

    if requested != "auto":
        if requested == "fp16" and device == "cpu":
            raise TuneryError("precision fp16 is not supported for training on the CPU; use fp32 or bf16")
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space so far, in MiB.

    On Linux this reads VmHWM: `ru_maxrss` survives execve, so a child started by a process that had grown
    large (a flow after training) would report its parent's peak instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
