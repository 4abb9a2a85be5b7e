"""Two or more versions against the first: metric deltas coloured by direction, hyperparameter diff, overlaid
training curves, the answers each gave to the same prompts, and their held-out answers side by side with the
judge's verdicts."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from core import metrics as metric_catalogue
from dashboard.data import compare, held_out_answers, history, judgements, version, version_table

st.title("Compare")
known = version_table()["version"].tolist()
preset = [v for v in st.query_params.get_all("v") if v in known]
chosen = st.multiselect("Versions (the first is the baseline)", known, default=preset or known[-1:] + known[:1],
                        key="compare_versions")
if len(chosen) < 2:
    st.info("Pick two or more versions.")
    st.stop()
base, others = chosen[0], chosen[1:]

rows: dict[str, dict] = {}
hp_rows: dict[str, dict] = {}
for other in others:
    result = compare(base, other)
    if not result["eval_data"]["same"]:
        st.warning(f"{base} and {other} were never evaluated on the same data: their evaluation metrics are shown "
                   "without verdicts.")
    for m in result["metrics"]:
        row = rows.setdefault(m["metric"], {"metric": m["metric"], base: m["a"]})
        row[other], row[f"Δ {other}"], row[f"Δ% {other}"] = m["b"], m["change"], m["relative_change"]
        row[f"better {other}"] = m["better"]
    for h in result["hyperparameters"]:
        if h["changed"]:
            row = hp_rows.setdefault(h["hyperparameter"], {"hyperparameter": h["hyperparameter"], base: h["a"]})
            row[other] = h["b"]

# Headline metrics first in the catalogue's order, then the rest by group and name.
order = {m: i for i, m in enumerate(metric_catalogue.CATALOGUE)}
full = pd.DataFrame(sorted(rows.values(), key=lambda r: (r["metric"] not in metric_catalogue.headline(),
                                                         order.get(r["metric"].split("/")[0], len(order)),
                                                         r["metric"])))
flags = [c for c in full.columns if c.startswith("better ")]
table = full.drop(columns=flags)


def colour(row: pd.Series) -> list[str]:
    styles = [""] * len(row)
    for other in others:
        better = full.loc[row.name, f"better {other}"]
        if better is None or pd.isna(better):
            continue
        shade = "background-color: rgba(0, 160, 0, 0.18)" if better else "background-color: rgba(220, 0, 0, 0.18)"
        for col in (f"Δ {other}", f"Δ% {other}"):
            styles[row.index.get_loc(col)] = shade
    return styles


st.subheader(f"Metrics against {base}")
st.caption("green: better, red: worse, by the metric's direction in the catalogue (lower perplexity, higher "
           "tokens/s, ...)")
percent = {c: "{:+.1%}" for c in table.columns if c.startswith("Δ% ")}
numbers = {c: "{:.4g}" for c in table.columns if c not in percent and c != "metric"}
st.dataframe(table.style.apply(colour, axis=1).format({**numbers, **percent}, na_rep=""),
             hide_index=True, width="stretch", key="compare_metrics")

st.subheader("Hyperparameters that differ")
if hp_rows:
    st.dataframe(pd.DataFrame(hp_rows.values()).astype(str), hide_index=True, width="stretch")
else:
    st.caption("None.")

curves = []
for ref in chosen:
    h = history(ref)
    if not h.empty and "loss" in h:
        curves.append(h.assign(version=ref))
if curves:
    st.subheader("Training curves")
    long = pd.concat(curves).melt(id_vars=["version", "step"], value_vars=[
        c for c in ("loss", "learning_rate", "grad_norm") if c in pd.concat(curves)]).dropna()
    st.altair_chart(alt.Chart(long).mark_line().encode(
        x="step:Q", y=alt.Y("value:Q", scale=alt.Scale(zero=False)), color="version:N",
        tooltip=["version", "step", "value"]).properties(height=200).facet(
        column="variable:N").resolve_scale(y="independent"))

st.subheader("Answers to the same prompts")
answers = {ref: {s["prompt"]: s["answer"] for s in version(ref).samples} for ref in chosen}
prompts = list(dict.fromkeys(p for a in answers.values() for p in a))
if prompts:
    st.dataframe(pd.DataFrame([{"prompt": p, **{ref: answers[ref].get(p, "") for ref in chosen}} for p in prompts]),
                 hide_index=True, width="stretch")
else:
    st.caption("No sample answers recorded for these versions.")

st.subheader("Held-out answers and the judge's verdicts")
held = {ref: {a["prompt"]: a for a in held_out_answers(ref)} for ref in chosen}
verdicts = {}  # (other, prompt) -> "win (version, version)" from the other version's side against the baseline
for other in others:
    found = judgements(other, base)
    for v in found:
        verdicts[(other, v["prompt"])] = f"{v['outcome']} ({v['first']} / {v['second']})"
    if found:
        wins = sum(v["outcome"] == "win" for v in found)
        ties = sum(v["outcome"] == "tie" for v in found)
        agree = sum(v["first"] == v["second"] for v in found)
        st.markdown(f"**{other}** against **{base}**, judged by `{found[0]['judge']}`: win rate "
                    f"**{(wins + ties / 2) / len(found):.2f}** ({wins} won, {len(found) - wins - ties} lost, {ties} "
                    f"tied of {len(found)}), the two orders agreed on {agree / len(found):.0%}")
held_prompts = list(dict.fromkeys(p for a in held.values() for p in a))
if held_prompts:
    table_rows = []
    for p in held_prompts:
        row = {"prompt": p, "reference": next((held[r][p]["reference"] for r in chosen if p in held[r]), "")}
        for ref in chosen:
            row[ref] = held[ref].get(p, {}).get("answer", "")
            if ref != base and (ref, p) in verdicts:
                row[f"judge: {ref} vs {base}"] = verdicts[(ref, p)]
        table_rows.append(row)
    st.caption("Each verdict is the pair's outcome for the version, then which side won with its answer shown "
               "first / second.")
    st.dataframe(pd.DataFrame(table_rows), hide_index=True, width="stretch", key="compare_held_out")
else:
    st.caption("No held-out answers recorded for these versions.")
