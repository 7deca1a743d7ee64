"""Text and HTML reports: Markdown tables for stdout, and ``report.html`` with images in human order,
each scorer's ranks and scores, and an inline-SVG bar chart of accuracies (no plotting library)."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..disk import atomic_write_text
from .benchmark import BenchmarkResult
from .data import PreferenceItem
from .metrics import METRICS
from .preference import PreferenceResult
from .published import PUBLISHED_BENCHMARK, TABLE3_PREFERENCE_ACCURACY

__all__ = ["preference_table", "benchmark_table", "accuracy_svg", "write_preference_report"]


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def preference_table(results: Sequence[PreferenceResult],
                     published: Mapping[str, float] = TABLE3_PREFERENCE_ACCURACY) -> str:
    """Markdown: one row per scorer, each metric in % with its 95% interval, and the paper's figure."""
    header = "| Scorer | " + " | ".join(f"{m} (%)" for m in METRICS) + " | paper (%) |"
    lines = [header, "|---|" + "---:|" * (len(METRICS) + 1)]
    for result in results:
        cells = []
        for metric in METRICS:
            value = result.metrics[metric]
            interval = "" if math.isnan(value.low) else f" [{_pct(value.low)}, {_pct(value.high)}]"
            cells.append(_pct(value.value) + interval)
        paper = published.get(result.name)
        lines.append(f"| {result.name} | " + " | ".join(cells) + f" | {'' if paper is None else f'{paper:.2f}'} |")
    return "\n".join(lines)


