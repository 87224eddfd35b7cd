"""The report a person opens: self-contained, and every figure renders in a real browser (headless Chromium)."""

from __future__ import annotations

import numpy as np
from browser import assert_report_renders, open_page

from transferlab.reporting.plots import confusion_png, curves_png
from transferlab.reporting.report import to_html


def test_report_renders_every_figure_offline_in_chromium(tmp_path):
    figures = [
        confusion_png(np.array([[5, 1], [2, 4]]), ["a", "b"], "test confusion", tmp_path / "confusion_scratch.png"),
        curves_png(
            {
                "lora": {
                    0: [{"epoch": e, "val_accuracy": 0.5 + e / 20, "train_accuracy": 0.6 + e / 20} for e in (1, 2, 3)]
                }
            },
            tmp_path / "learning_curves.png",
        ),
    ]
    sections = [("Recommendation", "Use **lora**.", None), ("Table", "", [["model", "acc"], ["lora", "80%"]])]
    page = tmp_path / "report.html"
    page.write_text(to_html(sections, figures))
    out = assert_report_renders(page, tmp_path, min_figures=2, min_tables=1)
    assert "Learning curves" in out["dom"] and "Use <b>lora</b>" in out["dom"]


def test_a_broken_figure_or_an_external_request_is_caught(tmp_path):
    """The check must be able to fail: a figure that cannot decode, a script from the network, a console message."""
    bad = tmp_path / "bad.html"
    html = to_html([("x", "y", None)], [])
    bad.write_text(
        html.replace(
            "</body>",
            '<img src="data:image/png;base64,AAAA"><script src="http://example.invalid/x.js"></script></body>',
        )
    )
    page = open_page(bad, tmp_path)
    noisy = tmp_path / "noisy.html"
    noisy.write_text(html.replace("</body>", "<script>console.error('boom')</script></body>"))
    assert open_page(noisy, tmp_path)["console_errors"]
    assert page["body"]["figures"] == "1" and page["body"]["figures-decoded"] == "0"
    assert page["body"]["errors"] == "2", "the undecodable figure and the refused request must both count"
