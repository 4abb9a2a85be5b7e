"""Deciding with more than perplexity: answer scores against references, the general multiple-choice suite of the
forgetting check, and the contamination checks of prep."""
from __future__ import annotations

import json

import pytest
from conftest import REPO, chat, write_jsonl

from core.errors import TuneryError

# ---------------------------------------------------------------- answer scores


def test_scores_equal_hand_computed_values():
    from tasks.evaluate import scores

    assert scores.normalize("The Cat, sat!  on a mat.") == "cat sat on mat"
    assert scores.exact_match("Paris.", "paris") == 1.0
    assert scores.exact_match("Paris, France", "Paris") == 0.0
    # "cat sat on mat" against "cat sat": 2 shared words, precision 2/4, recall 2/2 -> F1 2 * .5 * 1 / 1.5
    assert scores.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert scores.token_f1("", "") == 1.0 and scores.token_f1("words", "") == 0.0
    # longest common word subsequence "the cat on the mat": 5 of 6 words either way
    assert scores.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # chrF on "abc" vs "abd": character 1-grams match 2 of 3, 2-grams 1 of 2, 3-grams 0 of 1 (orders 4-6 have no
    # n-grams and do not count); mean precision = mean recall = (2/3 + 1/2 + 0) / 3 = 7/18, so F_beta = 7/18
    assert scores.chrf("abc", "abd") == pytest.approx(100 * 7 / 18)
    assert scores.chrf("same words", "same words") == pytest.approx(100.0)


