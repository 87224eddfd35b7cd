"""Open an HTML file in headless Chromium (Debian's `chromium`) with every network request refused, and read
back the DOM after load plus the console's errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Any request that leaves the page fails to resolve and shows up as a console/network error.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
]


def open_page(path: Path, tmp: Path) -> dict:
    """{'dom': the DOM after load, 'console_errors': [...], 'body': {attribute: value}}."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium (make test does it)")
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", "--dump-dom", path.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Chromium logs every console message as "INFO:CONSOLE"; the report writes none, so any is a problem.
    errors = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "net::ERR_" in line]
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", proc.stdout).group(0)))
    return {"dom": proc.stdout, "console_errors": errors, "body": body}


def assert_report_renders(path: Path, tmp: Path, min_figures: int, min_tables: int) -> dict:
    """The report loads offline, logs no console error, and every figure and table is there and decoded."""
    html = path.read_text()
    assert not re.search(r'(src|href)="https?://', html), "the report must not load anything from the network"
    page = open_page(path, tmp)
    assert page["console_errors"] == [] and page["body"]["errors"] == "0", (page["console_errors"], page["body"])
    figures = int(page["body"]["figures"])
    assert figures >= min_figures and page["body"]["figures-decoded"] == str(figures), page["body"]
    assert int(page["body"]["tables"]) >= min_tables
    return page
