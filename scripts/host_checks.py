"""The real-host checks run by ``scripts/test-hosts.sh``: start a host, drive it over HTTP, assert, stop it.

Run with the *host's* Python (its venv, where the library was installed as the README says), never with the
project on ``sys.path``: ``python scripts/host_checks.py webui|forge|comfyui --host-dir DIR --cache DIR``.
It builds what it needs offline (a tiny ImageReward, tiny OpenAI-layout CLIP + aesthetic head written by the
current torch, for the WebUIs a random-weight SD 1.x checkpoint and the CLIP tokenizer in a local ``HF_HOME``),
starts the host on 127.0.0.1, checks scores, infotexts / PNG info, saved files re-scored, filter and sort, an
all-filtered run, unloading and the errors users see, stops the host by its PID, and prints one result line.
``forge`` (SD WebUI Forge) runs the WebUI checks with Forge's start flags and its differences: API errors as
``{"error", "detail", "body", "message"}`` and *Stealth infotext* (default ``Alpha``) in the saved PNGs.

``--serve`` starts the host the same way, prints one JSON line (``{"url": ..., "tiny": ...}``) and keeps it running
until its stdin closes, then stops it: ``scripts/host_screenshots.py`` drives it with a browser.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"
TITLE = "ImageReward - generate human preference scores"
RANDOM_SD_CHECKPOINT = "sd15-random-v2.safetensors"  # v2: random biases (a cached v1 made the WebUI produce NaNs)
CHECKS: list[str] = []
SKIPPED: list[str] = []  # checks that could not run here, named in the result line


def check(condition: bool, what: str, detail: object = "") -> None:
    if not condition:
        raise AssertionError(f"{what}: {detail}")
    CHECKS.append(what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: object = None, timeout: float = 600) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Host:
    """A host process started on 127.0.0.1 with its output in a log file, stopped by its PID."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_for(self, url: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"host exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise RuntimeError(f"host not up after {timeout:.0f} s; log:\n{self.tail()}")

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while text not in self.text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{text!r} not in the host's log after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(1)

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we started: the host and its children
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclasses.dataclass
class Running:
    """A started host: its base URL, the tiny ImageReward folder it can use, how long it took to be ready, and
    (WebUI) the ``IMAGEREWARD_CACHE`` it was given."""

    host: Host
    base: str
    tiny: Path
    ready_s: float
    ir_cache: Path | None = None


# ------------------------------------------------------------------------------------------- fixtures
def tiny_image_reward(folder: Path) -> Path:
    """A tiny ImageReward (``save_pretrained`` folder) whose head gives clearly different scores: the same one
    the plugin tests use (``tests/webui_shim.py``)."""
    return _from_tests("webui_shim").save_tiny_image_reward(folder)