def benchmark_table(results: Sequence[BenchmarkResult], human_rank: Mapping[str, float] | None = None,
                    published: Mapping[str, Mapping[str, float]] = PUBLISHED_BENCHMARK) -> str:
    """Markdown: one row per generation model, each scorer's mean score (4 decimals) and rank, the
    paper's figure where known, the human rank, and a last row with Spearman's rho to the human ranking."""
    models = list(dict.fromkeys(m for r in results for m in r.scores))
    header = ["Model"]
    for r in results:
        header += [f"{r.name} score", f"{r.name} rank"] + (["paper"] if r.name in published else [])
    if human_rank:
        header.append("human rank")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    ranks = [r.ranks() for r in results]
    for model in models:
        row = [model]
        for r, rk in zip(results, ranks):
            row += [f"{r.scores[model]:.4f}" if model in r.scores else "", f"{rk[model]:g}" if model in rk else ""]
            if r.name in published:
                paper = published[r.name].get(model)
                row.append("" if paper is None else f"{paper:.4f}")
        if human_rank:
            row.append(f"{human_rank[model]:g}" if model in human_rank else "")
        lines.append("| " + " | ".join(row) + " |")
    if human_rank:
        row = ["Spearman rho"]
        for r in results:
            rho = r.spearman(human_rank)
            row += ["", "n/a" if math.isnan(rho) else f"{rho:.2f}"] + ([""] if r.name in published else [])
        row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def accuracy_svg(results: Sequence[PreferenceResult], metric: str = "original",
                 published: Mapping[str, float] = TABLE3_PREFERENCE_ACCURACY) -> str:
    """A horizontal bar chart (inline SVG) of one metric per scorer, with its interval and the paper's value."""
    bar_h, gap, left, width = 22, 10, 170, 420
    height = len(results) * (bar_h + gap) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" '
             f'role="img" aria-label="{html.escape(metric)} accuracy per scorer">',
             f'<line x1="{left}" y1="10" x2="{left}" y2="{height - 25}" stroke="#333"/>']
    for tick in range(0, 101, 25):
        x = left + width * tick / 100
        parts.append(f'<line x1="{x}" y1="{height - 25}" x2="{x}" y2="{height - 20}" stroke="#333"/>'
                     f'<text x="{x}" y="{height - 6}" font-size="11" text-anchor="middle">{tick}%</text>')
    for index, result in enumerate(results):
        value = result.metrics[metric]
        y = 10 + index * (bar_h + gap)
        w = 0 if math.isnan(value.value) else width * value.value
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7}" font-size="13" text-anchor="end">'
                     f'{html.escape(result.name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4c78a8">'
                     f'<title>{html.escape(result.name)}: {_pct(value.value)}%</title></rect>')
        if not math.isnan(value.low):
            x1, x2 = left + width * value.low, left + width * value.high
            parts.append(f'<line x1="{x1:.1f}" y1="{y + bar_h / 2}" x2="{x2:.1f}" y2="{y + bar_h / 2}" '
                         f'stroke="#111" stroke-width="2"/>')
        paper = published.get(result.name)
        if paper is not None:
            x = left + width * paper / 100
            parts.append(f'<line x1="{x:.1f}" y1="{y - 2}" x2="{x:.1f}" y2="{y + bar_h + 2}" stroke="#e45756" '
                         f'stroke-width="3"><title>paper: {paper:.2f}%</title></line>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + bar_h * 0.7}" font-size="12">{_pct(value.value)}%</text>')
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}
.prompt{margin:1.5em 0;border-top:1px solid #ddd;padding-top:.5em}
.row{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px}
.card img{width:160px;height:160px;object-fit:cover;display:block}.ok{color:#2a7}.bad{color:#c33}"""


def write_preference_report(results: Sequence[PreferenceResult], items: Sequence[PreferenceItem],
                            path: str | os.PathLike, *, title: str = "Preference accuracy",
                            max_prompts: int | None = None) -> Path:
    """Write ``report.html``: metric table, bar chart, and per prompt the images in human order with
    each scorer's rank and score (a rank that disagrees with the human order is shown in red)."""
    from ..validation import check_optional_int

    check_optional_int("max_prompts", max_prompts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    out.append("<table><tr><th>Scorer</th>" + "".join(f"<th>{esc(m)} (%)</th>" for m in METRICS)
               + "<th>paper (%)</th></tr>")
    for result in results:
        cells = "".join(
            f"<td>{_pct(result.metrics[m].value)}"
            + ("" if math.isnan(result.metrics[m].low) else
               f" <small>[{_pct(result.metrics[m].low)}, {_pct(result.metrics[m].high)}]</small>") + "</td>"
            for m in METRICS)
        paper = TABLE3_PREFERENCE_ACCURACY.get(result.name)
        out.append(f"<tr><td>{esc(result.name)}</td>{cells}<td>{'' if paper is None else f'{paper:.2f}'}</td></tr>")
    out.append("</table><h2>Pair accuracy (original metric)</h2>")
    out.append(accuracy_svg(results))
    out.append("<p><small>Bars: our accuracy; black line: bootstrap 95% interval; red mark: published figure."
               "</small></p><h2>Prompts</h2>")
    base = path.parent.resolve()
    shown = items if max_prompts is None else items[:max_prompts]
    for index, item in enumerate(shown):
        out.append(f"<div class='prompt'><b>{esc(item.id)}</b>: {esc(item.prompt)}<div class='row'>")
        order = sorted(range(len(item.images)), key=lambda i: (item.ranking[i], i))
        for i in order:
            src = os.path.relpath(os.path.abspath(item.images[i]), base).replace(os.sep, "/")
            lines = [f"human rank {item.ranking[i]}"]
            for result in results:
                record = result.records[index]
                model_rank = record["ranking"][i]
                # the model agrees with this image's position if its rank order matches the human one
                agree = sum(1 for j in range(len(item.images)) if item.ranking[j] < item.ranking[i]) < model_rank \
                    <= sum(1 for j in range(len(item.images)) if item.ranking[j] <= item.ranking[i])
                css = "ok" if agree else "bad"
                lines.append(f"<span class='{css}'>{esc(result.name)}: #{model_rank} "
                             f"({record['rewards'][i]:.3f})</span>")
            out.append(f"<div class='card'><img loading='lazy' src='{esc(src)}' alt='{esc(item.generations[i])}'>"
                       + "<br>".join(lines) + "</div>")
        out.append("</div></div>")
    if max_prompts is not None and len(items) > max_prompts:
        out.append(f"<p>{len(items) - max_prompts} more prompts not shown.</p>")
    out.append("</body></html>")
    return atomic_write_text(path, "\n".join(out), errors="backslashreplace")
