"""The rows the CLI, the Prefect artifacts and the dashboard all render (issue 16): one place writes them."""
from __future__ import annotations

from flows.report import check_rows, fmt, health_rows, markdown_table


def test_health_and_check_rows_say_ok_warning_and_not_judged():
    info = {"health": {"loss": {"verdict": "falling", "ok": True, "detail": "a"},
                       "grad_norm": {"verdict": "spiking", "ok": False, "detail": "b"},
                       "memory": {"verdict": "too short", "ok": None, "detail": "c"}}}
    assert [(r["check"], r["state"]) for r in health_rows(info)] == [
        ("loss", "ok"), ("grad_norm", "warning"), ("memory", "not judged")]
    export = {"checks": [{"name": "loads", "file": "x.gguf", "passed": True, "value": 49152.0, "detail": "d"},
                         {"name": "greedy", "file": "x.gguf", "passed": False, "value": 1.0, "detail": "e"},
                         {"name": "mean_kl", "file": "x.gguf", "passed": None, "value": 0.0706004, "detail": "f"}]}
    rows = check_rows(export)
    assert [(r["passed"], r["value"]) for r in rows] == [("yes", "4.915e+04"), ("NO", "1"), ("-", "0.0706")]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| check | file | passed | value | detail |"
    assert "| mean_kl | x.gguf | - | 0.0706 | f |" in table
    assert fmt(None) == "-" and fmt(123456.7) == "123457" and fmt("a") == "a"
