"""The panel of notebook 04 as a user meets it in JupyterLab: Run All, then the panel, at several window widths,
after a page reload, and "Evaluate PPL" after the notebook has pruned its model. Prints what it measured and
saves screenshots; exits 1 when a check fails.

Not part of the test suite (it needs a browser): run it by hand after changing the panel.

    apt-get install chromium            # Debian's; any Chromium / Chrome binary works (--chromium PATH)
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright   # its driver only; no browser is downloaded
    /tmp/pw/bin/python tools/panel_browser_check.py --python .venv/bin/python --out /tmp/panel-check

It runs the notebook in smoke mode (a tiny random model), in a copy under a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_global_pruning.ipynb"
SMOKE = dict(SMOKE=True, NUM_SAMPLES=8, SEQ_LEN=32, EVAL_WINDOWS=4)
WIDTHS = (1100, 1280, 1366, 1600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


# JavaScript run in the page: what a user would see of the panel.
MEASURE = """() => {
  const buttons = [...document.querySelectorAll('button.jupyter-button')]
      .filter(b => ['pin as reference', 'Evaluate PPL', 'Save plan'].includes(b.textContent.trim()));
  const cut = buttons.filter(b => b.scrollWidth > b.clientWidth + 1).map(b => b.textContent.trim());
  const readouts = [...document.querySelectorAll('.widget-readout')]
      .filter(r => r.offsetParent !== null && r.scrollWidth > r.clientWidth + 1).map(r => r.textContent.trim());
  const labels = [...document.querySelectorAll('.widget-label')]
      .filter(l => ['T', 'tau', 'ratio', 'clip pct'].includes(l.textContent.trim()))
      .map(l => { const r = l.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  const traces = [...document.querySelectorAll('.js-plotly-plot .scatterlayer .trace')];
  const drawn = traces.map(t => {
    const p = t.querySelector('path.js-line'); return p ? (p.getAttribute('d') || '').length : 0; });
  const legend = [...document.querySelectorAll('.js-plotly-plot .legendtext')].map(t => t.textContent);
  const result = [...document.querySelectorAll('.widget-html-content')].map(h => h.textContent).join(' | ');
  return {buttons: buttons.map(b => b.textContent.trim()), cut, readouts_cut: readouts,
          controls_visible: labels.length > 0 && labels.every(Boolean), traces: drawn, legend, result};
}"""


RUN_STATE = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.content.model) return false;
  const cells = nb.content.model.cells;
  let pending = 0;
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code') continue;
    const outs = c.outputs.toJSON();
    const err = outs.find(o => o.output_type === 'error');
    if (err) return `cell ${i}: ${err.ename}: ${err.evalue}`;
    if (c.executionCount === null) pending++;
  }
  const k = nb.sessionContext.session && nb.sessionContext.session.kernel;
  return pending === 0 && k && k.status === 'idle' ? 'done' : false;
}"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="panel-check", help="folder for screenshots and the JSON report")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for Run All")
    ap.add_argument("--python", default=sys.executable, help="the project's Python (JupyterLab, papermill, kernel)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright  # deferred: a tool's own dependency, not the project's

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="panel-check-"))
    env = dict(os.environ, WORKBENCH_EXPERIMENTS=str(work / "experiments"), WORKBENCH_FIGURES=str(work / "figures"),
               WORKBENCH_DATA_CACHE=str(work / "data_cache"), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    # every cell rendered (JupyterLab 4 renders only the visible ones by default), so the panel can be measured
    tracker = work / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    nb = work / "04_smoke.ipynb"
    subprocess.run([args.python, "-m", "papermill", "--prepare-only", str(NOTEBOOK), str(nb),
                    *sum((["-p", k, json.dumps(v) if not isinstance(v, bool) else str(v)] for k, v in SMOKE.items()), [])],
                   check=True, env=env, capture_output=True)
    port = _free_port()
    lab = subprocess.Popen([args.python, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                            "--ServerApp.token=", "--ServerApp.password=", "--expose-app-in-browser", "--allow-root",
                            f"--ServerApp.root_dir={work}", "--ServerApp.disable_check_xsrf=True"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict = {}
    failures: list[str] = []
    page = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/lab", 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport=dict(width=1366, height=900))
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{nb.name}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=120_000)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            time.sleep(3)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # Run All is done when every code cell has an execution count and the kernel is idle (or a cell failed)
            state = page.wait_for_function(RUN_STATE, timeout=args.timeout * 1000).json_value()
            report["run_all"] = state
            if state != "done":
                raise RuntimeError(f"Run All stopped: {state}")
            page.locator("button:has-text('Evaluate PPL')").first.scroll_into_view_if_needed()
            time.sleep(2)
            for width in WIDTHS:  # the file browser stays open on the left, as a user has it
                page.set_viewport_size(dict(width=width, height=900))
                time.sleep(1.5)
                m = page.evaluate(MEASURE)
                report[f"width_{width}"] = m
                page.screenshot(path=str(out / f"panel_{width}.png"))
                if m["cut"] or not m["controls_visible"] or m["readouts_cut"]:
                    failures.append(f"{width} px: cut buttons {m['cut']}, cut readouts {m['readouts_cut']}, "
                                    f"controls visible {m['controls_visible']}")
                if not m["traces"] or not any(m["traces"]):
                    failures.append(f"{width} px: the chart is empty")
            page.set_viewport_size(dict(width=1366, height=900))
            # Evaluate PPL after Run All: the notebook pruned `model` in place; the panel must say what happened
            page.locator("button:has-text('Evaluate PPL')").first.click()
            page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')]"
                                   ".some(h => /Error|PPL/.test(h.textContent))", timeout=120_000)
            report["evaluate_after_run_all"] = page.evaluate(MEASURE)["result"]
            if "evaluating" in report["evaluate_after_run_all"] and "Error" not in report["evaluate_after_run_all"]:
                failures.append("Evaluate PPL after Run All never finished")
            # a reload of the tab (after a save, as JupyterLab's autosave does): the chart comes back drawn from the
            # kernel's widget state, pinning works and renames the legend
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            time.sleep(3)
            page.reload()
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=120_000)
            try:
                page.wait_for_selector("button:has-text('Evaluate PPL')", timeout=120_000)
            finally:
                page.screenshot(path=str(out / "after_reload_raw.png"))
            page.locator("button:has-text('pin as reference')").first.scroll_into_view_if_needed()
            time.sleep(3)
            after = page.evaluate(MEASURE)
            report["after_reload"] = after
            page.screenshot(path=str(out / "panel_after_reload.png"))
            if not after["traces"] or not any(after["traces"]):
                failures.append("after a reload the chart is empty")
            if not any("(" in t for t in after["legend"]):  # the reference lines, named "attn (<reference>)"
                failures.append(f"after a reload the reference lines are gone: legend {after['legend']}")
            page.locator("button:has-text('pin as reference')").first.click()
            time.sleep(2)
            pinned = page.evaluate(MEASURE)
            report["after_pin"] = pinned
            page.screenshot(path=str(out / "panel_after_pin.png"))
            if not any("pinned" in t for t in pinned["legend"]):
                failures.append(f"pinning did not rename the legend: {pinned['legend']}")
            browser.close()
    except Exception as e:  # a step that could not be done is a failure too; keep what was measured
        failures.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")
    finally:
        lab.terminate()
        lab.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report["failures"] = failures
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
