"""Prompts that image generators store with their images, read the way the generators write them.

* **AUTOMATIC1111 / Forge infotext**: the ``parameters`` text chunk of a PNG, the EXIF ``UserComment`` of a JPEG
  or WebP, and the ``IMAGE.txt`` file its "Create a text file next to every image" option writes. The text is
  ``PROMPT`` (one or more lines), then ``Negative prompt: ...`` (optional, may span lines), then one settings line
  ``Steps: 20, Sampler: Euler a, ...``. Only the positive prompt is returned, split off as the WebUI's own
  ``modules/infotext_utils.parse_generation_parameters`` does (the last line is the settings line when it holds at
  least three ``key: value`` pairs, here one of them ``Steps``): the negative prompt and the settings are never
  scored.
* **ComfyUI**: the ``prompt`` text chunk of a PNG (the graph that ran, as JSON). The positive prompt is the
  ``text`` of the ``CLIPTextEncode`` node wired to the ``positive`` input of the samplers (through conditioning
  nodes with one conditioning input, and string nodes); when that is not one unambiguous text (two different
  prompts, a combine node, text computed by another node) the image gets a clear error instead of a guess.

>>> split_infotext("a cat\\nNegative prompt: blurry\\nSteps: 20, Sampler: Euler a, CFG scale: 7")
('a cat', 'blurry', {'Steps': '20', 'Sampler': 'Euler a', 'CFG scale': '7'})
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["split_infotext", "caption_prompt", "embedded_prompt", "comfyui_positive_prompt"]

# A1111 modules/infotext_utils.py re_param_code: one "key: value" pair of the settings line
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_STRING_KEYS = ("value", "text", "string", "prompt")  # the text input of ComfyUI string / primitive nodes


def split_infotext(text: str) -> tuple[str, str, dict[str, str]] | None:
    """``(positive, negative, settings)`` of an A1111/Forge infotext, or ``None`` when ``text`` is not one
    (neither a ``Negative prompt:`` line nor a settings line with ``Steps``): a plain caption."""
    *lines, last = text.strip().split("\n")
    pairs = _PARAM.findall(last)
    settings = len(pairs) >= 3 and any(key.strip() == "Steps" for key, _ in pairs)
    if not settings:
        lines.append(last)
        pairs = []
    positive: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative if in_negative else positive).append(line)
    if not settings and not in_negative:
        return None
    return "\n".join(positive).strip(), "\n".join(negative).strip(), {k.strip(): v.strip() for k, v in pairs}


def caption_prompt(text: str) -> str:
    """The prompt in a caption file: the positive prompt of an A1111 infotext, else the whole (stripped) text."""
    parsed = split_infotext(text)
    return text.strip() if parsed is None else parsed[0]


def _user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment (A1111 writes JPEG/WebP infotext there, ``UNICODE\\0`` + UTF-16)."""
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # noqa: BLE001 - a malformed EXIF block holds no prompt we could trust
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
        return None
    header, body = bytes(raw[:8]), bytes(raw[8:])
    if header == b"UNICODE\0":
        # piexif.helper.UserComment.dump writes big-endian UTF-16; the A1111 reader tries that first
        for encoding in ("utf-16-be", "utf-16-le"):
            try:
                return body.decode(encoding)
            except UnicodeDecodeError:
                continue
        return None
    if header == b"ASCII\0\0\0":
        return body.decode("ascii", errors="replace")
    return None


def embedded_prompt(path: str | Path) -> tuple[str | None, str | None] | None:
    """The positive prompt stored in an image file by A1111/Forge (``parameters`` chunk or EXIF UserComment) or
    ComfyUI (``prompt`` chunk): ``(prompt, None)``, ``(None, error)`` when metadata is there but holds no usable
    positive prompt, or ``None`` when the file carries no generator metadata (or cannot be opened: the image
    loader reports that later)."""
    try:
        with Image.open(path) as image:
            info = dict(image.info)
            comment = None if "parameters" in info or "prompt" in info else _user_comment(image)
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the image loader, with its reason
        return None
    infotext = info.get("parameters") if isinstance(info.get("parameters"), str) else comment
    if infotext:
        parsed = split_infotext(infotext)
        prompt = infotext.strip() if parsed is None else parsed[0]
        return (prompt, None) if prompt else (None, "no prompt: the A1111 infotext in the image has an empty prompt")
    if isinstance(info.get("prompt"), str):
        return comfyui_positive_prompt(info["prompt"])
    if isinstance(info.get("workflow"), str):
        return None, ("no prompt: the image holds a ComfyUI workflow but not the 'prompt' graph that ran, so its "
                      "positive prompt cannot be told; pass --prompt or write an IMAGE.txt sidecar")
    return None


