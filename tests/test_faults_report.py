"""A study report shows names as plain text: a label with '$' is drawn as written (no mathtext), and names,
labels and error messages are escaped in report.md, report.html and comparison.tex, newlines included. The
report folder is replaced whole: a report that fails leaves the previous one as it was."""

from __future__ import annotations

import re

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_study_report import LABELS, make_study

from medpeft.study import figures, report
from medpeft.study.report import write_report
from medpeft.study.store import Store

HOSTILE = "<img src=x onerror=alert(1)>"


def test_a_dollar_in_a_label_is_plain_text_in_the_figures(tmp_path):
    make_study(tmp_path, ["cost $\\notacommand$", "b$"], seeds=(0,), fractions=(1.0,))
    write_report(tmp_path)
    assert (tmp_path / "report" / "figures" / "heatmap_0.png").is_file()


def test_the_pareto_figure_has_plain_tick_labels_and_every_name_inside_the_axes(tmp_path, monkeypatch):
    """The log axis's ticks read 0.1, 1, 10 (not mathtext source, which the report's rc leaves unparsed),
    and the names of the points with the most trainable parameters are drawn leftwards, not cut at the edge."""
    made, pareto = [], figures._pareto_figure
    monkeypatch.setattr(figures, "_pareto_figure", lambda *args: made.append(pareto(*args)) or made[-1])
    make_study(tmp_path, LABELS, seeds=(0,), fractions=(1.0,))
    write_report(tmp_path)
    svg = (tmp_path / "report" / "figures" / "auroc_vs_trainable.svg").read_text()
    assert "mathdefault" not in svg and "$" not in svg
    fig = made[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    axes = fig.axes[0].get_window_extent(renderer)
    names = [t for t in fig.axes[0].texts]
    assert {t.get_text() for t in names} == {"full", "lora"}
    for text in names:
        box = text.get_window_extent(renderer)
        assert axes.x0 <= box.x0 and box.x1 <= axes.x1, text.get_text()


def test_names_and_messages_are_escaped_in_every_document(tmp_path):
    made = make_study(tmp_path, LABELS, seeds=(0,), fractions=(1.0,), datasets=(f"{HOSTILE}|*x*",))
    (tmp_path / "study.yaml").write_text("name: 'toy\n\n  | study & <b>'\n")  # a line break in the name
    failed = next(iter(made["runs"]))
    store = Store(tmp_path / "study.sqlite")
    store.mark_failed(failed, f"{HOSTILE}\n| a | b |\n# not a heading")
    store.close()
    write_report(tmp_path)
    out = tmp_path / "report"

    md = (out / "report.md").read_text()
    assert not re.search(r"(?<!\\)<[a-z/]", md) and md.startswith("# Study report: toy \\| study & \\<b>\n")
    assert r"- vit\_\_\<img src=x onerror=alert(1)>\|\*x\*\_\_full\_\_f1\_\_s0: \<img src=x onerror=alert(1)> \| a \| b " \
           r"\| \# not a heading" in md
    for table in re.findall(r"(?:^\|.*\|\n)+", md, flags=re.MULTILINE):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table  # every row has the header's columns

    page = (out / "report.html").read_text()
    assert page.count("<img ") == 3 and "onerror=alert(1)>" not in page  # the three figures only
    assert "<title>Study report: toy | study &amp; &lt;b&gt;</title>" in page

    tex = (out / "comparison.tex").read_text()
    assert r"\textless{}img src=x onerror=alert(1)\textgreater{}\textbar{}*x*" in tex
    assert "<" not in tex and ">" not in tex
    assert all(line.endswith((r"\\", "rule", "}")) for line in tex.splitlines())


def test_a_failing_report_leaves_the_previous_one_as_it_was(tmp_path, monkeypatch):
    make_study(tmp_path, LABELS, seeds=(0,), fractions=(1.0,))
    write_report(tmp_path)
    out = tmp_path / "report"
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    def failing(*args):
        raise RuntimeError("the disk is full")
    monkeypatch.setattr(report, "html_page", failing)  # the last file written
    with pytest.raises(RuntimeError, match="the disk is full"):
        write_report(tmp_path)
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
