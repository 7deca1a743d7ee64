"""Screenshots of the plugins in their real hosts: ``webui-plugin.png`` and ``comfyui-plugin.png``.

    bash scripts/test-hosts.sh --screenshots docs/images [webui|comfyui|all]

``test-hosts.sh`` prepares each host exactly as for its checks (a throwaway copy of the host tree, the host's venv,
the library installed as README.md says, the plugin copied/linked) and runs this script with a small venv that holds
only ``playwright`` (``IMAGEREWARD_HOST_VENVS=DIR`` keeps it). The host itself is started by
``scripts/host_checks.py --serve`` under the host's Python, offline on 127.0.0.1, with the tiny random ImageReward
and the random SD 1.x checkpoint the checks use. The browser is Debian's headless Chromium (``apt-get install
chromium``), never one downloaded by ``playwright install``. Each screenshot comes from one generation driven
through the host's own UI:

- WebUI: txt2img with *Script -> ImageReward - generate human preference scores* and the tiny scorer's folder as
  the scorer, 4 images of 128x128 in 2 steps; the gallery and the infotext show the scores.
- ComfyUI: the shipped ``comfyui/example_workflows/txt2img_score_filter.json`` made quick as the checks make it,
  loaded into the canvas with ``app.loadApiJson`` and queued; the *show scores* node displays the scores in its own
  text box (``comfyui/js/show_scores.js``, served from the package's ``WEB_DIRECTORY``).

To run it by hand: ``python scripts/host_screenshots.py webui|comfyui --host-python VENV/bin/python
--host-dir TREE --cache DIR --work DIR --out docs/images``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_checks  # noqa: E402  (the checks' helpers: prompt, script title, workflow shrinking)

log = logging.getLogger("host_screenshots")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
GENERATION_TIMEOUT_MS = 600_000  # a CPU shared with other jobs: generous


@contextlib.contextmanager
def served_host(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """``host_checks.py NAME --serve`` under the host's Python: yields ``{"url": ..., "tiny": ...}`` once the host
    is ready; closing its stdin on exit makes it stop the host."""
    argv = [args.host_python, str(Path(host_checks.__file__)), args.host, "--serve", "--host-dir", args.host_dir,
            "--cache", args.cache, "--work", args.work]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                served = json.loads(line)
                break
            log.info("%s", line.rstrip())
        else:
            raise RuntimeError(f"{args.host} did not start (host_checks.py --serve exited with {proc.wait()})")
        log.info("%s is up at %s", args.host, served["url"])
        yield served
    finally:
        proc.stdin.close()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.terminate()  # host_checks turns SIGTERM into an exit that still stops the host
            proc.wait(60)


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    """A page of Debian's headless Chromium with a fresh profile, 1400x900."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise SystemExit(f"host_screenshots.py needs playwright ({err}): `pip install playwright pillow` into the "
                         "Python that runs it (test-hosts.sh --screenshots makes such a venv); the browser is "
                         f"{CHROMIUM} (`apt-get install chromium`), so no `playwright install`") from None
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"no {CHROMIUM}: `apt-get install -y chromium`")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="ir-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            yield context.new_page()
        finally:
            context.close()


def save_small(png: bytes, out: Path) -> None:
    """The screenshot as a 256-colour PNG: the random checkpoint's noise images make a full-colour one ~450 KB."""
    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, optimize=True)


