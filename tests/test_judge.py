"""The pairwise judge: verdicts asked twice with the order swapped, the win rate (ties count half) and the position
agreement, through an OpenAI-compatible endpoint (a deterministic stand-in served over HTTP) and with the packaged
SmolLM2 as the judge of a pipeline run."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import write_jsonl


class StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose verdict is planted: the answer that says 'yes' is better; when both
    or neither do, it names A (a judge that follows the position)."""

    asked: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.asked.append(body)
        text = body["messages"][-1]["content"]
        a = re.search(r"Answer A: (.*)\n\nAnswer B:", text, re.S).group(1)
        b = re.search(r"Answer B: (.*)\n\nWhich", text, re.S).group(1)
        verdict = "B" if "yes" in b and "yes" not in a else "A"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Verdict: {verdict}."}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandIn.asked = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _answers(texts: list[str]) -> list[dict]:
    return [{"prompt": f"question {i}", "reference": "yes", "answer": t} for i, t in enumerate(texts)]


def test_win_rate_and_agreement_equal_the_planted_outcome(stand_in):
    from tasks.evaluate.judge import JudgeConfig, rates, run_judge

    # The version says yes on prompts 0-2 (wins), the parent on prompt 3 (a loss); on prompt 4 both do, so the
    # stand-in names A both times: each order favours the other side, a tie by disagreement.
    mine = _answers(["yes, water", "yes, sun", "yes", "no", "yes indeed"])
    theirs = _answers(["no", "maybe", "no", "yes", "yes"])
    verdicts = run_judge(JudgeConfig(model=stand_in, endpoint_model="stand-in"), mine, theirs)
    assert [v["outcome"] for v in verdicts] == ["win", "win", "win", "loss", "tie"]
    assert verdicts[4]["first"] == "version" and verdicts[4]["second"] == "against"
    found = rates(verdicts)
    assert found["judge_win_rate"] == pytest.approx((3 + 0.5) / 5)
    assert found["judge_agreement"] == pytest.approx(4 / 5)
    assert (found["judge_wins"], found["judge_losses"], found["judge_ties"]) == (3, 1, 1)
    # Each pair was asked twice, the version's answer first and then second, with the reference shown.
    assert len(StandIn.asked) == 10 and StandIn.asked[0]["model"] == "stand-in"
    first, second = (m["messages"][-1]["content"] for m in StandIn.asked[:2])
    assert "Answer A: yes, water" in first and "Answer B: yes, water" in second
    assert "Reference answer: yes" in first


def test_replies_without_a_letter_count_as_ties():
    from tasks.evaluate.judge import first_letter, judge_pairs

    assert first_letter("B is better") == "B" and first_letter("I cannot decide") == "C"
    verdicts = judge_pairs(lambda q: "C", _answers(["a"]), _answers(["b"]))
    assert verdicts == [{"prompt": "question 0", "first": "tie", "second": "tie", "outcome": "tie"}]


def test_an_unreachable_endpoint_is_named():
    from core.errors import TuneryError
    from tasks.evaluate.judge import JudgeConfig, run_judge

    with pytest.raises(TuneryError, match=r"judging with http://127.0.0.1:9/v1 failed: judge endpoint "):
        run_judge(JudgeConfig(model="http://127.0.0.1:9/v1", timeout_s=5), _answers(["a"]), _answers(["b"]))


@pytest.mark.e2e
def test_smollm2_judges_a_pipeline_run_end_to_end(tmp_path, tiny_model_dir, smollm2_dir, prefect_server,
                                                  garden_rows):
    """A pipeline on the tiny model with the packaged SmolLM2 (registered in this home) as its judge: the sft
    version's answers are judged against the base's, and the rate and the verdicts land in the registry."""
    import yaml

    import registry
    from flows.pipeline import pipeline

    write_jsonl(tmp_path / "d.jsonl", garden_rows[:12])
    judge = registry.create_version("judge", "base", base_model=str(smollm2_dir))
    registry.finish_version(judge, str(smollm2_dir))
    doc = {"name": "judged", "base_model": str(tiny_model_dir), "base_name": "tiny-base", "device": "cpu",
           "data": {"train": "d.jsonl", "val_fraction": 0.25},
           "stages": [{"stage": "sft", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 64}],
           "eval": {"prompts": ["How deep?"], "max_new_tokens": 4, "repeats": 1, "warmup": 0, "answer_tokens": 8,
                    "general": None, "judge": judge}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    result = pipeline(str(tmp_path / "c.yaml"))
    tuned = registry.get_version(result["tuned"])
    assert tuned.metrics["judge_pairs"] == 3
    assert 0 <= tuned.metrics["judge_win_rate"] <= 1 and 0 <= tuned.metrics["judge_agreement"] <= 1
    verdicts = registry.get_judgements(tuned.version)
    assert len(verdicts) == 3 and {v["against"] for v in verdicts} == {"tiny-base:1"}
    assert all(v["outcome"] in ("win", "loss", "tie") for v in verdicts) and verdicts[0]["judge"] == judge
    counts = tuned.metrics["judge_wins"] + tuned.metrics["judge_losses"] + tuned.metrics["judge_ties"]
    assert counts == 3


def test_a_local_gguf_judges_through_its_own_chat_template(tiny_gguf, tmp_path):
    """A .gguf judge: llama.cpp reads the question through the chat template the file carries and answers with the
    likeliest of A, B and C; the verdicts are deterministic, so asking again gives the same ones."""
    from tasks.evaluate.judge import JudgeConfig, rates, run_judge

    judge = JudgeConfig(model=str(tiny_gguf("f32", tmp_path)))
    assert judge.kind == "gguf"
    mine, theirs = _answers(["water weekly", "sow in spring"]), _answers(["water daily", "sow in winter"])
    verdicts = run_judge(judge, mine, theirs)
    assert [v["prompt"] for v in verdicts] == ["question 0", "question 1"]
    assert all(v["first"] in ("version", "against", "tie") and v["outcome"] in ("win", "loss", "tie")
               for v in verdicts)
    assert run_judge(judge, mine, theirs) == verdicts
    assert rates(verdicts)["judge_pairs"] == 2


def test_an_unknown_judge_is_named_before_anything_trains(tmp_path, tiny_model_dir, prefect_server, garden_rows):
    import yaml

    import registry
    from core.errors import TuneryError
    from flows.pipeline import pipeline

    write_jsonl(tmp_path / "d.jsonl", garden_rows[:12])
    doc = {"name": "judged", "base_model": str(tiny_model_dir), "base_name": "tiny-base", "device": "cpu",
           "data": {"train": "d.jsonl", "val_fraction": 0.25}, "stages": [{"stage": "sft", "max_steps": 1}],
           "eval": {"prompts": ["How deep?"], "general": None, "judge": "nobody:3"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(TuneryError, match=r"c.yaml: eval.judge: unknown version 'nobody:3'"):
        pipeline(str(tmp_path / "c.yaml"))
    assert registry.list_versions(name="judged") == []  # nothing trained
