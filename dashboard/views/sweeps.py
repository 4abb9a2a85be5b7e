"""A sweep (`tunery sweep`): its trials, the metric against each swept value, and the quality-vs-speed frontier of
its trials; a click on a point opens the trial's version."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.data import pareto, sweep_trials, sweeps, version_url

st.title("Sweeps")
found = sweeps()
if not found:
    st.info("No sweeps yet: `tunery sweep CONFIG --set stages[0].learning_rate=1e-4,3e-4` starts one.")
    st.stop()
ids = [s["sweep_id"] for s in found]
labels = {s["sweep_id"]: " · ".join([s["sweep_id"], s["name"], s["method"],
                                    f"{s['trials']} trials" + (f" ({s['failed']} failed)" if s["failed"] else ""),
                                    s["status"], s["created_at"][:16]]) for s in found}
asked = st.query_params.get("s")
chosen = st.selectbox("Sweep", ids, index=ids.index(asked) if asked in ids else 0, format_func=labels.get)
st.query_params["s"] = chosen
sweep, trials = sweep_trials(chosen)
metric, keys = sweep.metric, list(sweep.space)
better = "lower" if sweep.direction == "minimize" else "higher"
best = trials[trials["best"]]
if not best.empty:
    b = best.iloc[0]
    st.success(f"Best: trial {b['trial']} ({', '.join(f'{k} = {b[k]}' for k in keys)}) -> {b['version']}, "
               f"{metric} {b[metric]:.4g} ({better} is better)")
else:
    st.warning("No trial of this sweep finished.")
st.caption(f"{sweep.method} over {', '.join(keys)} of `{sweep.config}`; {len(trials)} trials, "
           f"{int((trials['status'] == 'failed').sum())} failed.")

done = trials[trials["status"] == "ready"].dropna(subset=[metric]).copy()
done["url"] = done["version"].map(version_url)
# Vega-Lite reads "." and "[" in a field name as a path into nested data: the swept keys are charted as value_0, ...
field = {key: f"value_{i}" for i, key in enumerate(keys)}
done = done.rename(columns=field)
tips = ["trial", "version", *(alt.Tooltip(f, title=k) for k, f in field.items()), metric, "seconds"]
if not done.empty:
    st.subheader(f"{metric} against each swept value")
    columns = st.columns(min(len(keys), 3))
    for i, key in enumerate(keys):
        values = pd.to_numeric(done[field[key]], errors="coerce")
        numeric = values.notna().all()
        spread = numeric and values.min() > 0 and values.max() / values.min() >= 10
        kind = "Q" if numeric else "N"
        x = alt.X(f"{field[key]}:{kind}", title=key,
                  scale=alt.Scale(type="log") if spread else alt.Scale(zero=False))
        data = done.assign(**{field[key]: values if numeric else done[field[key]].astype(str)})
        chart = alt.Chart(data).mark_circle(size=90).encode(
            x=x, y=alt.Y(f"{metric}:Q", title=f"{metric} ({better} is better)", scale=alt.Scale(zero=False)),
            color=alt.Color("best:N", title="best", scale=alt.Scale(domain=[True, False],
                                                                   range=["#d62728", "#1f77b4"])),
            href="url:N", tooltip=tips)
        columns[i % len(columns)].altair_chart(chart.properties(height=300), width="stretch")

    st.subheader("Quality vs speed of the trials")
    axis = st.radio("Speed", ["decode tokens/s", "trial seconds"], horizontal=True)
    speed = "tokens_per_s" if axis == "decode tokens/s" else "seconds"
    plot = done.dropna(subset=[speed]).copy()
    if not plot.empty:
        # frontier: no other trial is both better on the metric and faster
        quality = plot[metric] if sweep.direction == "minimize" else -plot[metric]
        fast = plot[speed] if speed == "tokens_per_s" else -plot[speed]
        plot["frontier"] = pareto(pd.DataFrame({"q": quality, "f": fast}), lower="q", higher="f")
        front = plot[plot["frontier"]].sort_values(speed)
        points = alt.Chart(plot).mark_circle(size=90, opacity=0.85).encode(
            x=alt.X(f"{speed}:Q", title=axis + (" (higher is better)" if speed == "tokens_per_s"
                                                else " (lower is better)"), scale=alt.Scale(zero=False)),
            y=alt.Y(f"{metric}:Q", title=f"{metric} ({better} is better)", scale=alt.Scale(zero=False)),
            color=alt.Color("frontier:N", title="frontier", scale=alt.Scale(domain=[True, False],
                                                                            range=["#d62728", "#7f7f7f"])),
            href="url:N", tooltip=[*tips, "tokens_per_s"])
        line = alt.Chart(front).mark_line(color="#d62728", strokeDash=[4, 3]).encode(x=f"{speed}:Q", y=f"{metric}:Q")
        labels_ = points.mark_text(dx=8, dy=-8, align="left").encode(text="version:N", size=alt.value(11))
        st.altair_chart((line + points + labels_).properties(height=380), width="stretch")
        st.caption(f"{int(plot['frontier'].sum())} of {len(plot)} trials are on the frontier.")

st.subheader("Trials")
st.dataframe(trials[["trial", *keys, "status", "version", metric, "seconds", "tokens_per_s", "error"]],
             hide_index=True, width="stretch")
