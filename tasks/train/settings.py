"""The settings every training kind shares (cpt, sft, dpo and the distilled student): method (full, LoRA, QLoRA,
Spectrum), schedule, batch, precision, checkpoints and early stopping, each with its help text and, where one was
measured, the trade-off; and the kinds of data a trainer takes."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.models import torch_dtype


class QuantizationConfig(BaseModel):
    """Load the frozen base in fewer bits (bitsandbytes). 4bit + LoRA is QLoRA."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "8bit", "4bit"] = Field("none", description="Bits of the frozen base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 is the QLoRA paper's.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype of the matmuls on de-quantized weights; bf16 is faster on GPUs that have it."
    )

    def to_bnb(self):
        from transformers import BitsAndBytesConfig

        if self.mode == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype),
        )


class LoraSettings(BaseModel):
    """Low-rank adapter shape. alpha / r scales the update; 2x r is the common starting point."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input during training. 0 (no copy of "
                           "each adapted layer's input) trains 1.3x faster at the same loss and held-out perplexity "
                           "as 0.05 (bench/parity.py).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the head."
    )


class SpectrumSettings(BaseModel):
    """Spectrum (Hartford et al., 2024): train only the weight matrices with the highest signal-to-noise ratio."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(0.25, gt=0, le=1, description="Share of the matrices of each kind (q_proj, down_proj, ...) "
                                                       "to train, highest SNR first; the rest stay frozen.")


class TrainingConfig(BaseModel):
    """Hyperparameters every training stage takes."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full", "spectrum"] = Field(
        "lora", description="lora: train an adapter; full: every weight; spectrum: the highest-SNR matrices only.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    spectrum: SpectrumSettings = Field(default_factory=SpectrumSettings)
    epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 means use epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_length: int = Field(512, ge=16, description="Tokens per example; longer ones are cut at the end.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate (LoRA ~1e-4..1e-3, full ~1e-5).")
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent ramping the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate the validation loss every N steps.")
    patience: int | None = Field(None, ge=1, description="Early stopping (needs eval_steps): stop when the validation "
                                 "loss has not improved for this many evaluations in a row; the version is the best "
                                 "evaluation's weights, and the best and the last step are recorded.")
    logging_steps: int = Field(1, ge=1, description="Record loss, learning rate, grad norm and memory every N steps.")
    processes: int = Field(1, ge=1, le=64, description="Data-parallel training processes, one per GPU: above 1 the "
                           "stage runs under `accelerate launch --num_processes N` (on a CPU-only machine, with "
                           "gloo). The batch size is per process.")
    save_steps: int | None = Field(None, ge=1, description="Keep a checkpoint every N steps under "
                                   "TUNERY_HOME/checkpoints; a run that stops is resumed from it by the next run "
                                   "of the same stage with the same inputs. Default: no checkpoints.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast of the trainer: auto is bf16 on capable CUDA GPUs, fp16 on older ones, fp32 "
                            "on CPU and MPS."
    )
    base_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the frozen base weights under LoRA (adapters, optimizer state and the loss "
                            "stay fp32). auto: bf16 on CUDA GPUs with bf16 units, fp32 elsewhere; bf16 on a CPU "
                            "with avx512_bf16 or AMX is opt-in. Full and Spectrum fine-tunes and QLoRA ignore it.")
    gradient_checkpointing: bool | Literal["auto", "selective"] = Field(
        "auto", description="What each decoder layer keeps for the backward pass. selective: the outputs of its "
                            "large matrix multiplications and of attention; norms, RoPE, activations and LoRA's "
                            "rank-r products are recomputed (sft on a 2-core CPU: 0.54x the peak memory of keeping "
                            "everything, 20% slower). true: only the layer's input, everything recomputed (least "
                            "memory, ~30% slower). false: everything kept (fastest). auto: selective on GPUs and "
                            "Apple silicon, where memory is what limits the model size; false on the CPU, where "
                            "time is.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or a positive number of steps")
        if self.patience and not self.eval_steps:
            raise ValueError("patience needs eval_steps: early stopping watches the validation loss measured every "
                             "eval_steps steps")
        if self.patience and self.save_steps and self.save_steps % self.eval_steps:
            raise ValueError(f"with patience, save_steps ({self.save_steps}) must be a multiple of eval_steps "
                             f"({self.eval_steps}): the best checkpoint is one that was evaluated")
        if self.method != "lora" and self.quantization.mode != "none":
            raise ValueError(f"method {self.method} trains full-precision weights and cannot train a quantized "
                             "model; use method: lora for QLoRA")
        return self

    @property
    def quantized(self) -> bool:
        return self.quantization.mode != "none"

    @property
    def adapter(self) -> bool:
        return self.method == "lora"


# How an error message names each kind of prepared data (a stage's class says which kind it trains on).
DATA_KINDS = {"text": 'raw text examples ({"text": ...})', "chat": "chat examples",
              "preference": "preference pairs (prompt/chosen/rejected)"}
