"""ToMoE Studio: `streamlit run app/main.py` from the repository root. Navigation only; pages live in app/pages/."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import tomoe_core` from a fresh clone

st.set_page_config(page_title="ToMoE Studio", page_icon=":material/hub:", layout="wide")
st.navigation([
    st.Page("pages/budget_explorer.py", title="Budget explorer", icon=":material/tune:", default=True),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/experts.py", title="Experts", icon=":material/hub:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/play_circle:"),
]).run()
