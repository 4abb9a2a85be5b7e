"""The lineage graph of a model family: every version of a name and all its ancestors, merges with all parents."""
from __future__ import annotations

import json

import streamlit as st

from dashboard.data import facets, family, version_table

st.title("Lineage")
names = facets()["names"]
if not names:
    st.info("No versions registered yet.")
    st.stop()
newest = version_table()["name"].iloc[0]  # default: the family that registered last
wanted = st.query_params.get("name", newest)
name = st.selectbox("Model name", names, index=names.index(wanted) if wanted in names else 0, key="lineage_name")
nodes, edges = family(name)
colours = {"ready": "#d9f2d9", "failed": "#f8d0d0", "running": "#fff2cc"}
lines = ["digraph lineage {", "rankdir=LR;", 'node [shape=box, style="rounded,filled", fontname="sans-serif"];']
for n in nodes:
    ppl = f"\nperplexity {n['perplexity']:.2f}" if n["perplexity"] is not None else ""
    label = f"{n['version']}\n{n['stage']}{ppl}"  # json.dumps writes the newlines as \n, which DOT reads back
    lines.append(f"{json.dumps(n['version'])} [label={json.dumps(label)}, "
                 f"fillcolor={json.dumps(colours.get(n['status'], 'white'))}];")
for parent, child in edges:
    lines.append(f"{json.dumps(parent)} -> {json.dumps(child)};")
lines.append("}")
st.graphviz_chart("\n".join(lines), width="content")
st.caption(f"{len(nodes)} versions, {len(edges)} parent links. A merge has an arrow from each of its parents.")
