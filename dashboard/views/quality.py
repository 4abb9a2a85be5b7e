"""Quality against speed: held-out perplexity (lower is better) against decode tokens/s (higher is better), point
size by peak memory, the Pareto frontier marked; a click on a point opens its version."""
from __future__ import annotations

import altair as alt
import streamlit as st

from core import metrics as metric_catalogue
from dashboard.data import facets, pareto, version_table, version_url

st.title("Quality vs speed")
names = st.multiselect("Name", facets()["names"], key="quality_names")
table = version_table(names=names, statuses=["ready"]).dropna(subset=["perplexity", "tokens_per_s"])
if table.empty:
    st.info("No evaluated versions yet.")
    st.stop()
table = table.assign(frontier=pareto(table), url=table["version"].map(version_url))
front = table[table["frontier"]].sort_values("tokens_per_s")
points = alt.Chart(table).mark_circle(opacity=0.8).encode(
    x=alt.X("tokens_per_s:Q", title="decode tokens/s (higher is better)", scale=alt.Scale(zero=False)),
    y=alt.Y("perplexity:Q", title="held-out perplexity (lower is better)", scale=alt.Scale(zero=False)),
    size=alt.Size("peak_rss_mb:Q", title="peak RSS MB"),
    color=alt.Color("frontier:N", title="Pareto frontier", scale=alt.Scale(domain=[True, False],
                                                                            range=["#d62728", "#7f7f7f"])),
    href="url:N", tooltip=["version", "stage", *metric_catalogue.headline()])
line = alt.Chart(front).mark_line(color="#d62728", strokeDash=[4, 3]).encode(x="tokens_per_s:Q", y="perplexity:Q")
labels = points.mark_text(dx=8, dy=-8, align="left").encode(text="version:N", size=alt.value(11), href="url:N")
st.altair_chart((line + points + labels).properties(height=480).interactive(), width="stretch")
st.caption(f"{int(table['frontier'].sum())} of {len(table)} versions are on the frontier: no other version has "
           "both lower perplexity and higher decode speed.")
st.dataframe(front[["version", "stage", "perplexity", "tokens_per_s", "peak_rss_mb"]], hide_index=True,
             width="stretch")
