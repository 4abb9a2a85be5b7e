"""Distillation data (issue 8, first part): teacher answers verbatim, the student's system prompt dropped or
shortened, and the prompt-token saving equal to the token count difference."""
from __future__ import annotations

import pytest

from tasks.common import TuneryError
from tasks.distill import conversation, distill_rows, prompt_tokens_saved, teacher_answers
from tasks.models import load_model, load_tokenizer, prompt_ids

PERSONA = ("You are Fern, a friendly gardening helper. Answer in two short sentences, mention the season when it "
           "matters, and end with 'Happy growing!'. Never recommend chemical pesticides.")
PROMPTS = ["How often should I water basil?", "When do I plant garlic?", "Why are my tomato leaves yellow?"]


def test_batched_teacher_answers_equal_one_at_a_time_greedy(tiny_model_dir):
    import torch

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    batched = teacher_answers(model, tok, PERSONA, PROMPTS, max_new_tokens=12, batch_size=3)
    for prompt, answer in zip(PROMPTS, batched):
        ids = torch.tensor([prompt_ids(tok, conversation(PERSONA, prompt))])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        stop = {tok.eos_token_id, *tok.convert_tokens_to_ids(tok.all_special_tokens)}
        end = next((i for i, t in enumerate(out.tolist()) if t in stop), len(out))
        assert answer == tok.decode(out[:end], skip_special_tokens=True).strip()


@pytest.mark.parametrize("student_system", [None, "You are Fern."])
def test_rows_keep_answers_verbatim_and_swap_the_system_prompt(student_system):
    answers = ["Water it  twice a week.\nHappy growing!", "In autumn. Happy growing!", ""]
    rows = distill_rows(PROMPTS, answers, student_system)
    assert len(rows) == 2  # the empty answer is dropped
    for row, prompt, answer in zip(rows, PROMPTS, answers):
        roles = [m["role"] for m in row["messages"]]
        assert roles == (["system"] if student_system else []) + ["user", "assistant"]
        assert row["messages"][-1]["content"] == answer and row["messages"][-2]["content"] == prompt
        assert all(PERSONA not in m["content"] for m in row["messages"])
    with pytest.raises(TuneryError, match="3 prompts but 2 teacher answers"):
        distill_rows(PROMPTS, answers[:2], None)


def test_prompt_token_saving_is_the_token_count_difference(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    prompt = PROMPTS[0]
    long_ids = tok.apply_chat_template(conversation(PERSONA, prompt), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    short_ids = tok.apply_chat_template(conversation(None, prompt), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    saved = prompt_tokens_saved(tok, PERSONA, None, prompt)
    assert saved == len(long_ids) - len(short_ids) > len(tok(PERSONA)["input_ids"]) - 1
    assert prompt_tokens_saved(tok, PERSONA, PERSONA, prompt) == 0
