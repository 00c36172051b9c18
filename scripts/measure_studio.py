"""Time the studio in headless Chromium: `streamlit run` to landing page fully rendered (cold: a fresh
server process; warm: a new tab on the running server), and a budget-slider move to updated KPIs.

    .venv/bin/python scripts/measure_studio.py [--repeats 5] [--output cache/results/studio_timing.json]

"Fully rendered": every KPI card has its value, the Pareto chart has drawn, and the script run is
over. The result states the machine and what else was running (load average, busiest processes).
Uses TOMOE_CACHE like the studio; needs Debian's chromium at /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KPI = "Active params"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busiest_processes(n: int = 5) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return [" ".join(line.split())[:120] for line in out.splitlines()[1:n + 1]]


def wait_rendered(page, timeout_s: float = 180) -> None:
    page.wait_for_function(
        """() => {
             const cards = [...document.querySelectorAll('[data-testid="stMetricValue"]')];
             const chart = document.querySelector('[data-testid="stPlotlyChart"] .main-svg');
             const running = document.querySelector('[data-testid="stStatusWidget"]');
             return cards.length >= 8 && cards.every(c => c.innerText.trim().length > 0) && chart && !running;
           }""", timeout=timeout_s * 1000, polling=50)


def kpi_value(page) -> str:
    return page.locator('[data-testid="stMetric"]', has_text=KPI).first.locator(
        '[data-testid="stMetricValue"]').inner_text()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", type=Path, default=None, help="JSON result (default: print only)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    result = {"kind": "studio-timing", "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "loadavg_before": os.getloadavg(), "busiest_before": busiest_processes(),
              "cache": os.environ.get("TOMOE_CACHE", str(ROOT / "cache"))}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
                                   "--server.port", str(port), "--server.address", "127.0.0.1"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    if urllib.request.urlopen(url + "_stcore/health", timeout=1).status == 200:
                        break
                except OSError:
                    time.sleep(0.05)
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("the server did not start within 120 s")
            result["server_ready_s"] = round(time.perf_counter() - t0, 2)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            wait_rendered(page)
            result["cold_landing_s"] = round(time.perf_counter() - t0, 2)
            page.close()
            warm = []
            for _ in range(args.repeats):
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                t = time.perf_counter()
                page.goto(url)
                wait_rendered(page)
                warm.append(time.perf_counter() - t)
                page.close()
            result["warm_landing_s"] = {"median": round(statistics.median(warm), 2),
                                        "all": [round(x, 2) for x in warm]}
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            wait_rendered(page)
            slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
            moves = []
            for i in range(args.repeats * 2):
                before = kpi_value(page)
                slider.focus()
                t = time.perf_counter()
                page.keyboard.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
                page.wait_for_function(
                    """([label, old]) => [...document.querySelectorAll('[data-testid="stMetric"]')]
                         .some(m => m.innerText.includes(label) && !m.innerText.includes(old))""",
                    arg=[KPI, before], timeout=60_000, polling=20)
                moves.append(time.perf_counter() - t)
                wait_rendered(page)
            result["slider_to_kpi_s"] = {"median": round(statistics.median(moves), 3),
                                         "max": round(max(moves), 3), "all": [round(x, 3) for x in moves]}
        finally:
            server.terminate()
            server.wait(10)
            browser.close()
    result["loadavg_after"] = os.getloadavg()
    result["busiest_after"] = busiest_processes()
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