def comfyui_positive_prompt(graph_json: str) -> tuple[str | None, str | None]:
    """The positive prompt of a ComfyUI ``prompt`` graph (API format ``{id: {class_type, inputs}}``):
    ``(prompt, None)`` or ``(None, error)`` saying why it cannot be told reliably."""
    fail = "no prompt: ComfyUI metadata: {}; pass --prompt or write an IMAGE.txt sidecar"
    try:
        graph = json.loads(graph_json)
    except ValueError:
        return None, fail.format("the 'prompt' chunk is not JSON")
    if not isinstance(graph, dict):
        return None, fail.format("the 'prompt' chunk is not a node graph")
    sinks = [node for node in graph.values() if isinstance(node, dict)
             and re.search(r"Sampler|Guider", str(node.get("class_type", "")))]
    texts: set[str] = set()
    for node in sinks:
        inputs = node.get("inputs") or {}
        link = inputs.get("positive", inputs.get("conditioning"))
        if link is None:
            continue
        text, why = _conditioning_text(graph, link, depth=0)
        if why:
            return None, fail.format(why)
        texts.add(text)
    if not texts:
        return None, fail.format("no sampler with a positive prompt in the graph")
    if len(texts) > 1:
        return None, fail.format(f"{len(texts)} different positive prompts in one graph")
    text = texts.pop().strip()
    return (text, None) if text else (None, fail.format("the positive prompt is empty"))


def _node(graph: dict, link: Any) -> dict | None:
    if isinstance(link, list) and len(link) == 2 and isinstance(graph.get(str(link[0])), dict):
        return graph[str(link[0])]
    return None


def _conditioning_text(graph: dict, link: Any, depth: int) -> tuple[str, str | None]:
    """Follow a conditioning link to the text it encodes; ``(text, None)`` or ``("", why not)``."""
    node = _node(graph, link)
    if node is None or depth > 16:
        return "", "a conditioning link leads nowhere"
    kind = str(node.get("class_type", ""))
    inputs = node.get("inputs") or {}
    if kind.startswith("CLIPTextEncode"):
        candidates = [inputs[key] for key in ("text", "text_g", "text_l", "t5xxl", "clip_l") if key in inputs]
        values = [_string(graph, value, depth) for value in candidates]
        if not values or any(value is None for value in values):
            return "", f"the text of {kind} comes from another node, not a plain string"
        distinct = set(values)
        if len(distinct) != 1:
            return "", f"{kind} holds several different texts"
        return distinct.pop(), None
    conditioning = [key for key in ("conditioning", "positive") if key in inputs]
    if len(conditioning) == 1 and not any(key.startswith("conditioning_") for key in inputs):
        return _conditioning_text(graph, inputs[conditioning[0]], depth + 1)
    return "", f"the positive conditioning goes through {kind}, which does not hold one prompt"


def _string(graph: dict, value: Any, depth: int) -> str | None:
    """A text input: a string, or a link to a node holding one text (``value``/``text``/``string``/``prompt``) and
    no links: a primitive or string node."""
    if isinstance(value, str):
        return value
    node = _node(graph, value)
    if node is None or depth > 16:
        return None
    inputs = node.get("inputs") or {}
    strings = [value for key, value in inputs.items() if key in _STRING_KEYS and isinstance(value, str)]
    if len(strings) == 1 and not any(isinstance(value, list) for value in inputs.values()):
        return strings[0]  # e.g. PrimitiveString {"value": ...}; never another node's setting (a checkpoint name)
    return None
