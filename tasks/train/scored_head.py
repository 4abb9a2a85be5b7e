"""The LM head and its log-softmax only at the positions whose loss is scored, on every device.

trl 1.16 already replaces a trainer's logits with a fused, tiled LM head (`trl.kernels.ChunkedLogProbFunction`:
the vocabulary is projected in tiles, folded into an online log-sum-exp, and recomputed in the backward pass, so
the `[tokens, vocabulary]` logits never exist at once). But off Triton devices it projects every position, prompt
and padding included, and SFT adds full-vocabulary entropy and top-1 bookkeeping on top. In a chat fine-tune the
answer is often less than half of the tokens, and at a 150k vocabulary the head is the largest single matmul.

`install` re-patches the model that trl patched so that only the hidden states of the scored positions
(labels != -100) reach the head, on the CPU as on CUDA. With a frozen head (LoRA and QLoRA, where the head is the
frozen, often tied embedding) it goes one step further: each token's log-probability depends on its own hidden
state only, so d log p / d hidden = (onehot - softmax) @ W can be computed in the forward pass, chunk by chunk, and
the backward pass is a row-wise product. That is two matmuls instead of trl's three (its backward recomputes the
logits) and fewer passes over each logits tile, with no logits kept: Liger's and Cut Cross-Entropy's fused heads do
the same on Triton devices, which leaves the CPU to this. A head that trains (full fine-tuning) keeps trl's kernel,
fed the scored positions only. The numbers are the same as the full computation (tests/test_speed_paths.py checks
loss and gradients to 1e-5). Anything unusual (pre-shifted labels under sequence parallelism, mixture-of-experts
router losses, multimodal wrappers, soft-capped or scaled logits for the frozen-head path) goes to trl's own head.
"""
from __future__ import annotations

import functools
import types

# Vocabulary columns per tile of trl's kernel. trl uses 32768 for GPUs; on a CPU a narrower tile stays in cache and
# its buffer (tokens x columns x 4 bytes) stays small: 1000 answer tokens x 8192 columns is 31 MiB.
VOCAB_CHUNK = 8192
# Logits elements per token chunk of the frozen-head path: 16M fp32 values (64 MiB), e.g. 341 tokens at a 49k
# vocabulary, 110 at 152k.
CHUNK_ELEMENTS = 1 << 24


def frozen_head_logprobs(hidden, weight, bias, targets, outputs: tuple[str, ...] = ("log_probs",)) -> tuple:
    """Per-token log p(target) under logits = hidden @ weight.T + bias, for a head that does not train, and the
    trl-named extras in `outputs` (entropy, mean_logits, is_top1; for logging, without gradient). Returns a
    5-tuple laid out as `trl.kernels.ChunkedLogProbFunction`'s. Differentiable with respect to `hidden` only."""
    import torch

    n, vocab = hidden.shape[0], weight.shape[0]
    extras = {k: torch.empty(n, dtype=torch.bool if k == "is_top1" else torch.float32, device=hidden.device)
              for k in outputs if k in ("entropy", "mean_logits", "is_top1")}

    class ScoredLogProbs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets):
            want_grad = ctx.needs_input_grad[0]
            logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            grad = torch.empty((n, hidden.shape[1]), dtype=torch.float32, device=hidden.device) if want_grad else None
            step = max(1, CHUNK_ELEMENTS // vocab)
            for s in range(0, n, step):
                e = min(s + step, n)
                z = hidden[s:e] @ weight.t() if bias is None else torch.addmm(bias, hidden[s:e], weight.t())
                z = z.float()
                lse = torch.logsumexp(z, dim=-1)
                t = targets[s:e]
                logp[s:e] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse
                if "mean_logits" in extras:
                    extras["mean_logits"][s:e] = z.mean(-1)
                if "is_top1" in extras:
                    extras["is_top1"][s:e] = z.argmax(-1) == t
                if "entropy" in extras or want_grad:
                    log_p = z.sub_(lse.unsqueeze(-1))  # in place: the logits are not needed any more
                    if "entropy" in extras:  # H = -sum(p log p)
                        extras["entropy"][s:e] = -(log_p.exp() * log_p).sum(-1)
                if want_grad:
                    p = log_p.exp_()
                    p[torch.arange(e - s, device=p.device), t] -= 1  # softmax - onehot = -d log p / d logits
                    grad[s:e] = (p.to(weight.dtype) @ weight).float().neg_()
            ctx.save_for_backward(grad)
            ctx.hidden_dtype = hidden.dtype
            return logp

        @staticmethod
        def backward(ctx, grad_logp):
            (grad,) = ctx.saved_tensors
            return (grad * grad_logp.unsqueeze(-1)).to(ctx.hidden_dtype), None, None, None

    log_probs = ScoredLogProbs.apply(hidden, weight, bias, targets)
    return (log_probs, extras.get("entropy"), None, extras.get("mean_logits"), extras.get("is_top1"))


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
        scored = hidden.to(head.weight.device)[mask]
        frozen = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
        if frozen and softcap is None and scale == 1.0 and "log_sum_sq_probs" not in outputs:
            picked = frozen_head_logprobs(scored, head.weight, head.bias, targets[mask], outputs)
        else:
            picked = ChunkedLogProbFunction.apply(scored, head.weight, head.bias, targets[mask], 1.0, VOCAB_CHUNK,
                                                  softcap, scale, outputs)
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
