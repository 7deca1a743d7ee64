"""The reward server (``imagereward serve``) as the RL clients use it: a real server process on 127.0.0.1 with
a tiny model, driven by clients written from the documented protocol (flow_grpo's pickle convention as
verl-omni documents it in ``docs/start/http_scorer.md``), and the remote scorer (``RM.load_scorer(URL)``)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from serving_helpers import TOKEN, ServerProcess, jpeg, tiny_folder

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["a red fox in the snow", "a cat", "two dogs playing on a very long beach at sunset", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    process = ServerProcess(["--model", f"tiny={folder}", "--model", f"{folder}", "--max-batch-size", "32",
                             "--max-wait-ms", "40", "--max-images-per-request", "16", "--max-body-mb", "2",
                             "--max-pixels", "4000000", "--token", TOKEN], log)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local(folder):
    import ImageReward as RM

    return RM.load_scorer(str(folder), device="cpu")


def post_pickle(url: str, payload, **kwargs):
    body = payload if isinstance(payload, bytes) else pickle.dumps(payload)
    return requests.post(url, data=body, headers=AUTH, timeout=60, **kwargs)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------------------ the protocol
def test_pickle_protocol_scores_equal_the_local_model(server, local):
    from ImageReward.image_io import load_image

    images = [jpeg(seed) for seed in range(4)]
    images[3] = images[1]  # the same JPEG with two prompts
    response = post_pickle(server.url + "/", {"images": images, "prompts": PROMPTS, "metadata": {}})
    assert response.status_code == 200, response.content
    scores = pickle.loads(response.content)["scores"]
    expected = local.score_batch(PROMPTS, [load_image(data) for data in images])
    assert all(isinstance(s, float) for s in scores)
    assert np.allclose(scores, expected.numpy(), atol=1e-5, rtol=0)
    assert len(set(round(s, 3) for s in scores)) > 1  # the scores tell the images apart

    named = post_pickle(server.url + "/score/tiny", {"images": images, "prompts": PROMPTS, "metadata": {}})
    assert pickle.loads(named.content)["scores"] == scores
    as_json = requests.post(server.url + "/v1/score", headers=AUTH, timeout=60, json={
        "images": [base64.b64encode(data).decode() for data in images], "prompts": PROMPTS, "model": "tiny"})
    assert as_json.status_code == 200 and as_json.json() == {"scores": scores, "model": "tiny"}


def test_concurrent_single_image_requests_are_batched(server, local):
    """verl-omni's pattern: one image per request, all of a batch at once (asyncio.gather)."""
    aiohttp = pytest.importorskip("aiohttp")
    from ImageReward.image_io import load_image

    images = [jpeg(100 + k) for k in range(32)]
    prompts = [f"photo number {k}" for k in range(32)]
    before = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text

    async def one(session, k):
        body = pickle.dumps({"images": [images[k]], "prompts": [prompts[k]], "metadata": {}})
        async with session.post(server.url + "/score/tiny", data=body, headers=AUTH) as response:
            assert response.status == 200
            return pickle.loads(await response.read())["scores"][0]

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(one(session, k) for k in range(32)))

    scores = asyncio.run(main())
    expected = local.score_batch(prompts, [load_image(data) for data in images])
    assert np.allclose(scores, expected.numpy(), atol=1e-5, rtol=0)
    after = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    batches = metric(after, "imagereward_batch_size_count", model="tiny") - \
        metric(before, "imagereward_batch_size_count", model="tiny")
    pairs = metric(after, "imagereward_batch_size_sum", model="tiny") - \
        metric(before, "imagereward_batch_size_sum", model="tiny")
    assert pairs == 32
    assert batches <= 8, f"32 concurrent requests took {batches} model calls"


