"""tunery's dashboard: `tunery dashboard` serves it on 127.0.0.1 (Streamlit multipage app).

Pages: Versions (browse and filter), Version (one version in full, promote / roll back), Compare (two or more
versions), Quality vs speed (Pareto view), Lineage (the family graph), Sweeps (a sweep's trials).
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only this folder on the path

from dashboard.data import refresh  # noqa: E402

# Not "pages/": Streamlit would also list that folder's files as pages of their own.
PAGES = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="tunery", layout="wide")
with st.sidebar:
    # A callback, not `if st.button(...)`: under st.navigation the button's return value is lost on the rerun.
    st.button("Refresh", on_click=refresh, help="Read the registry again (results are otherwise reused for a few "
                                                 "seconds).")
page = st.navigation([
    st.Page(PAGES / "versions.py", title="Versions", url_path="versions", default=True),
    st.Page(PAGES / "version.py", title="Version", url_path="version"),
    st.Page(PAGES / "compare.py", title="Compare", url_path="compare"),
    st.Page(PAGES / "quality.py", title="Quality vs speed", url_path="quality"),
    st.Page(PAGES / "lineage.py", title="Lineage", url_path="lineage"),
    st.Page(PAGES / "sweeps.py", title="Sweeps", url_path="sweeps"),
])
page.run()
