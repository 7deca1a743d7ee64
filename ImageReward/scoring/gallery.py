"""A self-contained HTML gallery of scored rows: per prompt, the best and the worst images.

Local and embedded images become small inline JPEG thumbnails (the page opens anywhere, no side files);
URL images are linked as they are. A summary at the top gives counts, the score distribution and the
errors.

>>> write_gallery(read_output("scores.jsonl"), "scores.html")   # doctest: +SKIP
PosixPath('scores.html')
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..disk import atomic_write_text
from .datasets import Record, load_record_image

__all__ = ["write_gallery"]

logger = logging.getLogger(__name__)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.05em;margin:1.6em 0 .3em;font-weight:600}
.meta{color:#666;font-size:.85em} .strip{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;width:%(px)dpx;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px}
figure img{width:%(px)dpx;height:%(px)dpx;object-fit:contain;background:#eee;display:block}
figcaption{font-size:.75em;word-break:break-all;margin-top:3px} .score{font-weight:700}
.top .score{color:#1a7f37} .bottom .score{color:#b42318} .label{font-size:.8em;color:#555;margin:.4em 0 .2em}
table{border-collapse:collapse;font-size:.8em} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.bar{display:inline-block;background:#4c78a8;height:.8em}
"""


def _thumbnail(record: Record | None, row: dict[str, Any], size: int, timeout: float) -> str | None:
    """``src`` for an ``<img>``: an inline JPEG for loadable images, the URL for URLs, else None."""
    image = row.get("image") or ""
    if image.startswith(("http://", "https://")):
        return image
    if record is None:
        return None
    try:
        picture = load_record_image(record, timeout=timeout)
        picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format="JPEG", quality=80)
    except Exception as err:  # noqa: BLE001 - a gallery must not fail on one image
        logger.warning("gallery: cannot show %s (%s)", image, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(row: dict[str, Any], src: str | None, size: int) -> str:
    picture = f'<img loading="lazy" src="{html.escape(src, quote=True)}" alt="">' if src else \
        f'<div style="width:{size}px;height:{size}px;background:#eee"></div>'
    return (f'<figure>{picture}<figcaption><span class="score">{row["score"]:+.4f}</span> '
            f'{html.escape(str(row.get("image") or row.get("id")))}</figcaption></figure>')


def _histogram(scores: list[float], bins: int = 12) -> str:
    low, high = min(scores), max(scores)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for score in scores:
        counts[min(int((score - low) / width), bins - 1)] += 1
    most = max(counts)
    lines = [f"<tr><td>{low + i * width:+.3f} .. {low + (i + 1) * width:+.3f}</td><td>{count}</td>"
             f'<td><span class="bar" style="width:{int(200 * count / most)}px"></span></td></tr>'
             for i, count in enumerate(counts)]
    return "<table><tr><th>score</th><th>rows</th><th></th></tr>" + "".join(lines) + "</table>"


def write_gallery(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    records: Sequence[Record] | None = None,
    per_prompt: int = 4,
    max_prompts: int = 500,
    thumb_size: int = 192,
    timeout: float = 10.0,
    title: str = "ImageReward scores",
) -> Path:
    """Write ``path``: for each prompt (first ``max_prompts``, in input order) its ``per_prompt`` best and
    worst images (all of them when there are at most ``2 * per_prompt``), with scores.

    ``records`` (from :func:`~ImageReward.scoring.datasets.read_records`) lets it load embedded or
    relative images; without them only absolute paths and URLs are shown.
    """
    from ..validation import check_float, check_positive_int

    check_positive_int("per_prompt", per_prompt)
    check_positive_int("max_prompts", max_prompts)
    check_positive_int("thumb_size", thumb_size)
    check_float("timeout", timeout, minimum=0.0, strict_minimum=True)
    by_id = {record.id: record for record in records} if records is not None else {}
    scored = [row for row in rows if row.get("score") is not None and not _is_nan(row["score"])]
    failed = [row for row in rows if row.get("error") is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(scored, key=lambda r: r.get("index") or 0):
        groups.setdefault(row.get("prompt") or "", []).append(row)

    def record_for(row: dict[str, Any]) -> Record | None:
        if str(row["id"]) in by_id:
            return by_id[str(row["id"])]
        image = row.get("image") or ""
        return Record(int(row.get("index") or 0), str(row["id"]), row.get("prompt"), image, image) \
            if os.path.isabs(image) else None

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE % {'px': thumb_size}}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    values = [float(row["score"]) for row in scored]
    if values:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        parts.append(f"<p class='meta'>{len(rows)} rows, {len(scored)} scored, {len(failed)} errors, "
                     f"{len(groups)} prompts; score mean {mean:+.4f}, std {std:.4f}, min {min(values):+.4f}, "
                     f"max {max(values):+.4f}. Higher is better; scores compare images of the same prompt "
                     f"best.</p>")
        parts.append(_histogram(values))
    else:
        parts.append(f"<p class='meta'>{len(rows)} rows, no scored image, {len(failed)} errors.</p>")
    if len(groups) > max_prompts:
        parts.append(f"<p class='meta'>showing the first {max_prompts} of {len(groups)} prompts</p>")
    for prompt, group in list(groups.items())[:max_prompts]:
        group = sorted(group, key=lambda r: -float(r["score"]))
        parts.append(f"<h2>{html.escape(prompt)}</h2><div class='meta'>{len(group)} images, mean "
                     f"{sum(float(r['score']) for r in group) / len(group):+.4f}</div>")
        if len(group) <= 2 * per_prompt:
            sections = [("all, best first", "top", group)]
        else:
            sections = [(f"top {per_prompt}", "top", group[:per_prompt]),
                        (f"bottom {per_prompt}", "bottom", group[-per_prompt:])]
        for label, css, members in sections:
            figures = "".join(_figure(row, _thumbnail(record_for(row), row, thumb_size, timeout), thumb_size)
                              for row in members)
            parts.append(f"<div class='{css}'><div class='label'>{label}</div><div class='strip'>{figures}</div></div>")
    if failed:
        shown = failed[:200]
        parts.append(f"<h2>Errors ({len(failed)})</h2><table><tr><th>id</th><th>error</th></tr>")
        parts.extend(f"<tr><td>{html.escape(str(row['id']))}</td><td>{html.escape(str(row['error']))}</td></tr>"
                     for row in shown)
        parts.append("</table>")
    parts.append("</body></html>\n")
    path = atomic_write_text(path, "".join(parts), errors="backslashreplace")
    logger.info("wrote gallery %s", path)
    return path


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
