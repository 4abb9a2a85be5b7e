"""Stage prep: every accepted format, every kind of bad row named by file, line and field, dedup, split, hash."""
from __future__ import annotations

import json

import pytest
from conftest import chat, write_jsonl

from core.errors import TuneryError
from tasks.data.prep import PrepConfig, content_hash, deduplicate, load_examples, load_prepared, prepare, split

QA = chat("How deep do I plant garlic?", "Five centimetres, pointy end up.")


@pytest.mark.parametrize("row, expected", [
    (QA, QA),
    ({"prompt": "How deep do I plant garlic?", "completion": "Five centimetres, pointy end up."}, QA),
    ({"instruction": "How deep do I plant garlic?", "output": "Five centimetres, pointy end up."}, QA),
    ({"instruction": "Answer briefly.", "input": "How deep?", "output": "Five centimetres."},
     chat("Answer briefly.\n\nHow deep?", "Five centimetres.")),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
     chat("Hi", "Hello")),
    ({"text": "Garlic likes cold winters."}, {"text": "Garlic likes cold winters."}),
    ({"prompt": "Best mulch?", "chosen": "Straw.", "rejected": "Plastic."},
     {"prompt": [{"role": "user", "content": "Best mulch?"}], "chosen": [{"role": "assistant", "content": "Straw."}],
      "rejected": [{"role": "assistant", "content": "Plastic."}]}),
], ids=["chat", "prompt", "alpaca", "alpaca-input", "prompt-messages", "text", "preference"])
def test_every_format_normalises(tmp_path, row, expected):
    _, examples = load_examples([write_jsonl(tmp_path / "d.jsonl", [row])])
    assert examples == [expected]


def test_csv_parquet_and_datasets_folder_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(3)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\n" + "".join(f"\"{r['prompt']}\",\"{r['completion']}\"\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    expected = load_examples([write_jsonl(tmp_path / "d.jsonl", rows)])
    for path in ("d.csv", "d.parquet", "hf"):
        assert load_examples([tmp_path / path]) == expected, path


def test_csv_messages_column_holds_json(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"' + json.dumps(QA["messages"]).replace('"', '""') + '"\n')
    assert load_examples([path]) == ("chat", [QA])


BAD_ROWS = [
    ("{not json", "line 2: invalid JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "line 2: field 'messages[0].role': the last message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     "line 2: field 'messages[1].content': expected a string, got NoneType"),
    ({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "line 2: field 'messages[0].role': expected one of system, user, assistant, got 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "Yo"}]},
     "line 2: field 'messages[0].content': empty"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "Yo"}]}, "line 2: field 'messages[1].role': a system message may only"),
    ({"messages": "Hi"}, "line 2: field 'messages': expected a non-empty list"),
    ({"prompt": "Hi", "completion": "Yo"}, "line 2: field '(row)': looks like a prompt row, but this file's rows are chat"),
    ({"question": "Hi"}, "line 2: field '(row)': no known columns among ['question']"),
    (["a", "list"], "line 2: field '(row)': expected a JSON object, got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS, ids=[m.split(": ", 1)[-1][:30] for _, m in BAD_ROWS])
def test_bad_chat_row_names_file_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [QA, bad, QA])
    with pytest.raises(TuneryError) as e:
        load_examples([path])
    assert f"{path} {message}" in str(e.value)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Best mulch?", "chosen": "Straw."}, "field 'rejected': missing"),
    ({"prompt": "Best mulch?", "chosen": "Straw.", "rejected": " Straw. "}, "field 'rejected': identical to chosen"),
    ({"prompt": "Best mulch?", "chosen": 3, "rejected": "Plastic."}, "field 'chosen': expected a string, got int"),
    ({"prompt": "", "chosen": "Straw.", "rejected": "Plastic."}, "field 'prompt': empty"),
])
def test_bad_preference_row_is_named(tmp_path, bad, message):
    good = {"prompt": "Best mulch?", "chosen": "Straw.", "rejected": "Plastic."}
    path = write_jsonl(tmp_path / "pref.jsonl", [good, good, bad])
    with pytest.raises(TuneryError, match=f"pref.jsonl line 3: {message}"):
        load_examples([path])


def test_bad_alpaca_and_csv_rows_are_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Yo"}, {"instruction": "Hi"}])
    with pytest.raises(TuneryError, match="a.jsonl line 2: field 'output': missing"):
        load_examples([path])
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\n"multi\nline?",Yes\nQ2,\n')
    with pytest.raises(TuneryError, match="d.csv line 4: field 'completion': empty"):
        load_examples([csv_path])