# ------------------------------------------------------------------------------------------- WebUI
def set_number(page: Any, elem_id: str, value: int) -> None:
    """A WebUI slider, through its number box (as a user typing it)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page: Any, dropdown: str, value: str) -> None:
    """Pick ``value`` in a gradio 3 dropdown (typing it also sets a custom value where the dropdown allows it)."""
    box = page.locator(f"{dropdown} input").first
    box.click()
    box.fill(value)
    box.press("Enter")


def webui_screenshot(page: Any, url: str, tiny: str, out: Path) -> None:
    page.goto(url)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
    page.locator("#txt2img_prompt textarea").fill(host_checks.PROMPT)
    for elem_id, value in (("txt2img_steps", 2), ("txt2img_width", 128), ("txt2img_height", 128),
                           ("txt2img_batch_size", 4)):
        set_number(page, elem_id, value)
    choose(page, "#tab_txt2img #script_list", host_checks.TITLE)
    page.locator("#tab_txt2img [id$='_scorer']").first.wait_for(state="visible")
    choose(page, "#tab_txt2img [id$='_scorer']", tiny)  # the scorer box takes a local checkpoint's path
    page.locator("#txt2img_generate").click()
    log.info("webui: generating (4 images, 128x128, 2 steps), then scoring")
    # the script's summary ("ImageReward Scores: ...") comes under the gallery once the samples are scored
    page.wait_for_function("document.querySelector('#tab_txt2img').innerText.includes('ImageReward Scores:')",
                           timeout=GENERATION_TIMEOUT_MS, polling=1000)
    page.locator("#txt2img_gallery .thumbnail-item").nth(1).click()  # the best sample (the grid comes first)
    page.wait_for_function("document.querySelector('#tab_txt2img').innerText.includes('ImageReward Score: ')",
                           timeout=30_000)
    time.sleep(1)
    tab = page.locator("#tab_txt2img").bounding_box()
    bottom = tab["y"] + tab["height"] + 8  # the whole txt2img tab: the script's controls are at its foot
    save_small(page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom}),
               out)


# ------------------------------------------------------------------------------------------- ComfyUI
def comfyui_workflow(tiny: str) -> dict[str, Any]:
    """The shipped txt2img workflow as the checks run it."""
    shipped = host_checks.REPO / "comfyui" / "example_workflows" / "txt2img_score_filter.json"
    return host_checks.quick_txt2img(json.loads(shipped.read_text()), f"{Path(tiny).name}/", size=128,
                                     batch_size=4, steps=2)


FRAME_SCORING_NODES = """() => {
  // the view on the nodes after VAE Decode (scores, filter, save, show), zoomed to fit; no minimap.
  // Returns the zoom and how far down the page the nodes reach.
  const app = window.app, canvas = app.canvas;
  app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
  const nodes = app.graph._nodes.filter(n => /ImageRewardS|ImageRewardR|SaveImage|VAEDecode/.test(n.type));
  nodes.filter(n => n.type === "ImageRewardShowScores").forEach(n => n.setSize([360, 190]));  // four lines
  nodes.filter(n => n.type === "SaveImage").forEach(n => n.setSize([n.size[0], 280]));  // its previews inside
  const title = 30, margin = 60, top = 90;  // room for the menu and tab bars
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const width = canvas.canvas.clientWidth - 2 * margin, height = canvas.canvas.clientHeight - top - margin;
  const scale = Math.min(1, width / (x1 - x0), height / (y1 - y0));
  canvas.ds.scale = scale;
  canvas.ds.offset = [margin / scale - x0 + (width / scale - (x1 - x0)) / 2, top / scale - y0];
  canvas.setDirty(true, true);
  return [scale, top + (y1 - y0) * scale + margin];
}"""


def comfyui_screenshot(page: Any, url: str, tiny: str, out: Path) -> None:
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph", timeout=120_000)
    time.sleep(3)  # the frontend settles (extensions, the first-run template dialog) after `app` appears
    page.evaluate("workflow => window.app.loadApiJson(workflow, 'txt2img_score_filter.json')",
                  comfyui_workflow(tiny))
    page.evaluate("window.app.queuePrompt(0, 1)")
    log.info("comfyui: queued txt2img_score_filter.json (4 images, 128x128, 2 steps)")
    page.wait_for_function(  # the show-scores node's own text box (js/show_scores.js) gets the scores
        "window.app.graph._nodes.some(n => n.type === 'ImageRewardShowScores' && (n.widgets || []).some("
        "w => w.name === 'scores_text' && String(w.value).includes('ImageReward Score')))",
        timeout=GENERATION_TIMEOUT_MS, polling=1000)
    for _ in range(3):  # the template dialog a fresh profile gets, and any toast
        page.keyboard.press("Escape")
        time.sleep(0.5)
    zoom, bottom = page.evaluate(FRAME_SCORING_NODES)
    log.info("comfyui: zoom %.2f", zoom)
    time.sleep(2)
    height = min(VIEWPORT["height"], max(500, bottom))
    save_small(page.screenshot(clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}), out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", choices=["webui", "comfyui"])
    parser.add_argument("--host-python", required=True, help="the host venv's python (the library installed)")
    parser.add_argument("--host-dir", required=True)
    parser.add_argument("--cache", required=True, help="as for host_checks.py: Hub cache, random SD checkpoint")
    parser.add_argument("--work", required=True, help="throwaway folder for this run")
    parser.add_argument("--out", required=True, help="folder for the PNG (docs/images)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[host_screenshots] %(message)s")
    out = Path(args.out) / f"{args.host}-plugin.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    shoot = webui_screenshot if args.host == "webui" else comfyui_screenshot
    with served_host(args) as served, browser_page() as page:
        shoot(page, served["url"], served["tiny"], out)
    print(f"{args.host}: {out} ({out.stat().st_size // 1024} KiB) in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
