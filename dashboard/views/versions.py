"""Every version with its key metrics and status, filtered in SQL (bound parameters) and sortable in the table."""
from __future__ import annotations

import datetime as dt

import streamlit as st

from core import metrics as metric_catalogue
from dashboard.data import facets, version_table, version_url

st.title("Versions")
options = facets()
with st.sidebar:
    search = st.text_input("Search", placeholder="version, stage, base model, error ...", key="search")
    names = st.multiselect("Name", options["names"], key="names")
    stages = st.multiselect("Stage", options["stages"], key="stages")
    base_models = st.multiselect("Base model", options["base_models"], key="base_models")
    statuses = st.multiselect("Status", options["statuses"], key="statuses")
    alias = st.selectbox("Tag (alias)", [None, *options["aliases"]], key="alias",
                         format_func=lambda a: "any" if a is None else f"@{a}")
    dates = st.date_input("Created between", value=(), key="dates")

since = until = None
if isinstance(dates, (tuple, list)) and len(dates) == 2:
    since = dt.datetime.combine(dates[0], dt.time())
    until = dt.datetime.combine(dates[1] + dt.timedelta(days=1), dt.time())
table = version_table(names=names, stages=stages, base_models=base_models, statuses=statuses, alias=alias,
                      search=search or None, since=since, until=until)
failed = int((table["status"] == "failed").sum())
st.caption(f"{len(table)} versions" + (f", {failed} failed" if failed else "")
           + " · click a version to open it · sort by clicking a column header")
table = table.assign(link=table["version"].map(version_url))
headline = metric_catalogue.headline()


def number_column(name: str):
    """A headline metric's column: its catalogue label and format (printf style, as Streamlit takes it)."""
    spec = metric_catalogue.CATALOGUE[name].fmt
    return st.column_config.NumberColumn(metric_catalogue.label(name), help=metric_catalogue.CATALOGUE[name].meaning,
                                         format=f"%{spec}" if spec.endswith("f") else None)


st.dataframe(
    table[["link", "stage", "status", "base_model", "aliases", *headline, "created_utc", "error"]],
    hide_index=True, width="stretch", key="versions_table",
    column_config={
        "link": st.column_config.LinkColumn("version", display_text=r"v=(.*)$"),
        **{name: number_column(name) for name in headline},
        "created_utc": st.column_config.DatetimeColumn("created (UTC)", format="YYYY-MM-DD HH:mm"),
    },
)