def _from_tests(module: str):
    """A helper module of ``tests/`` (imported by the host's Python; they need only torch and the library)."""
    import importlib

    sys.path.insert(0, str(REPO / "tests"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.pop(0)


def tiny_openai_weights(root: Path) -> None:
    """``ViT-L-14.pt`` (a tiny CLIP in OpenAI's layout, plain ``torch.save``) and the aesthetic head ``.pth``,
    both written by the current torch: the files the WebUI's torch.load patch refuses."""
    import torch

    OpenAICLIP = _from_tests("openai_clip_layout").OpenAICLIP
    from ImageReward.models.clip import tiny_clip_hparams
    from ImageReward.models.image_reward import RewardHead

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    torch.save(OpenAICLIP(tiny_clip_hparams()).eval().state_dict(), root / "ViT-L-14.pt")
    head = RewardHead(tiny_clip_hparams()["embed_dim"])
    for param in head.parameters():
        torch.nn.init.normal_(param, std=0.2)
    torch.save(head.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")


def decode(b64: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def score_of(text: str, key: str = "ImageReward Score") -> float:
    match = re.search(re.escape(key) + r": (-?[\d.]+)", text)
    if match is None:
        raise AssertionError(f"no {key!r} in {text!r}")
    return float(match.group(1))


# ------------------------------------------------------------------------------------------- WebUI
def clip_hf_cache(hf_home: Path) -> None:
    """``openai/clip-vit-large-patch14`` config + tokenizer in a local Hub cache (no weights: the WebUI builds
    the text encoder from its config and loads the checkpoint's weights)."""
    from ImageReward.clip_tokenizer import _vocab_and_merges
    from ImageReward.models.clip import clip_config

    repo = hf_home / "hub" / "models--openai--clip-vit-large-patch14"
    revision = "0" * 40  # any name: refs/main points at it
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    vocab, merges = _vocab_and_merges()
    (snapshot / "vocab.json").write_text(json.dumps(vocab))
    (snapshot / "merges.txt").write_text("\n".join(["#version: 0.2"] + [" ".join(m) for m in merges]) + "\n")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({
        "unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "do_lower_case": True, "model_max_length": 77}))
    (snapshot / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    config = clip_config().to_dict()
    config.pop("_attn_implementation", None)
    config["architectures"] = ["CLIPModel"]
    (snapshot / "config.json").write_text(json.dumps(config))


def random_sd_checkpoint(webui: Path, hf_home: Path, out: Path) -> None:
    """A random-weight SD 1.x checkpoint in the single-file layout: the parameters of the WebUI's own
    v1-inference.yaml model (ldm code in repositories/, built on the meta device: no memory, no init), drawn
    N(0, 0.02) in fp16 (norm weights 1). Buffers (noise schedule, position ids) are left out: the hosts
    compute them and load checkpoints non-strictly. Peak memory: the 2.1 GB written."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    import torch
    import transformers

    sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))
    from ldm.models.diffusion import ddpm
    from ldm.util import instantiate_from_config

    transformers.CLIPTextModel.from_pretrained = classmethod(  # config only: the weights are drawn below
        lambda cls, name, *a, **k: cls(transformers.CLIPTextConfig.from_pretrained(name)))
    tokens = transformers.CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")("a photo of a cat")
    check(tokens["input_ids"][1:-1] == [320, 1125, 539, 320, 2368], "CLIP tokenizer in the local Hub cache",
          tokens["input_ids"])
    config = OmegaConf.load(webui / "configs" / "v1-inference.yaml")
    schedules = ddpm.DDPM.register_schedule, ddpm.LatentDiffusion.register_schedule

    def no_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, *args, **kwargs):
        self.num_timesteps = int(timesteps)  # the schedule itself is numpy work the meta device cannot do

    ddpm.DDPM.register_schedule = ddpm.LatentDiffusion.register_schedule = no_schedule
    try:
        with torch.device("meta"):
            model = instantiate_from_config(config.model)
    finally:
        ddpm.DDPM.register_schedule, ddpm.LatentDiffusion.register_schedule = schedules
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = ("norm" in name and leaf == "weight" and param.ndim == 1)
        if is_norm:
            value = torch.ones(param.shape, dtype=torch.float16)
        else:  # biases too: with zero biases the empty prompt's CLIP output has mean exactly 0, and the WebUI's
            # prompt-emphasis renormalisation (z * mean / new mean) turns it into NaN ("NaNs in Unet")
            value = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.float16)
        state[name] = value
    del model
    save_file(state, str(out))


@contextlib.contextmanager
def webui_running(args: argparse.Namespace) -> Iterator[Running]:
    """The WebUI (``args.host``: ``webui`` or ``forge``) with the random SD checkpoint, ready for txt2img (its
    log's errors printed if anything fails), stopped on exit. Its ``IMAGEREWARD_CACHE`` holds the tiny CLIP and
    aesthetic weights. The checkpoint is built with the ldm code of ``args.sd_code`` (an A1111 tree; default
    the host's own) when the cache has none."""
    import ImageReward as RM

    webui, cache, work = Path(args.host_dir), Path(args.cache), Path(args.work)
    check("site-packages" in RM.__file__, "library imported from the venv, not the source tree", RM.__file__)
    hf_home = Path(os.environ.get("HF_HOME", cache / "hf-home"))  # set before huggingface_hub is imported
    if not (hf_home / "hub" / "models--openai--clip-vit-large-patch14" / "refs" / "main").is_file():
        clip_hf_cache(hf_home)  # not just "hub/": huggingface_hub creates that empty folder on import
    ckpt = cache / RANDOM_SD_CHECKPOINT
    if not ckpt.is_file():
        started = time.time()
        random_sd_checkpoint(Path(args.sd_code or webui), hf_home, ckpt.with_suffix(".part"))
        ckpt.with_suffix(".part").rename(ckpt)
        print(f"built {ckpt} in {time.time() - started:.0f} s", flush=True)
    tiny = tiny_image_reward(work / "tiny-ir")
    ir_cache = work / "ir-cache"
    tiny_openai_weights(ir_cache)

    port = free_port()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "IMAGEREWARD_CACHE": str(ir_cache), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    argv = [sys.executable, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--no-download-sd-model", "--use-cpu", "all", "--no-half", "--api", "--server-name", "127.0.0.1",
            "--port", str(port), "--ckpt", str(ckpt), "--skip-version-check"]
    if args.host == "forge":  # Forge's backend picks its device from these; without them it asks CUDA
        argv += ["--always-cpu", "--all-in-fp32"]
    host = Host(argv, webui, env, work / f"{args.host}.log")
    base = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        host.wait_for(f"{base}/sdapi/v1/scripts", 600)
        # The API answers before it is ready: Api.__init__ adds its routes to the running server, then builds the
        # default script args by calling every script's ui(); a txt2img before that gets none of its script_args
        # (run() receives 0 values). The WebUI prints "Startup time" once everything is set up.
        host.wait_for_log("Startup time:", 300)
        status, scripts = http("GET", f"{base}/sdapi/v1/scripts")
        check(TITLE.lower() in scripts["txt2img"] and TITLE.lower() in scripts["img2img"],
              "script listed for txt2img and img2img", scripts)
        yield Running(host, base, tiny, time.time() - started, ir_cache)
    except BaseException:
        log = host.text().splitlines()
        for index, line in enumerate(log):  # errors while the WebUI built the script's UI, then the end of the log
            if "Error creating UI" in line or "Error calling" in line or "Error loading script" in line:
                print("\n".join(log[index:index + 40]), file=sys.stderr)
        print(host.tail(80), file=sys.stderr)
        raise
    finally:
        host.stop()


def run_webui(args: argparse.Namespace) -> str:
    """The WebUI checks, for A1111 (``args.host == "webui"``) and Forge (``"forge"``)."""
    import ImageReward as RM

    forge = args.host == "forge"

    def api_error(result: object) -> str:
        """The message of an API error: A1111 answers ``{"error", "detail", "body", "errors"}``, Forge
        ``{"error", "detail", "body", "message"}``."""
        keys = ("error", "detail", "body", "message" if forge else "errors")
        check(isinstance(result, dict) and set(keys) <= set(result), "API error format", result)
        return str(result[keys[-1]])

    with webui_running(args) as web:
        host, base, tiny, start_s, ir_cache = web.host, web.base, web.tiny, web.ready_s, web.ir_cache
        webui = Path(args.host_dir)
        started = time.time() - start_s

        def txt2img(*script_args, save=True, batch=2, n_iter=2):
            body = {"prompt": PROMPT, "negative_prompt": "", "seed": 1234, "steps": 1, "width": 64, "height": 64,
                    "batch_size": batch, "n_iter": n_iter, "sampler_name": "Euler", "cfg_scale": 7,
                    "script_name": TITLE, "script_args": list(script_args), "send_images": True,
                    "save_images": save}
            return http("POST", f"{base}/sdapi/v1/txt2img", body)

        # 1. scores, sorted, in infotexts and PNG info; equal to the library's score of the returned pixels
        status, result = txt2img(False, "0", True, str(tiny))
        if status != 200:  # say what the host made of the script's arguments
            _, info = http("GET", f"{base}/sdapi/v1/script-info")
            print(json.dumps([s for s in info if s.get("name") == TITLE.lower()], indent=1), file=sys.stderr)
        check(status == 200, "txt2img with the script", result)
        info = json.loads(result["info"])
        first = info["index_of_first_image"]
        samples = [decode(b) for b in result["images"][first:]]
        texts = info["infotexts"][first:]
        check(len(samples) == 4 and first == 1, "4 samples after the grid", (len(samples), first))
        modes = [decode(b).mode for b in result["images"]]
        check(modes[1:] == ["RGB"] * 4, "API samples are RGB, as A1111 returns them", modes)
        grid = decode(result["images"][0])  # Forge's own image_grid makes RGBA grids (its grid_background_color)
        alpha = grid.getchannel("A").getextrema() if grid.mode == "RGBA" else None
        check(grid.mode == "RGB" or (forge and alpha == (255, 255)), "API grid as the host makes it, nothing hidden "
              "in it", (grid.mode, alpha))
        scores = [score_of(t) for t in texts]
        check(scores == sorted(scores, reverse=True) and len(set(scores)) == 4, "sorted best first", scores)
        model = RM.load(str(tiny), device="cpu")
        expected = model.score_batch(PROMPT, [im.convert("RGB") for im in samples]).tolist()
        check(max(abs(a - b) for a, b in zip(scores, expected)) <= 6e-5, "infotext scores = library scores",
              (scores, expected))
        status, png = http("POST", f"{base}/sdapi/v1/png-info", {"image": "data:image/png;base64," +
                                                                    result["images"][first]})
        check(score_of(png["info"]) == scores[0] and png["parameters"].get("ImageReward Score") == f"{scores[0]:.4f}",
              "png-info parses the score", png)
        saved = sorted((webui / "outputs" / "txt2img-images").rglob("*.png"))
        saved_scores = sorted((score_of(decode(base64.b64encode(p.read_bytes())).info["parameters"])
                               for p in saved), reverse=True)
        check(saved_scores == scores, "saved PNGs carry their scores", (saved_scores, scores))
        for path in saved:  # the file a user re-scores (CLI, score-dataset): the score written into it
            written = score_of(decode(base64.b64encode(path.read_bytes())).info["parameters"])
            rescored = model.score(PROMPT, str(path))
            check(abs(written - rescored) <= 6e-5, "saved PNG re-scores to the score in its infotext",
                  (path.name, written, rescored))
        if forge:  # Forge's default Stealth infotext = Alpha: the saved file carries the infotext twice
            png = decode(base64.b64encode(saved[0].read_bytes()))
            hidden = _from_tests("webui_shim").read_stealth_infotext(png)  # Forge's reader, as the shim has it
            check(png.mode == "RGBA" and hidden == png.info["parameters"],
                  "Forge's stealth infotext (alpha) in the saved PNG holds the score", png.mode)

        # 2. filter + sort: the kept samples, best first, and a grid of exactly them
        limit = (scores[1] + scores[2]) / 2
        status, result = txt2img(True, repr(limit), True, str(tiny))
        info = json.loads(result["info"])
        first = info["index_of_first_image"]
        kept = [score_of(t) for t in info["infotexts"][first:]]
        check(kept == scores[:2], "filter keeps the two above the limit, best first", (kept, scores, limit))
        grid = decode(result["images"][0]).convert("RGB")
        tile = grid.crop((0, 0, 64, 64))
        best = decode(result["images"][first]).convert("RGB")
        check(first == 1 and grid.size == (128, 64) and list(tile.getdata()) == list(best.getdata()),
              "grid holds only the kept samples, best first", grid.size)
        check(info["all_seeds"] == info["all_seeds"][:2] and len(info["all_seeds"]) == 2, "seeds follow the kept",
              info["all_seeds"])

        # 3. sort off: generation order
        status, result = txt2img(False, "0", False, str(tiny), save=False)
        info = json.loads(result["info"])
        check(info["all_seeds"] == [1234, 1235, 1236, 1237], "sort off keeps generation order", info["all_seeds"])

        # 4. every image filtered: no image, and the reason in info
        status, result = txt2img(True, "1e9", True, str(tiny), save=False)
        info = json.loads(result["info"])
        check(status == 200 and result["images"] == [] and "all 4 images scored below the limit"
              in info["infotexts"][0], "all-filtered run says why", info["infotexts"])

        # 5. CLIP and Aesthetic on the WebUI's transformers 4.30.2, weights written by current torch
        for name in ("CLIP", "Aesthetic"):
            status, result = txt2img(False, "0", True, name, save=False, batch=2, n_iter=1)
            check(status == 200, f"{name} scorer runs in the host", result)
            info = json.loads(result["info"])
            got = [score_of(t, f"{name} Score") for t in info["infotexts"][info["index_of_first_image"]:]]
            scorer = RM.load_score(name, device="cpu", download_root=ir_cache)
            images = [decode(b).convert("RGB") for b in result["images"][info["index_of_first_image"]:]]
            ref = scorer.score_batch(PROMPT, images).tolist()
            check(len(got) == 2 and max(abs(a - b) for a, b in zip(got, ref)) <= 6e-5,
                  f"{name} scores = library scores", (got, ref))

        # 6. "Unload Model From Memory" (a gradio button: called as the UI calls it)
        status, config = http("GET", f"{base}/config")
        button = next(c["id"] for c in config["components"]
                      if re.search(r"imagereward.*_unload$", str(c.get("props", {}).get("elem_id", ""))))
        fn_index = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])
                        if any(t == button or (isinstance(t, list) and t[0] == button) for t in dep["targets"]))
        unload = {"fn_index": fn_index, "data": [], "session_hash": "hosttest"}
        status, first_unload = http("POST", f"{base}/run/predict", unload)
        status2, second_unload = http("POST", f"{base}/run/predict", unload)
        check(status == status2 == 200 and "ImageReward model unloaded" in str(first_unload)
              and "No ImageReward model was loaded" in str(second_unload), "unload button frees the scorer",
              (first_unload, second_unload))
        status, result = txt2img(False, "0", True, str(tiny), save=False, batch=2, n_iter=1)
        check(status == 200 and len(json.loads(result["info"])["infotexts"]) == 2, "scores again after unload",
              result.get("info") if isinstance(result, dict) else result)

        # 7. the errors users see
        status, result = txt2img(False, "0", True, "nope", save=False)
        check(status == 500 and "unknown scorer 'nope'" in api_error(result),
              "unknown scorer named in the API error", result)
        status, result = txt2img(True, "abc", True, str(tiny), save=False)
        check("Lower score limit must be a number" in api_error(result), "bad limit named in the API error", result)
        status, result = txt2img(True, "-1e9", save=False)  # the original plugin's 2 script_args
        check(status == 500 and "argument 3 (scorer_name)" in api_error(result),
              "2 script_args (shifted onto the next script's slots) named in the API error", result)
        log = host.text()
        check("Error verifying pickled file" not in log, "the WebUI's safe unpickler never refused our files")
        elapsed = time.time() - started
    return f"started in {start_s:.0f} s, checks took {elapsed - start_s:.0f} s"


# ------------------------------------------------------------------------------------------- ComfyUI
def quick_txt2img(workflow: dict, scorer: str, size: int = 64, batch_size: int = 2, steps: int = 1) -> dict:
    """A copy of the shipped ``txt2img_score_filter.json`` that runs in seconds on a CPU with the random SD
    checkpoint: small latents, few steps, the given scorer (``tiny-ir/``), and a filter that keeps every image."""
    t2i = json.loads(json.dumps(workflow))
    t2i["4"]["inputs"].update(width=size, height=size, batch_size=batch_size)
    t2i["5"]["inputs"]["steps"] = steps
    t2i["7"]["inputs"]["scorer"] = scorer
    t2i["9"]["inputs"]["min_score"] = -1e4
    return t2i


@contextlib.contextmanager
def comfyui_running(args: argparse.Namespace) -> Iterator[Running]:
    """ComfyUI with the tiny ImageReward in ``models/image_reward/tiny-ir`` and, once the WebUI run built it, the
    random SD checkpoint as ``v1-5-pruned-emaonly.safetensors``; stopped on exit (the end of its log printed if
    anything fails)."""
    import ImageReward as RM

    comfy, cache, work = Path(args.host_dir), Path(args.cache), Path(args.work)
    check("site-packages" in RM.__file__, "library imported from the venv, not the source tree", RM.__file__)
    tiny = tiny_image_reward(comfy / "models" / "image_reward" / "tiny-ir")
    ckpt = cache / RANDOM_SD_CHECKPOINT
    if ckpt.is_file():
        (comfy / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").symlink_to(ckpt)

    port = free_port()
    # No HF_HUB_OFFLINE here: a user whose machine is offline rarely sets it. The Hub endpoint is a closed local
    # port, so that "offline" holds on any machine, and the missing-weights error must still come at once.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    for name in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    host = Host([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)], comfy, env,
                work / "comfyui.log")
    base = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        host.wait_for(f"{base}/object_info/ImageRewardLoader", 600)
        yield Running(host, base, tiny, time.time() - started)
    except BaseException:
        print(host.tail(80), file=sys.stderr)
        raise
    finally:
        host.stop()


def run_comfyui(args: argparse.Namespace) -> str:
    import ImageReward as RM

    comfy, cache = Path(args.host_dir), Path(args.cache)
    nodes_dir = comfy / "custom_nodes" / "ImageReward"
    workflows = {p.name: json.loads(p.read_text()) for p in (nodes_dir / "example_workflows").glob("*.json")}
    check(set(workflows) == {"score_filter_save.json", "txt2img_score_filter.json"}, "example workflows shipped",
          sorted(workflows))
    ckpt = cache / RANDOM_SD_CHECKPOINT
    with comfyui_running(args) as comfy_ui:
        host, base, tiny, start_s = comfy_ui.host, comfy_ui.base, comfy_ui.tiny, comfy_ui.ready_s
        started = time.time() - start_s

        def run(prompt: dict, timeout: float = 600) -> dict:
            status, queued = http("POST", f"{base}/prompt", {"prompt": prompt})
            if status != 200:
                return {"refused": queued}
            prompt_id = queued["prompt_id"]
            deadline = time.time() + timeout
            while time.time() < deadline:
                status, history = http("GET", f"{base}/history/{prompt_id}")
                if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                    if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                        return history[prompt_id]
                time.sleep(0.5)
            raise TimeoutError(f"prompt {prompt_id} not done in {timeout} s")

        def loads() -> int:
            return host.text().count("ImageReward: loading")

        check("IMPORT FAILED" not in host.text() or "ImageReward" not in host.text().split("IMPORT FAILED")[1][:300],
              "node package imported")
        status, info = http("GET", f"{base}/object_info")
        ours = {k: v for k, v in info.items() if v.get("category") == "ImageReward"}
        check(len(ours) == 5 and ours["ImageRewardShowScores"]["output_node"], "five nodes, one output node",
              sorted(ours))
        # the frontend extension that draws show scores' text in the node (WEB_DIRECTORY = "./js")
        status, extensions = http("GET", f"{base}/extensions")
        script = "/extensions/ImageReward/show_scores.js"  # the custom_nodes folder is named ImageReward
        check(status == 200 and script in extensions, "show_scores.js listed in /extensions", extensions)
        status, js = http("GET", f"{base}{script}")
        check(status == 200 and "ImageRewardShowScores" in js and "onExecuted" in js, "show_scores.js served",
              (status, str(js)[:200]))
        choices = ours["ImageRewardLoader"]["input"]["required"]["scorer"][0]
        check("tiny-ir/" in choices and "ImageReward-v1.0" in choices, "models/image_reward listed", choices)

        # 1. the shipped workflow, with the tiny checkpoint: scores, top-2 best first, saved PNGs
        prompt = json.loads(json.dumps(workflows["score_filter_save.json"]))
        prompt["6"]["inputs"]["scorer"] = "tiny-ir/"
        entry = run(prompt)
        check(entry.get("status", {}).get("status_str") == "success", "score_filter_save.json runs", entry)
        shown = entry["outputs"]["10"]
        kept = shown["scores"]
        files = entry["outputs"]["9"]["images"]
        check(len(kept) == 2 and kept == sorted(kept, reverse=True) and len(files) == 2, "top-2 best first saved",
              (kept, files))
        model = RM.load(str(tiny), device="cpu")
        pngs = [comfy / "output" / f["subfolder"] / f["filename"] for f in files]
        ref = [model.score(prompt["7"]["inputs"]["prompt"], str(p)) for p in pngs]  # the CLI's path: the file
        check(max(abs(a - b) for a, b in zip(kept, ref)) <= 1e-5, "scores = library scores of the saved PNGs",
              (kept, ref))
        check(shown["text"][0].splitlines()[0] == f"ImageReward Score: {kept[0]:.4f}", "show scores text", shown)

        # 2. nothing passes the filter: SaveImage skipped, no error
        blocked = json.loads(json.dumps(prompt))
        blocked["8"]["inputs"].update(top_k=0, use_min_score=True, min_score=1e4)
        entry = run(blocked)
        check(entry["status"]["status_str"] == "success" and "9" not in entry["outputs"]
              and entry["outputs"]["10"]["text"] == ["ImageReward Score: no image"], "all-filtered run is clean",
              entry)

        # 3. unloading: cached while inputs are unchanged; "Free model and node cache" releases the scorer
        before = loads()
        run(prompt)
        check(loads() == before, "scorer reused from ComfyUI's cache", loads())
        status, _ = http("POST", f"{base}/free", {"unload_models": True, "free_memory": True})
        time.sleep(2)
        entry = run(prompt)
        check(status == 200 and loads() == before + 1 and entry["status"]["status_str"] == "success",
              "/free released the scorer; the next run loads it again", (before, loads()))

        # 4. the txt2img workflow with a random SD checkpoint, scores named in the file name
        if ckpt.is_file():
            t2i = quick_txt2img(workflows["txt2img_score_filter.json"], "tiny-ir/")
            entry = run(t2i)
            check(entry["status"]["status_str"] == "success", "txt2img_score_filter.json runs", entry["status"])
            names = [f["filename"] for f in entry["outputs"]["11"]["images"]]
            check(len(names) == 2 and all(re.fullmatch(r"IR_-?[\d.]+_IR_-?[\d.]+_\d{5}_\.png", n) for n in names),
                  "scores as a file name: no ':' or newline", names)

        else:
            SKIPPED.append(f"txt2img workflow (no {ckpt.name} yet: `test-hosts.sh webui` builds it)")

        # 5. the errors users see: missing official weights, the Hub unreachable (HF_HUB_OFFLINE not set), named
        #    with the folder at once instead of after ~25 s of huggingface_hub retries
        missing = json.loads(json.dumps(prompt))
        missing["6"]["inputs"]["scorer"] = "HPSv2.1"
        t0 = time.time()
        entry = run(missing)
        took = time.time() - t0
        messages = json.dumps(entry["status"]["messages"])
        check(entry["status"]["status_str"] == "error" and "HPS_v2.1_compressed.pt" in messages
              and "cannot reach 127.0.0.1" in messages and "models/image_reward" in messages
              and "download_root" not in messages and took < 10, "missing weights offline: one clear error at once",
              (round(took, 1), messages))
        elapsed = time.time() - started
    return f"started in {start_s:.0f} s, checks took {elapsed - start_s:.0f} s"


def serve(args: argparse.Namespace) -> int:
    """Start the host as the checks do, print ``{"url": ..., "tiny": ...}`` and keep it until stdin closes (or
    SIGTERM), then stop it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally that stops the host
    with (comfyui_running if args.host == "comfyui" else webui_running)(args) as running:
        print(json.dumps({"url": running.base, "tiny": str(running.tiny)}), flush=True)
        sys.stdin.read()  # EOF: the driver is done (or gone)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host", choices=["webui", "forge", "comfyui"])
    parser.add_argument("--sd-code", help="an A1111 WebUI tree whose ldm code builds the random SD checkpoint "
                        "(default: --host-dir)")
    parser.add_argument("--host-dir", required=True)
    parser.add_argument("--cache", required=True, help="reused between runs: Hub cache, random SD checkpoint")
    parser.add_argument("--work", required=True, help="throwaway folder for this run")
    parser.add_argument("--serve", action="store_true", help="start the host, print its URL, run no checks")
    args = parser.parse_args()
    import torch  # here, not at the top: scripts/host_screenshots.py imports this module where torch is absent

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.serve:
        return serve(args)
    started = time.time()
    try:
        summary = (run_comfyui if args.host == "comfyui" else run_webui)(args)
    except Exception as err:
        print(f"{args.host}: FAILED after {time.time() - started:.0f} s, {len(CHECKS)} checks passed; "
              f"{type(err).__name__}: {str(err)[:2000]}", flush=True)
        return 1
    skipped = f"; SKIPPED: {'; '.join(SKIPPED)}" if SKIPPED else ""
    print(f"{args.host}: PASSED {len(CHECKS)} checks in {time.time() - started:.0f} s ({summary}){skipped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
