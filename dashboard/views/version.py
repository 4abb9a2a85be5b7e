"""One version in full: record, lineage, health, metrics, curves, samples, exports and checks; promote / roll back."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.data import (aliases, around, held_out_answers, history, refresh, run_tunery, version, version_table,
                            version_url)
from flows.report import check_rows, export_rows, promotion_rows, promotion_summary, section, version_report

known = version_table()["version"].tolist()
wanted = st.query_params.get("v")
if not known:
    st.info("No versions registered yet: `tunery run` registers the demo's.")
    st.stop()
choice = st.selectbox("Version", known, index=known.index(wanted) if wanted in known else 0, key="version")
st.query_params["v"] = choice
v, near = version(choice), around(choice)

st.title(v.version)
status_colour = {"ready": "green", "failed": "red", "running": "orange"}[v.status]
st.markdown(f":{status_colour}[**{v.status}**] · {v.stage} · base model `{v.base_model}` · "
            f"data `{(v.data_hash or '-')[:16]}` · created {v.created_at[:19]}"
            + (f" · aliases {', '.join(near['aliases'])}" if near["aliases"] else ""))
if v.error:
    st.error(v.error)
left, right = st.columns(2)
with left:
    st.subheader("Lineage")
    st.markdown("parents: " + (", ".join(f"[{p}]({version_url(p)})" for p in v.parents) or "none"))
    st.markdown("children: " + (", ".join(f"[{c}]({version_url(c)})" for c in near["children"]) or "none"))
    st.subheader("Hyperparameters")
    st.json(v.hyperparameters, expanded=1)
report = version_report(v, near)
with right:
    for part in [s for s in report if s.kind == "metrics"]:
        st.subheader(part.title.capitalize())
        st.dataframe(pd.DataFrame(part.rows, columns=["group", "metric", "value"]), hide_index=True,
                     width="stretch", **({"height": 320} if part.key == "metrics" else {}))
        st.caption(part.caption)
    if health := section(report, "health"):
        st.subheader("Training health")
        for row in health.rows:
            show = {"ok": st.success, "warning": st.warning, "not judged": st.info}[row["state"]]
            show(f"{row['check']}: {row['verdict']} ({row['detail']})")

if distilled := section(report, "distill"):
    st.subheader("Distillation")
    st.caption(distilled.caption)
    st.dataframe(pd.DataFrame(distilled.rows), hide_index=True, width="stretch")

curves = history(choice)
if not curves.empty:
    st.subheader("Training curves")
    present = [c for c in ("loss", "learning_rate", "grad_norm", "rss_mb", "eval_loss") if c in curves]
    cols = st.columns(len(present))
    best = v.metrics.get("best_step")
    for col, name in zip(cols, present):
        chart = alt.Chart(curves.dropna(subset=[name])).mark_line(point=True).encode(
            x="step:Q", y=alt.Y(f"{name}:Q", scale=alt.Scale(zero=False)), tooltip=["step", name])
        if best is not None and name in ("loss", "eval_loss"):  # early stopping kept this step's weights
            chart += alt.Chart(pd.DataFrame({"step": [best]})).mark_rule(color="green", strokeDash=[4, 4]).encode(
                x="step:Q", tooltip=["step"])
        col.altair_chart(chart.properties(title=name, height=180), width="stretch")
    training = section(report, "training")
    for line in training.rows if training else []:
        if line["text"].startswith("early stopping"):
            st.caption(line["text"].replace("weights (", "weights (dashed line; "))

if v.samples:
    st.subheader("Sample answers")
    st.dataframe(pd.DataFrame(v.samples), hide_index=True, width="stretch")
held_out = held_out_answers(choice)
if held_out:
    st.subheader("Held-out answers")
    st.caption("greedy answers to the held-out prompts against their references (answer_* metrics); "
               "Compare puts two versions' side by side with the judge's verdicts")
    st.dataframe(pd.DataFrame(held_out)[["category", "prompt", "reference", "answer"]], hide_index=True,
                 width="stretch")

st.subheader("Exports")
if not near["exports"]:
    st.caption("None yet: `tunery export` or Promote below.")
for e, row in zip(near["exports"], export_rows(near["exports"])):
    with st.expander(f"{row['export']} · {e.gguf_file} · {row['size']} · checks {row['checks']}"):
        st.dataframe(pd.DataFrame(check_rows(e)), hide_index=True, width="stretch")
        st.code(e.modelfile, language="dockerfile")
for row in promotion_rows(near["promotions"]):
    st.caption(f"{row['when']} · {row['alias']} · {row['what']}" + (f" · failed: {row['failed']}" if row["failed"]
                                                                     else ""))

st.subheader("Promote")
if v.status == "ready":
    with st.form("promote"):
        alias = st.text_input("Alias", value="production")
        config = st.text_input("Config (held-out data, prompts, export and gate settings)", value="configs/demo.yaml")
        quant = st.selectbox("Quantization", ["config's", "q4_k_m", "q8_0", "f16", "f32"])
        submitted = st.form_submit_button(f"Export, check and promote {v.version}")
    if submitted:
        with st.status(f"Promoting {v.version} to {v.name}@{alias}", expanded=True) as status:
            result, error = run_tunery("promote", v.version, "--alias", alias, "--config", config,
                                       *([] if quant == "config's" else ["--quant", quant]), progress=st.write)
            if result is None:
                status.update(label=f"error: {error}", state="error", expanded=True)
            else:
                status.update(label=("promoted" if result["promoted"] else "refused by the gate"),
                              state="complete" if result["promoted"] else "error", expanded=True)
                st.code(promotion_summary(result))
                verdicts = pd.DataFrame(result["gate"]).astype({"value": str, "threshold": str})  # mixed types
                st.dataframe(verdicts, hide_index=True, width="stretch")
                refresh()

held = [f"{a.name}@{a.alias}" for a in aliases(v.name)]
if held:
    with st.form("rollback"):
        target = st.selectbox("Roll back", held)
        if st.form_submit_button("Roll back to the previous holder"):
            result, error = run_tunery("rollback", target, progress=st.write)
            if result is None:
                st.error(error)
            else:
                st.success(f"{result['alias']}: {result['previous']} -> {result['version']}")
                refresh()
