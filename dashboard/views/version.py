"""One version in full: record, lineage, health, metrics, curves, samples, exports and checks; promote / roll back."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.data import (aliases, around, held_out_answers, history, refresh, version, version_table,
                            version_url)
from flows.rows import check_rows, export_rows, health_rows, metric_rows, promotion_rows
from tasks.common import TuneryError
from tasks.distill import summary, teacher_label

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
with right:
    st.subheader("Metrics")
    st.dataframe(pd.DataFrame(metric_rows(v.metrics), columns=["metric", "value"]), hide_index=True, width="stretch",
                 height=320)
    if v.eval_data_hash:
        st.caption(f"evaluated on data `{v.eval_data_hash[:16]}`")
    for data, measured in v.metrics_on_other_data.items():
        st.markdown(f"**Measured on other data** `{data[:16]}` (not used to compare, pick or gate)")
        st.dataframe(pd.DataFrame(metric_rows(measured), columns=["metric", "value"]), hide_index=True,
                     width="stretch")
    health = health_rows(v.info)
    if health:
        st.subheader("Training health")
        for row in health:
            show = {"ok": st.success, "warning": st.warning, "not judged": st.info}[row["state"]]
            show(f"{row['check']}: {row['verdict']} ({row['detail']})")

distilled = summary(v.metrics)
if distilled:
    st.subheader("Distillation")
    st.caption(f"teacher {v.teacher} ({teacher_label(v.info)}), start {v.parents[0]}; measured on "
               f"{v.metrics['distill_heldout_answers']:.0f} held-out teacher answers"
               + (": the teacher with its long system prompt, start and student without" if v.stage ==
                  "distill-prompt" else ""))
    st.dataframe(pd.DataFrame(distilled), hide_index=True, width="stretch")

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
    if best is not None:
        stopped = "stopped early" if v.metrics.get("stopped_early") else "ran to the end"
        st.caption(f"early stopping: the version is step {best:.0f}'s weights (best validation loss "
                   f"{v.metrics['best_eval_loss']:.4g}, dashed line); training {stopped} at step "
                   f"{v.metrics.get('train_steps', float('nan')):.0f}")

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
    with st.expander(f"{row['export']} · {e['gguf_file']} · {row['size']} · checks {row['checks']}"):
        st.dataframe(pd.DataFrame(check_rows(e)), hide_index=True, width="stretch")
        st.code(e["modelfile"], language="dockerfile")
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
        from flows.promotion import promote_from_config, summary

        with st.status(f"Promoting {v.version} to {v.name}@{alias}", expanded=True) as status:
            try:
                result = promote_from_config(v.version, config, alias, None if quant == "config's" else quant,
                                             progress=st.write)
            except TuneryError as e:
                status.update(label=f"error: {e}", state="error", expanded=True)
            else:
                status.update(label=("promoted" if result["promoted"] else "refused by the gate"),
                              state="complete" if result["promoted"] else "error", expanded=True)
                st.code(summary(result))
                verdicts = pd.DataFrame(result["gate"]).astype({"value": str, "threshold": str})  # mixed types
                st.dataframe(verdicts, hide_index=True, width="stretch")
                refresh()

held = [f"{a['name']}@{a['alias']}" for a in aliases(v.name)]
if held:
    with st.form("rollback"):
        target = st.selectbox("Roll back", held)
        if st.form_submit_button("Roll back to the previous holder"):
            from flows.promotion import rollback

            try:
                result = rollback(target)
            except TuneryError as e:
                st.error(str(e))
            else:
                st.success(f"{result['alias']}: {result['previous']} -> {result['version']}")
                refresh()
