"""Property test of the studio: every widget of every page (app/main.py and app/pages/*) driven through its
range and edge values (0, min, max, middle, empty, every option) in AppTest, and no exception on any page.

Widgets are discovered from the rendered page, not listed by hand, so a new widget is covered when it is
added. Buttons that start or stop background processes are the exceptions (SKIP_BUTTONS):
their own tests cover them with fakes. A file uploader cannot be driven by AppTest; the browser test
uploads a config.json to the projection panel.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app" / "main.py")
PAGES = (None, "compare", "experts", "runs")
SKIP_BUTTONS = ("Start conversion", "Start trace", "Measure speed", "Cancel", "Remove")  # background jobs
WIDGETS = ("slider", "select_slider", "number_input", "selectbox", "multiselect", "radio", "checkbox", "toggle",
           "text_input", "text_area", "button")
MAX_OPTIONS = 6  # selectbox/radio options tried per widget: first, last and a few between


def _spread(options: list, n: int = MAX_OPTIONS) -> list:
    if len(options) <= n:
        return list(options)
    step = (len(options) - 1) / (n - 1)
    return [options[round(i * step)] for i in range(n)]


def edge_values(kind: str, w) -> list:
    """The values a widget is driven through: its bounds, 0 where allowed, the middle, every (or a spread of)
    option(s), empty text, both states of a switch."""
    if kind in ("slider", "number_input"):
        lo, hi = getattr(w, "min", None), getattr(w, "max", None)
        values = []
        for v in (lo, hi, 0, None if lo is None or hi is None else (lo + hi) / 2):
            if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                continue
            if isinstance(w.value, int) or isinstance(lo, int):
                v = int(round(v))
            values.append(v)
        if hi is None:  # an open range: a large value
            values.append(type(w.value)(10 ** 6))
        return list(dict.fromkeys(values))
    if kind == "select_slider":
        return _spread(list(w.options))
    if kind in ("selectbox", "radio"):
        return _spread(list(w.options))
    if kind == "multiselect":
        return [[], list(w.options)[:1], list(w.options)]
    if kind in ("checkbox", "toggle"):
        return [True, False]
    if kind in ("text_input", "text_area"):
        return ["", " ", w.value or "x"]
    return []


def _find(at: AppTest, kind: str, ident: tuple):
    key, label = ident
    for w in getattr(at, kind):
        if (key is not None and w.key == key) or (key is None and w.label == label):
            return w
    return None


def _set(w, kind: str, value):
    if kind == "selectbox":  # options are listed as shown; the index reaches the value behind them
        return w.select_index(list(w.options).index(value))
    return w.set_value(value)


def drive_page(page: str | None, budget_s: float = 240) -> list[tuple]:
    import time

    at = AppTest.from_file(APP, default_timeout=180).run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, (page, [e.message for e in at.exception])
    done, start, runs, driven = set(), time.time(), 0, []
    for _ in range(4):  # widgets that appear only after another changed are driven on the next pass
        todo = [(kind, (w.key, w.label)) for kind in WIDGETS for w in getattr(at, kind)
                if (kind, (w.key, w.label)) not in done and not getattr(w, "disabled", False)]
        if not todo:
            break
        for kind, ident in todo:
            done.add((kind, ident))
            w = _find(at, kind, ident)
            if w is None:
                continue
            if kind == "button":
                if any(str(w.label).startswith(s) for s in SKIP_BUTTONS):
                    continue
                w.click().run()
                runs += 1
                driven.append((kind, ident[1], "click"))
                assert not at.exception, (page, w.label, "click", [e.message for e in at.exception])
                continue
            for value in edge_values(kind, w):
                w = _find(at, kind, ident)
                if w is None:
                    break
                try:
                    _set(w, kind, value)
                except (ValueError, IndexError, TypeError) as err:  # a value the widget itself refuses
                    pytest.fail(f"{page}: {kind} {ident} refuses {value!r}: {err}")
                at.run()
                runs += 1
                driven.append((kind, ident[1], value))
                assert not at.exception, (page, kind, ident, value, [e.message for e in at.exception])
            assert time.time() - start < budget_s, f"{page}: driving widgets took over {budget_s} s ({runs} runs)"
    return driven


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p or "budget_explorer")
def test_every_widget_through_its_range_and_edges(cache_env, page):  # conftest: the fixture cache
    driven = drive_page(page)
    print(page, len(driven), "values:", driven)
    assert len({(kind, label) for kind, label, _ in driven}) >= 2, driven
