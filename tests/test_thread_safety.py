"""Issue 28, kind 1: a loaded scorer is ready for concurrent use, first call included (Gradio, ComfyUI and the
reward server call scorers from many threads). Before the fix, 15 of 16 threads' first ``model.score`` raised
``ImportError: cannot import name 'BertTokenizer' from 'transformers'`` (transformers' lazy imports are not
thread-safe). The bug only shows on the first use in a fresh interpreter, so each case runs in its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import json, sys, threading
    import torch
    from PIL import Image
    import ImageReward as RM

    kind, where = sys.argv[1], sys.argv[2]
    if kind == "load":
        model = RM.load(where, device="cpu")
    elif kind == "blip":
        from ImageReward.models.blip import BLIPConfig
        from ImageReward.models.blip_itc import BLIPITCScorer
        torch.manual_seed(0)
        model = BLIPITCScorer(BLIPConfig.tiny()).eval()
    else:
        model = RM.load_scorer(kind, device="cpu", download_root=where)
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    barrier = threading.Barrier(16)
    scores, errors = [None] * 16, []

    def work(i):
        barrier.wait()  # all 16 first calls at once
        try:
            scores[i] = model.score("a photo of a cat" if i % 2 else "two dogs", image)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    reference = [model.score("a photo of a cat" if i % 2 else "two dogs", image) for i in range(2)]
    print(json.dumps({"errors": errors[:3], "n_errors": len(errors), "scores": scores, "reference": reference}))
""")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A saved tiny ImageReward, and a download root with tiny CLIP weights and an Aesthetic head."""
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.clip import tiny_clip_hparams
    from ImageReward.models.image_reward import RewardHead
    from openai_clip_layout import OpenAICLIP

    root = tmp_path_factory.mktemp("threads")
    torch.manual_seed(0)
    RM.ImageReward(BLIPConfig.tiny()).eval().save_pretrained(root / "tiny")
    weights = root / "weights"
    weights.mkdir()
    torch.save(OpenAICLIP(tiny_clip_hparams()).eval().state_dict(), weights / "ViT-L-14.pt")
    torch.save(RewardHead(tiny_clip_hparams()["embed_dim"]).state_dict(), weights / "sac+logos+ava1-l14-linearMSE.pth")
    return root


@pytest.mark.parametrize("kind", ["load", "CLIP", "blip", "mix"])
def test_sixteen_threads_at_first_use(kind, roots):
    where = {"load": roots / "tiny", "blip": roots}.get(kind, roots / "weights")
    spec = f"CLIP:1,Aesthetic:0.5,{roots / 'tiny'}:2" if kind == "mix" else kind
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, spec, str(where)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n_errors"] == 0, result["errors"]
    for i, score in enumerate(result["scores"]):  # every thread got its own prompt's score
        assert abs(score - result["reference"][i % 2]) < 1e-5
