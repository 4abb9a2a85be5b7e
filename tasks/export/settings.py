"""How a version is exported (ExportConfig) and what a promotion demands of the export (GateConfig). The GGUF
file itself is written by llama.cpp's own converter (tasks/export/convert.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import TuneryError


class ExportConfig(BaseModel):
    """How a version becomes a GGUF + Modelfile, and how much of it is checked with llama.cpp."""

    model_config = ConfigDict(extra="forbid")

    quant: str = Field("q4_k_m", description="f32, f16, or a llama.cpp quantization: q8_0, q6_k, q5_k_m, q4_k_m, "
                                              "q4_0, q3_k_m, q2_k.")
    system: str | None = Field(None, description="The Modelfile's SYSTEM prompt (e.g. the one the data trained with).")
    num_ctx: int | None = Field(None, ge=64, description="The Modelfile's num_ctx (context length Ollama allocates).")
    parameters: dict[str, str | int | float] = Field(default_factory=dict,
                                                     description="More Modelfile PARAMETERs, e.g. temperature: 0.7.")
    template: str | None = Field(None, description="An Ollama TEMPLATE to use instead of the one derived from the "
                                                   "chat template; it is still checked against the chat template.")
    max_new_tokens: int = Field(48, ge=4, le=1024, description="Tokens per greedy comparison with HF.")
    answer_tokens: int = Field(256, ge=4, le=4096, description="Most tokens a sample answer may take before it "
                                                               "counts as not stopping (endless generation).")
    answer_rows: int = Field(16, ge=0, description="Held-out prompts the exported file answers through llama.cpp "
                             "with the Modelfile, scored against the reference answers like transformers' answers "
                             "(gguf_answer_* metrics; 0: none).")
    heldout_rows: int = Field(16, ge=1, description="Held-out examples for the perplexity and KL checks.")
    window: int = Field(512, ge=32, description="Tokens per held-out example in those checks (longer are cut).")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads; default: every core.")
    keep_full_precision: bool = Field(False, description="Keep the F16 file a quantized export was made from.")

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        from tasks.export.verify import QUANTS

        if v not in QUANTS:
            raise ValueError(f"unknown quantization {v!r}; one of {', '.join(QUANTS)}")
        return v


class GateConfig(BaseModel):
    """What a promotion demands of the candidate's export before the alias moves to it."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field("production", description="The alias to move: NAME@ALIAS.")
    max_perplexity_increase_pct: float = Field(2.0, ge=0, description="Held-out perplexity of the candidate's GGUF "
                                               "may exceed the current holder's (same tokens, same run) by this %.")
    min_decode_tokens_per_s: float = Field(5.0, ge=0, description="llama.cpp decode speed the export must reach.")
    max_mean_kl: float = Field(0.1, ge=0, description="Mean per-token KL(fp32 || export) on held-out data, nats.")
    max_general_drop_pct: float | None = Field(None, ge=0, description="Points of general multiple-choice accuracy "
                                               "(the forgetting check) the exported file may have lost against the "
                                               "version's first parent; null: not gated.")
    min_answer_f1: float | None = Field(None, ge=0, le=1, description="Token F1 the exported file's held-out answers "
                                        "must reach against the reference answers; null: not gated.")
    require_checks: list[str] = Field(
        default_factory=lambda: ["modelfile", "loads", "tokenization", "greedy", "template", "answers_stop",
                                 "context"],
        description="Export checks that must pass.")

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, v: str) -> str:
        import re

        from core.errors import check_name

        try:
            check_name(v, "alias")
        except TuneryError as e:
            raise ValueError(str(e)) from None
        if re.match(r"^v\d+-", v):
            raise ValueError(f"alias {v!r} looks like an export tag (vN-QUANT); pick another name")
        return v
