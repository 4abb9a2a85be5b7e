"""What the stages share: the record a stage hands on, device and precision choice, peak memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import TuneryError


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
