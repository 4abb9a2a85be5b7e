"""The LM head and its log-softmax only at the positions whose loss is scored, on every device.

trl 1.16 already replaces a trainer's logits with a fused, tiled LM head (`trl.kernels.ChunkedLogProbFunction`:
the vocabulary is projected in tiles, folded into an online log-sum-exp, and recomputed in the backward pass, so
the `[tokens, vocabulary]` logits never exist at once). But off Triton devices it projects every position, prompt
and padding included, and SFT adds full-vocabulary entropy and top-1 bookkeeping on top. In a chat fine-tune the
answer is often less than half of the tokens, and at a 150k vocabulary the head is the largest single matmul.

`install` re-patches the model that trl patched: the same kernel, fed only the hidden states of the scored
positions (labels != -100), on the CPU as on CUDA. The numbers are the same (each position's log-probability is
computed by the same arithmetic); the work is what the answer tokens need. Anything unusual (pre-shifted labels
under sequence parallelism, mixture-of-experts router losses, multimodal wrappers) goes to trl's own head.
"""
from __future__ import annotations

import functools
import types

# Vocabulary columns per tile. trl uses 32768 for GPUs; on a CPU a narrower tile stays in cache and its buffer
# (tokens x columns x 4 bytes) stays small: 1000 answer tokens x 8192 columns is 31 MiB.
VOCAB_CHUNK = 8192


def install(model, outputs: tuple[str, ...] = ("log_probs",)) -> bool:
    """Make `model(..., labels=L, fused_lm_head=True)` project only the positions where L[:, 1:] != -100.

    `model` is the causal LM trl patched (under peft, `peft_model.get_base_model()`); `outputs` are the per-token
    fields to compute (`trl.kernels` names: log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), returned
    in a `trl.trainer.utils.FusedCausalLMOutput` laid out per position like trl's (zero where not scored).
    Returns False, leaving trl's head in place, for models this does not cover (mixture-of-experts, multimodal).
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    if text_config is not model.config or getattr(text_config, "output_router_logits", False) or any(
            getattr(text_config, k, None) is not None for k in ("lm_head_multiplier", "logits_scaling",
                                                                "output_multiplier")):
        return False
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    scale = 1.0 if scale is None else scale
    previous = model.forward  # trl's patched forward (or the model's own): generation and other cases go there

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or shift_labels is not None or labels is None:
            passed = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                          num_items_in_batch=num_items_in_batch)
            return previous(*args, **{k: v for k, v in passed.items() if v is not None and v is not False},
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        targets = labels[:, 1:].to(head.weight.device)
        mask = targets != -100
        picked = ChunkedLogProbFunction.apply(hidden.to(head.weight.device)[mask], head.weight, head.bias,
                                              targets[mask], 1.0, VOCAB_CHUNK, softcap, scale, outputs)
        # masked_scatter keeps an all-unscored micro-batch connected to the graph (a differentiable zero).
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in picked)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True


def unwrapped(model):
    """The causal LM inside a peft wrapper (where trl installs its head), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
