"""Spectrum layer selection (Hartford et al., 2024, "Spectrum: Targeted Training on Signal to Noise Ratio").

Each 2-D weight matrix of the transformer blocks is scored by the signal-to-noise ratio of its singular values:
the noise level sigma is estimated robustly from the interquartile range of the singular values
(IQR / 1.349, the standard deviation of a normal distribution with that IQR), and the Marchenko-Pastur law bounds
the largest singular value a random m x n matrix of that noise level has: sigma * (1 + sqrt(min(m,n)/max(m,n))).
Singular values above the bound count as signal, the rest as noise; SNR = sum(signal) / sum(noise), divided by
the largest singular value so matrices of different scale compare. Within each kind of matrix (q_proj, down_proj,
...) the top `share` by SNR train at full precision; everything else, embeddings and head included, is frozen.
"""
from __future__ import annotations

import math
import re
from typing import Any

from core.errors import TuneryError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def matrix_snr(weight) -> float:
    """Spectrum's SNR of one weight matrix (computed in float64 for a deterministic, exact ranking)."""
    import torch

    w = weight.detach().to(torch.float64).cpu()
    s = torch.linalg.svdvals(w)
    q75, q25 = torch.quantile(s, 0.75), torch.quantile(s, 0.25)
    sigma = float(q75 - q25) / 1.349
    m, n = w.shape
    threshold = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
    signal = float(s[s > threshold].sum())
    noise = float(s[s <= threshold].sum())
    snr = signal / noise if noise > 0 else float("inf")
    return snr / float(s[0]) if float(s[0]) > 0 else 0.0


def scan(model) -> dict[str, float]:
    """SNR of every Linear weight inside the repeated transformer blocks, keyed by parameter name."""
    import torch

    scores = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _LAYER_INDEX.search(f".{name}."):
            scores[f"{name}.weight"] = matrix_snr(module.weight)
    return scores


def matrix_kind(param_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj`: matrices of one kind compete together."""
    return _LAYER_INDEX.split(param_name, maxsplit=1)[-1].removesuffix(".weight")


def select_matrices(model, share: float) -> dict[str, Any]:
    """Choose the top `share` of each kind of matrix by SNR (ties broken by name, so the choice is deterministic).

    Returns {"share", "selected": [parameter names], "scores": {name: snr}}, which is recorded with the version.
    """
    scores = scan(model)
    if not scores:
        raise TuneryError("spectrum found no per-layer linear weights to score in this model")
    by_kind: dict[str, list[str]] = {}
    for name in scores:
        by_kind.setdefault(matrix_kind(name), []).append(name)
    selected = []
    for kind, names in sorted(by_kind.items()):
        ranked = sorted(names, key=lambda n: (-scores[n], n))
        selected += ranked[:max(1, math.ceil(share * len(ranked)))]
    return {"share": share, "selected": sorted(selected), "scores": {k: round(v, 6) for k, v in scores.items()}}


def freeze_all_but(model, names: list[str]) -> None:
    """Let only the named parameters receive gradients."""
    wanted = set(names)
    for name, param in model.named_parameters():
        param.requires_grad = name in wanted
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise TuneryError(f"spectrum selected parameters the model does not have: {sorted(missing)[:3]}")
