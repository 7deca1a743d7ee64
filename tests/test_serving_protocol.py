"""The reward server's wire formats and helpers, without a server: the restricted unpickler, request checks,
the pixel protocol, URL specs in the resolver (a port is not a mix weight), route names, Prometheus text."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ImageReward.resolve import parse_mix, resolve
from ImageReward.serving.app import route_name, split_model_option
from ImageReward.serving.metrics import Metrics
from ImageReward.serving.protocol import (Limits, ProtocolError, encode_pixel_request, finite_scores,
                                          parse_pickle_request, parse_pixel_request, safe_loads)

LIMITS = Limits(max_images=4, max_prompt_chars=10)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_takes_plain_data_and_refuses_every_global():
    plain = {"images": [b"\xff\xd8", b"x"], "prompts": ("a", "b"), "metadata": {"k": [1, 2.5, None, True]}}
    for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):  # bytes need protocol 3 (Python 3's default is 4+)
        assert safe_loads(pickle.dumps(plain, protocol=protocol)) == plain
    for payload, named in ((_Evil(), "system"), (np.zeros(2), "numpy"), (torch.zeros(2), "torch"),
                           (ValueError("x"), "ValueError"), (len, "len")):
        with pytest.raises(ProtocolError, match=named) as caught:
            safe_loads(pickle.dumps({"images": [payload]}))
        assert caught.value.status == 400
    with pytest.raises(ProtocolError, match="not a valid pickle"):
        safe_loads(pickle.dumps(plain)[:-5])
    with pytest.raises(ProtocolError, match="not a valid pickle"):
        safe_loads(b"")


def test_pickle_requests_are_checked():
    def parse(payload, uses_prompt=True):
        return parse_pickle_request(pickle.dumps(payload), uses_prompt=uses_prompt, limits=LIMITS)

    request = parse({"images": [b"a", b"b"], "prompts": ["x", "y"], "metadata": {}})
    assert request.images == [b"a", b"b"] and request.prompts == ["x", "y"]
    assert parse({"images": [b"a"]}, uses_prompt=False).prompts == [""]  # a prompt-free model needs none
    for payload, message, status in (
            ({"images": []}, "empty", 400), ({"images": [b"a"] * 5, "prompts": ["x"] * 5}, "limit is 4", 413),
            ({"images": [b"a"], "prompts": ["x", "y"]}, "2 prompts for 1 images", 400),
            ({"images": [b"a"]}, "'prompts' is missing", 400), ({"images": [b"a"], "prompts": "x"}, "one string", 400),
            ({"images": ["not bytes"], "prompts": ["x"]}, "image #0 is a str", 400),
            ({"images": [b"a"], "prompts": ["x" * 11]}, "11 characters", 413), ([b"a"], "dict", 400)):
        with pytest.raises(ProtocolError, match=message) as caught:
            parse(payload)
        assert caught.value.status == status


def test_pixel_protocol_round_trip_is_lossless_and_checked():
    pixels = torch.randn(3, 3, 8, 8)
    body = encode_pixel_request(["a", "b", "c", "d"], pixels, [0, 2, 1, 2])
    request = parse_pixel_request(body, image_sizes=[8], limits=Limits())
    assert torch.equal(request.pixels, pixels) and request.image_index == [0, 2, 1, 2]
    assert request.prompts == ["a", "b", "c", "d"]
    mix = parse_pixel_request(encode_pixel_request(["a"], (pixels[:1], pixels[:1, :, :4, :4]), [0]),
                              image_sizes=[8, 4], limits=Limits())
    assert isinstance(mix.pixels, tuple) and mix.pixels[1].shape == (1, 3, 4, 4)
    with pytest.raises(ProtocolError, match=r"\[U, 3, 16, 16\]"):
        parse_pixel_request(body, image_sizes=[16], limits=Limits())
    with pytest.raises(ProtocolError, match=r"image_index must lie in \[0, 3\)"):
        parse_pixel_request(encode_pixel_request(["a"], pixels, [3]), image_sizes=[8], limits=Limits())
    with pytest.raises(ProtocolError, match="not finite"):
        parse_pixel_request(encode_pixel_request(["a"], pixels * float("nan"), [0]), image_sizes=[8], limits=Limits())
    with pytest.raises(ProtocolError, match="not a valid pixel request"):
        parse_pixel_request(pickle.dumps({"a": 1}), image_sizes=[8], limits=Limits())


def test_scores_that_are_not_finite_are_refused():
    assert finite_scores(torch.tensor([0.5, -1.0]).tolist()) == [0.5, -1.0]
    with pytest.raises(FloatingPointError, match="#1"):
        finite_scores([0.5, float("nan")])
    with pytest.raises(FloatingPointError, match="inf"):
        finite_scores([float("inf")])


def test_server_urls_resolve_as_remote_scorers_and_ports_are_not_weights():
    assert resolve("http://127.0.0.1:18081").kind == "remote"
    assert resolve("https://rewards.example/score/ImageReward-v1.0").kind == "remote"
    assert parse_mix("http://127.0.0.1:18081") is None
    assert parse_mix("http://127.0.0.1:18081/score/x:0.5") == [("http://127.0.0.1:18081/score/x", 0.5)]
    assert parse_mix("http://127.0.0.1:18081:2") == [("http://127.0.0.1:18081", 2.0)]
    mix = resolve("http://h:1/score/a,CLIP:0.2")
    assert [(part.kind, part.target, w) for part, w in mix.parts] == [("remote", "http://h:1/score/a", 1.0),
                                                                       ("scorer", "CLIP", 0.2)]
    assert parse_mix("ImageReward-v1.0,Aesthetic:0.1") == [("ImageReward-v1.0", 1.0), ("Aesthetic", 0.1)]
    assert parse_mix("CLIP") is None


def test_route_names():
    assert route_name("CLIP") == "CLIP" and route_name("./runs/best/") == "best"
    assert route_name("ImageReward-v1.0:1,Aesthetic:0.1", ["a"]) == "model1"
    assert route_name("/x/tiny", ["tiny"]) == "tiny-2"
    assert split_model_option("ir=ImageReward-v1.0:1,Aesthetic:0.1") == ("ir", "ImageReward-v1.0:1,Aesthetic:0.1")
    assert split_model_option("ImageReward-v1.0") == (None, "ImageReward-v1.0")


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.inc("requests_total", model='odd"name', route="pickle", status="200")
    for size in (1, 3, 32):
        metrics.observe("batch_size", size, model="m")
    text = metrics.render()
    assert 'imagereward_requests_total{model="odd\\"name",route="pickle",status="200"} 1' in text
    assert 'imagereward_batch_size_bucket{model="m",le="4"} 2' in text
    assert 'imagereward_batch_size_bucket{model="m",le="+Inf"} 3' in text
    assert 'imagereward_batch_size_sum{model="m"} 36' in text and "# TYPE imagereward_batch_size histogram" in text


@pytest.mark.integration  # a few seconds: a model and a batch thread
def test_batcher_isolates_failures_and_never_returns_nan(tiny_model):
    """Jobs of several requests share a model call; one that breaks the batch (pixels of the wrong size) or
    scores NaN fails alone, the others get their scores, equal to the model's own."""
    from ImageReward.engine import preprocess_image
    from ImageReward.serving.batcher import DynamicBatcher, Job
    from PIL import Image

    batcher = DynamicBatcher(tiny_model, name="tiny", max_batch_size=64, max_wait_ms=200)
    batcher.warm_up()
    images = [Image.new("RGB", (40 + 3 * k, 30), (20 * k, 90, 200 - 10 * k)) for k in range(4)]
    pixels = [preprocess_image(image, batcher.configs) for image in images]
    good = [Job([f"prompt {k}"], [pixels[k]]) for k in range(3)]
    wrong_size = Job(["x"], [torch.zeros(3, 16, 16)])
    nan = Job(["y"], [pixels[3] * float("nan")])
    batcher.start()
    try:
        futures = [batcher.submit(job) for job in (good[0], wrong_size, good[1], nan, good[2])]
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=120))
            except Exception as err:  # noqa: BLE001 - the failures are asserted below
                results.append(err)
    finally:
        batcher.stop()
    expected = tiny_model.score_batch([f"prompt {k}" for k in range(3)], images[:3])
    assert [r[0] for r in (results[0], results[2], results[4])] == pytest.approx(expected.tolist(), abs=1e-5)
    assert isinstance(results[1], Exception) and isinstance(results[3], FloatingPointError)
    assert 'imagereward_batch_size_count{model="tiny"}' in batcher.metrics.render()
