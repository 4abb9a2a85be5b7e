"""The Streamlit dashboard (issue 6); `tunery dashboard` will start it."""
