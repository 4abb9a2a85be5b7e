"""The rows the CLI, the Prefect artifacts and the dashboard all render (issue 16): one place writes them."""
from __future__ import annotations

from flows.report import check_rows, fmt, health_rows, markdown_table
from registry.records import Check, Export


def test_health_and_check_rows_say_ok_warning_and_not_judged():
    info = {"health": {"loss": {"verdict": "falling", "ok": True, "detail": "a"},
                       "grad_norm": {"verdict": "spiking", "ok": False, "detail": "b"},
                       "memory": {"verdict": "too short", "ok": None, "detail": "c"}}}
    assert [(r["check"], r["state"]) for r in health_rows(info)] == [
        ("loss", "ok"), ("grad_norm", "warning"), ("memory", "not judged")]
    export = Export(export_id="x/v1-f32", version="x:1", quant="f32", path=".", gguf_file="x.gguf", size_bytes=0,
                    sha256="", modelfile="", passed=False, info={},
                    checks=(Check("loads", "x.gguf", True, 49152.0, "d"), Check("greedy", "x.gguf", False, 1.0, "e"),
                            Check("mean_kl", "x.gguf", None, 0.0706004, "f")))
    rows = check_rows(export)
    assert [(r["passed"], r["value"]) for r in rows] == [("yes", "4.915e+04"), ("NO", "1"), ("-", "0.0706")]
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| check | file | passed | value | detail |"
    assert "| mean_kl | x.gguf | - | 0.0706 | f |" in table
    assert fmt(None) == "-" and fmt(123456.7) == "123457" and fmt("a") == "a"