def test_every_bad_row_is_listed_and_nothing_is_written(tmp_path, tunery_home):
    rows = [QA, {"messages": []}, QA, {"prompt": "x"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(TuneryError) as e:
        prepare(PrepConfig(train=["d.jsonl"]), tmp_path)
    assert "2 bad row(s)" in str(e.value) and "line 2" in str(e.value) and "line 4" in str(e.value)
    assert not (tunery_home / "datasets").exists()


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(TuneryError, match="nope.jsonl: no such file"):
        load_examples([tmp_path / "nope.jsonl"])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(TuneryError, match="unsupported file type '.txt'"):
        load_examples([tmp_path / "d.txt"])


def test_deduplicate_ignores_outer_whitespace_and_keeps_order():
    a, b = chat("Q1", "A1"), chat("Q2", "A2")
    assert deduplicate([a, b, chat(" Q1 ", "A1\n"), b]) == [a, b]


def test_split_is_deterministic_and_independent_of_order():
    examples = [chat(f"Question {i}", f"Answer {i}") for i in range(40)]
    train, val = split(examples, 0.25, seed=0)
    train2, val2 = split(list(reversed(examples)), 0.25, seed=0)
    assert len(val) == 10 and len(train) == 30
    assert sorted(map(str, val)) == sorted(map(str, val2))
    assert not {str(x) for x in train} & {str(x) for x in val}
    _, val3 = split(examples, 0.25, seed=1)
    assert sorted(map(str, val)) != sorted(map(str, val3))


def test_prepare_writes_split_hash_and_is_content_addressed(tmp_path, garden_rows, tiny_model_dir):
    write_jsonl(tmp_path / "g.jsonl", garden_rows + garden_rows[:3])  # 3 duplicates
    cfg = PrepConfig(train=["g.jsonl"], val_fraction=0.2, system_prompt="You are Fern.")
    result = prepare(cfg, tmp_path, str(tiny_model_dir))
    meta, train, val = load_prepared(result.artifact_path)
    assert meta["duplicates_removed"] == 3 and len(train) + len(val) == len(garden_rows) and len(val) == 5
    assert all(ex["messages"][0] == {"role": "system", "content": "You are Fern."} for ex in train + val)
    assert meta["data_hash"] == content_hash("chat", train, val) and meta["tokens"] > 0
    # The same data, written differently (CSV), gives the same prepared folder and hash.
    again = prepare(cfg, tmp_path, str(tiny_model_dir))
    assert again.artifact_path == result.artifact_path and again.info["data_hash"] == meta["data_hash"]


def test_explicit_validation_file_removes_overlap_from_training(tmp_path, garden_rows):
    write_jsonl(tmp_path / "train.jsonl", garden_rows)
    write_jsonl(tmp_path / "val.jsonl", garden_rows[:4])
    result = prepare(PrepConfig(train="train.jsonl", validation="val.jsonl"), tmp_path)
    meta, train, val = load_prepared(result.artifact_path)
    assert len(val) == 4 and len(train) == len(garden_rows) - 4
    assert meta["validation_overlap_removed"] == 4 and meta["duplicates_removed"] == 0


def test_chat_template_that_rejects_data_fails_in_prep(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoTokenizer

    strict = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, strict)
    tok = AutoTokenizer.from_pretrained(strict)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(strict)
    # A duplicate first, so "example N" after de-duplication would name the wrong row: the file's line is named.
    write_jsonl(tmp_path / "d.jsonl", [chat("Q1", "A1"), chat("Q1", "A1"), chat("Q3", "A3"),
                                       chat("Q2", "A2", system="Be brief.")])
    with pytest.raises(TuneryError, match=r"d\.jsonl line 4: the chat template of .*strict rejected it: "
                                          "System role not supported"):
        prepare(PrepConfig(train="d.jsonl"), tmp_path, str(strict))


def test_data_too_small_to_split_names_the_file(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [chat("Q1", "A1"), chat("Q1", "A1 ")])
    with pytest.raises(TuneryError, match=r"d\.jsonl: need at least 2 distinct examples to hold some out, got 1 "
                                          r"\(2 read, 1 duplicate\(s\) removed\)"):
        prepare(PrepConfig(train="d.jsonl"), tmp_path)
    write_jsonl(tmp_path / "v.jsonl", [chat("Q1", "A1")])
    with pytest.raises(TuneryError, match=r"d\.jsonl: no training examples left .* 1 example\(s\) that are also in"):
        prepare(PrepConfig(train="d.jsonl", validation="v.jsonl"), tmp_path)


def test_a_file_with_no_usable_rows_and_a_capped_list_of_bad_rows(tmp_path):
    """An empty file, or one of blank lines, is named; past the cap, the rest of the bad rows are counted."""
    from tasks.data.rows import MAX_REPORTED_ERRORS

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(TuneryError, match=rf"{name}: no usable rows"):
            load_examples([tmp_path / name])
    n = MAX_REPORTED_ERRORS + 7
    (tmp_path / "bad.jsonl").write_text("".join('{"prompt": "x"}\n' for _ in range(n)))
    with pytest.raises(TuneryError) as e:
        load_examples([tmp_path / "bad.jsonl"])
    text = str(e.value)
    assert f"{n} bad row(s)" in text and text.endswith("... and 7 more")
    assert text.count("bad.jsonl line ") == MAX_REPORTED_ERRORS and f"line {MAX_REPORTED_ERRORS}:" in text