def _png(size: tuple[int, int], mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_get_an_error_and_the_server_keeps_serving(server, tmp_path):
    marker = tmp_path / "pwned"
    good = {"images": [jpeg(1)], "prompts": ["a cat"], "metadata": {}}
    truncated_jpeg = jpeg(2, (200, 160))[:600]
    cases = {
        "malformed pickle": (b"this is not a pickle", 400, "not a valid pickle"),
        "truncated pickle": (pickle.dumps(good)[:-20], 400, "not a valid pickle"),
        "__reduce__ runs a command": (pickle.dumps({"images": [_RunsACommand(marker)], "prompts": ["x"]}), 400,
                                      "system"),
        "numpy array": (pickle.dumps({"images": [np.zeros((4, 4, 3), np.uint8)], "prompts": ["x"]}), 400, "numpy"),
        "not a dict": (pickle.dumps([jpeg(1)]), 400, "dict"),
        "lengths differ": ({"images": [jpeg(1), jpeg(2)], "prompts": ["only one"]}, 400, "2 images"),
        "prompts missing": ({"images": [jpeg(1)]}, 400, "prompts"),
        "prompt not a string": ({"images": [jpeg(1)], "prompts": [3]}, 400, "prompt #0"),
        "bytes that are no image": ({"images": [b"GIF89a nothing"], "prompts": ["x"]}, 422, "image #0"),
        "truncated JPEG": ({"images": [truncated_jpeg], "prompts": ["x"]}, 422, "image #0"),
        "100-megapixel PNG": ({"images": [_png((10000, 10000))], "prompts": ["x"]}, 413, "100000000 pixels"),
        "empty list": ({"images": [], "prompts": []}, 400, "empty"),
        "too many images": ({"images": [jpeg(1)] * 17, "prompts": ["x"] * 17}, 413, "limit is 16"),
        "oversized body": (b"\x80" * (3 * 1024 * 1024), 413, "limit"),
    }
    for what, (payload, status, needle) in cases.items():
        response = post_pickle(server.url + "/score/tiny", payload)
        assert response.status_code == status, (what, response.status_code, response.content[:300])
        error = pickle.loads(response.content)["error"]
        assert needle in error, (what, error)
    assert not marker.exists(), "the pickle's command ran"

    unknown = post_pickle(server.url + "/score/nope", good)
    assert unknown.status_code == 404 and "nope" in pickle.loads(unknown.content)["error"]
    for body in (b"{not json", json.dumps({"images": 3}).encode(), json.dumps(["a"]).encode()):
        response = requests.post(server.url + "/v1/score", data=body, headers={**AUTH, "Content-Type":
                                                                               "application/json"}, timeout=30)
        assert response.status_code in (400, 422) and "error" in response.json(), body
    bad_base64 = requests.post(server.url + "/v1/score", headers=AUTH, timeout=30,
                               json={"images": ["%%%"], "prompts": ["x"]})
    assert bad_base64.status_code == 400 and "base64" in bad_base64.json()["error"]
    no_token = requests.post(server.url + "/", data=pickle.dumps(good), timeout=30)
    assert no_token.status_code == 401 and "token" in pickle.loads(no_token.content)["error"]
    query_token = requests.post(f"{server.url}/?token={TOKEN}", data=pickle.dumps(good), timeout=30)
    assert query_token.status_code == 200

    # a bad request in the same batch as good ones fails alone
    results = {}

    def send(key, payload):
        results[key] = post_pickle(server.url + "/score/tiny", payload)

    threads = [threading.Thread(target=send, args=(k, good if k % 2 else
                                                   {"images": [b"junk"], "prompts": ["x"]})) for k in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [results[k].status_code for k in range(6)] == [422, 200] * 3
    assert post_pickle(server.url + "/", good).status_code == 200  # still serving
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    assert metric(text, "imagereward_request_errors_total") >= len(cases)


def test_health_models_and_metrics(server):
    health = requests.get(server.url + "/health", timeout=10)  # no token needed: for load balancers
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
    models = requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["models"]
    assert [m["name"] for m in models] == ["tiny", "tiny-2"]
    first = models[0]
    assert first["uses_prompt"] is True and first["higher_is_better"] is True
    assert first["dtype"] == "float32" and first["device"] == "cpu" and first["preprocess"][0]["image_size"] == 32
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    for name in ("imagereward_requests_total", "imagereward_batch_size_bucket", "imagereward_queue_wait_seconds_sum",
                 "imagereward_request_seconds_count"):
        assert name in text
    schema = requests.get(server.url + "/openapi.json", headers=AUTH, timeout=10).json()
    assert "/v1/score" in schema["paths"]


# ------------------------------------------------------------------------------------------ the remote scorer
def test_remote_scorer_works_where_a_scorer_name_does(server, local, folder, tmp_path):
    import ImageReward as RM
    from ImageReward.finetune.config import ReFLConfigError
    from ImageReward.finetune.rewards import load_reward
    from ImageReward.scoring import score_dataset

    url = f"{server.url}/score/tiny?token={TOKEN}"
    remote = RM.load_scorer(url)
    assert remote.is_differentiable is False and remote.uses_prompt
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (30 + 7 * k, 41, 3), dtype=np.uint8)) for k in range(5)]
    prompts = PROMPTS + ["a cat"]
    assert torch.allclose(remote.score_batch(prompts, images), local.score_batch(prompts, images), atol=1e-6)
    # a mix with a remote part: the port is not a weight
    mix = RM.load_scorer(f"{server.url}/score/tiny?token={TOKEN}:0.5,{folder}")
    assert torch.allclose(mix.score_batch(prompts, images), 1.5 * local.score_batch(prompts, images), atol=1e-5)
    # score-dataset: images decoded in the runner, pixels sent losslessly
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k}.png")
    summary = score_dataset(remote, tmp_path, tmp_path / "out.jsonl", prompt="a cat", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["errors"] == 0 and len(rows) == 5
    expected = local.score_batch("a cat", [str(tmp_path / f"{k}.png") for k in range(5)])
    by_name = {row["image"].rsplit("/", 1)[-1]: row["score"] for row in rows}
    assert np.allclose([by_name[f"{k}.png"] for k in range(5)], expected.numpy(), atol=1e-6)
    # the CLI, token from the environment (kept out of the output)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ImageReward.cli", "score", "--model", f"{server.url}/score/tiny",
                           "--prompt", "a cat", "--json", str(tmp_path / "0.png"), str(tmp_path / "1.png")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "IMAGEREWARD_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    cli_scores = [row["score"] for row in json.loads(done.stdout)["results"]]
    assert np.allclose(cli_scores, expected.numpy()[:2], atol=1e-6)
    # ReFL: monitored, never trained on
    monitor = load_reward(url, differentiable=False)  # as ReFL's validation scores its decoded images
    decoded = [torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    assert torch.allclose(monitor.score_batch(prompts[:2], decoded), local.score_batch(prompts[:2], decoded), atol=1e-6)
    with pytest.raises(ReFLConfigError, match="not differentiable"):
        load_reward(url)
    with pytest.raises(RM.InvalidInputError, match="answered 401"):
        RM.load_scorer(f"{server.url}/score/tiny?token=wrong")
    with pytest.raises(RM.InvalidInputError, match="nope"):
        RM.load_scorer(f"{server.url}/score/nope?token={TOKEN}")


def test_sigterm_finishes_requests_in_flight(server, local):
    """Last in this module: it stops the module's server."""
    from ImageReward.image_io import load_image

    images = [jpeg(300 + k) for k in range(8)]
    results: dict[int, object] = {}

    def send(k):
        try:
            results[k] = post_pickle(server.url + "/", {"images": images, "prompts": [f"p{k}"] * 8, "metadata": {}})
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            results[k] = err

    threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    time.sleep(0.3)  # the requests are in flight
    server.terminate()
    [t.join(120) for t in threads]
    assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    for k in range(6):
        response = results[k]
        assert not isinstance(response, Exception) and response.status_code == 200, response
        expected = local.score_batch(f"p{k}", [load_image(data) for data in images])
        assert np.allclose(pickle.loads(response.content)["scores"], expected.numpy(), atol=1e-5)


def test_ray_serve_replicas_serve_the_same_app(folder, local, tmp_path):
    """Two Ray Serve replicas of the same app on a local Ray cluster bound to 127.0.0.1 (CPU)."""
    pytest.importorskip("ray.serve")  # in the dev extra (ray[serve]); a bare ray[data] lacks its dependencies
    from ImageReward.image_io import load_image

    process = ServerProcess(["--model", f"tiny={folder}", "--ray-replicas", "2"], tmp_path / "ray.log", timeout=300)
    try:
        images = [jpeg(seed) for seed in range(3)]
        response = requests.post(process.url + "/score/tiny", timeout=120,
                                 data=pickle.dumps({"images": images, "prompts": PROMPTS[:3], "metadata": {}}))
        assert response.status_code == 200, response.content
        expected = local.score_batch(PROMPTS[:3], [load_image(data) for data in images])
        assert np.allclose(pickle.loads(response.content)["scores"], expected.numpy(), atol=1e-5)
        assert requests.get(process.url + "/v1/models", timeout=30).json()["models"][0]["name"] == "tiny"
    finally:
        assert process.stop() == 0