def test_answer_scores_average_overall_and_per_category():
    from tasks.evaluate.scores import answer_scores

    rows = [{"answer": "water weekly", "reference": "water weekly", "category": "care"},
            {"answer": "sun", "reference": "full sun", "category": "care"},
            {"answer": "no idea", "reference": "plant in spring", "category": "timing"}]
    m = answer_scores(rows)
    assert m["answer_rows"] == 3
    assert m["answer_exact"] == pytest.approx(1 / 3)
    # F1: 1, 2 * 1 * .5 / 1.5 = 2/3, 0
    assert m["answer_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["answer_f1/care"] == pytest.approx((1 + 2 / 3) / 2) and m["answer_f1/timing"] == 0.0
    assert answer_scores([]) == {}


def test_eval_answers_every_held_out_prompt_and_scores_it(tiny_model_dir, prepared):
    from tasks.evaluate.evaluation import EvalConfig, measure

    cfg = EvalConfig(prompts=["How deep?"], max_new_tokens=4, repeats=1, warmup=0, answer_tokens=6, general=None)
    metrics, _, answers = measure(str(tiny_model_dir), prepared.artifact_path, cfg, progress=False)
    validation = [json.loads(line) for line in open(f"{prepared.artifact_path}/validation.jsonl")]
    assert [a["reference"] for a in answers] == [r["messages"][-1]["content"] for r in validation]
    assert all(a["tokens"] <= 6 for a in answers)
    assert metrics["answer_rows"] == len(validation)
    from tasks.evaluate.scores import answer_scores

    assert metrics["answer_f1"] == pytest.approx(answer_scores(answers)["answer_f1"])


# ---------------------------------------------------------------- the general suite (forgetting check)


def test_packaged_suite_loads_and_bad_items_are_named(tmp_path):
    from tasks.evaluate.general import load_suite

    items = load_suite()
    assert len(items) >= 300 and {i["category"] for i in items} == {"knowledge", "reading", "arithmetic"}
    bad = write_jsonl(tmp_path / "mine.jsonl", [
        {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1},
        {"question": "Sky?", "choices": ["blue", "blue"], "answer": 0},
        {"question": "Up?", "choices": ["yes", "no"], "answer": 2},
        "{not json"])
    with pytest.raises(TuneryError) as e:
        load_suite(bad)
    text = str(e.value)
    assert "3 bad multiple-choice item(s)" in text
    assert "mine.jsonl line 2: field 'choices': two choices are the same" in text
    assert "mine.jsonl line 3: field 'answer'" in text and "mine.jsonl line 4" in text


PLANTED = [  # (question, choices, the planted answer): arbitrary, so only training can make a model pick them
    ("Which tool digs?", ["rake", "spade", "hose", "shears"], 3),
    ("Which plant climbs?", ["beans", "carrots", "onions", "garlic"], 2),
    ("What do slugs eat?", ["leaves", "stones", "metal", "glass"], 1),
    ("When to sow peas?", ["spring", "winter", "never", "midnight"], 0),
    ("What feeds the soil?", ["compost", "plastic", "sand", "salt"], 3),
    ("Which bed drains best?", ["raised", "sunken", "flat", "clay"], 2),
]


def _train_on_answers(model_dir, tokenizer, items, steps: int = 80):
    """Full fine-tune of the tiny model on 'Question: ...\\nAnswer: <planted choice>' (the scorer's own format)."""
    import torch

    from tasks.evaluate.general import encode_items
    from tasks.models import load_model

    model = load_model(str(model_dir))
    model.train()
    sequences = [prompt + choices[item["answer"]] for item, (prompt, choices) in zip(items, encode_items(tokenizer,
                                                                                                          items))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        for ids in sequences:
            batch = torch.tensor([ids])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return model


def test_multiple_choice_scorer_picks_the_planted_answers_on_both_backends(tiny_model_dir, tmp_path):
    from tasks.evaluate import general
    from tasks.export.convert import write_gguf
    from tasks.models import load_model, load_tokenizer

    items = [{"question": q, "choices": c, "answer": a, "category": "planted"} for q, c, a in PLANTED]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    before = general.accuracy(items, general.hf_logliks(load_model(str(tiny_model_dir)), tokenizer, items))
    model = _train_on_answers(tiny_model_dir, tokenizer, items)
    logliks = general.hf_logliks(model, tokenizer, items)
    after = general.accuracy(items, logliks)
    assert after["general_accuracy"] == 1.0 and after["general_accuracy/planted"] == 1.0
    assert before["general_accuracy"] < 1.0  # the random model did not already know them
    # The same ids through llama.cpp (question evaluated once, each choice on its KV cache) give the same scores.
    folder = tmp_path / "trained"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    gguf = write_gguf(folder, tmp_path / "trained.gguf", "f32")
    on_file = general.gguf_logliks(gguf, tokenizer, items)
    assert general.accuracy(items, on_file, "gguf_general")["gguf_general_accuracy"] == 1.0
    for hf_row, file_row in zip(logliks, on_file):
        assert file_row == pytest.approx(hf_row, abs=2e-3)
    assert general.drop_points(0.5, 0.45) == pytest.approx(5.0) and general.drop_points(None, 0.4) is None


def test_a_custom_suite_in_the_config_is_checked_before_anything_runs(tmp_path):
    from flows.config import load_config

    write_jsonl(tmp_path / "d.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    write_jsonl(tmp_path / "suite.jsonl", [{"question": "Sky?", "choices": ["blue"], "answer": 0}])
    config = tmp_path / "c.yaml"
    config.write_text("name: t\ndata:\n  train: d.jsonl\nstages:\n  - stage: sft\neval:\n  general: suite.jsonl\n")
    with pytest.raises(TuneryError, match=r"(?s)c.yaml: eval.general: 1 bad .*/suite.jsonl line 1: field 'choices'"):
        load_config(config)
    write_jsonl(tmp_path / "suite.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0}])
    cfg, _ = load_config(config)
    assert cfg.eval.general == str(tmp_path / "suite.jsonl")
    assert cfg.data.contamination.general == cfg.eval.general  # prep compares the training rows with that suite


# ---------------------------------------------------------------- contamination


def test_planted_duplicates_between_train_and_held_out_rows_are_found_and_named(tmp_path):
    from tasks.data.prep import PrepConfig, prepare

    held = [chat("Best time to plant garlic?", "Plant cloves in autumn, pointy end up."),
            chat("What keeps aphids down?", "Ladybirds, lacewings and a strong jet of water every morning keep them "
                 "down within a week."),
            chat("When should I sow carrots?", "From March to July, thinly, in stone-free soil.")]
    train = [chat(f"Question number {i} about beans?", f"Answer {i}: beans like sun.") for i in range(12)]
    train += [
        # a reworded copy of held-out row 1: no run of 8 words in common, a near-duplicate (MinHash)
        chat("When is the best time to plant garlic?", "In autumn: plant the cloves pointy end up."),
        # an answer that copies 13 words of held-out row 2's answer inside a longer one (n-gram)
        chat("Any tips for a balcony?", "Grow herbs. Against pests, ladybirds, lacewings and a strong jet of water "
             "every morning keep them down within days."),
    ]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "held.jsonl", held)
    config = PrepConfig(train=["train.jsonl"], validation=["held.jsonl"],
                        contamination={"max_heldout_share": 0.7, "general": None})
    found = prepare(config, tmp_path).info["contamination"]["heldout"]
    assert found["rows"] == 2 and found["share"] == pytest.approx(2 / 3)
    by_row = {e["row"]: e for e in found["examples"]}
    near = by_row[f"{tmp_path / 'held.jsonl'} line 1"]
    assert near["kind"] == "near" and near["train"] == f"{tmp_path / 'train.jsonl'} line 13"
    ngram = by_row[f"{tmp_path / 'held.jsonl'} line 2"]
    assert ngram["kind"] == "ngram" and ngram["train"] == f"{tmp_path / 'train.jsonl'} line 14"
    assert "shares 13 words: 'ladybirds lacewings and strong jet of water every morning keep them down within'" in \
        ngram["detail"]
    # Above the allowed share prep refuses, naming the rows, and writes nothing.
    strict = config.model_copy(update={"contamination": config.contamination.model_copy(
        update={"max_heldout_share": 0.1})})
    with pytest.raises(TuneryError) as e:
        prepare(strict, tmp_path)
    assert "2 of 3 held-out rows (67%) are contained in the training rows" in str(e.value)
    assert "held.jsonl line 1 ~" in str(e.value) and "train.jsonl line 13: near" in str(e.value)


def test_training_rows_that_copy_the_general_suite_are_found(tmp_path):
    from tasks.data.prep import PrepConfig, prepare
    from tasks.evaluate.general import load_suite

    item = load_suite()[5]
    rows = [chat(f"Garden question {i}?", f"Garden answer {i} with compost.") for i in range(10)]
    rows.append(chat(item["question"], item["choices"][item["answer"]]))
    write_jsonl(tmp_path / "d.jsonl", rows)
    write_jsonl(tmp_path / "held.jsonl", [chat("Held question?", "Held answer about beans.")])
    result = prepare(PrepConfig(train=["d.jsonl"], validation=["held.jsonl"]), tmp_path)
    general = result.info["contamination"]["general"]
    assert general["rows"] >= 1 and any(e["row"].startswith("general item 6 ") for e in general["examples"])
    assert result.metrics["contamination_general_share"] == pytest.approx(general["share"])
    with pytest.raises(TuneryError, match="general-suite items .* contained in the training rows"):
        prepare(PrepConfig(train=["d.jsonl"], validation=["held.jsonl"], contamination={"max_general_share": 0}),
                tmp_path)


def test_the_demo_data_is_not_contaminated():
    from tasks.data.prep import PrepConfig, prepare

    result = prepare(PrepConfig(train=["garden_chat.jsonl"], val_fraction=0.15), REPO / "data" / "demo",
                     write=False)
    assert result.metrics["contamination_heldout_share"] == 0.0
    assert result.metrics["contamination_general_share"] == 0.0
