"""score-dataset's WebDataset / img2dataset readers: shards made by webdataset's TarWriter and by img2dataset
itself (downloading from a local HTTP server), broken samples as error rows, the single-process engine on them."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from ImageReward.errors import InvalidInputError
from ImageReward.scoring.datasets import TarMember, load_record_image, read_records
from ImageReward.scoring.runner import DistributedContext, score_dataset
from ImageReward.scoring.shards import is_shard_input, list_shards
from ImageReward.scoring.writers import read_output
from shard_data import jpeg_bytes, write_shards

pytest.importorskip("webdataset")
torch.set_num_threads(1)


def test_shard_patterns_keys_prompts_and_broken_samples(tmp_path):
    prompts = write_shards(tmp_path / "wds", shards=3, per_shard=5, broken=True)
    by_brace = read_records(str(tmp_path / "wds" / "shard-{00000..00002}.tar"))
    by_glob = read_records(str(tmp_path / "wds" / "shard-*.tar"))
    by_folder = read_records(tmp_path / "wds")
    assert [r.id for r in by_brace] == [r.id for r in by_glob] == [r.id for r in by_folder]
    assert [r.index for r in by_folder] == list(range(len(by_folder)))
    rows = {r.id: r for r in by_folder}
    # every sample the writer wrote is a row (the cut one included), keyed SHARD/KEY
    assert list(rows) == list(prompts)
    assert rows["shard-00000.tar/000000000"].prompt == "prompt 0 of shard 0"            # from txt
    assert rows["shard-00000.tar/000000001"].prompt == "prompt 1 of shard 0"            # from json caption
    assert rows["shard-00001.tar/000010001"].error.startswith("no prompt")              # neither
    assert rows["shard-00001.tar/000010003"].error.startswith("no image")
    assert "cut short" in rows["shard-00002.tar/000020004"].error
    whole = [r for r in by_folder if r.error is None]
    assert len(whole) == 12 and all(isinstance(r.source, TarMember) and r.shard for r in whole)
    # the image bytes are read from their byte range, equal to what the writer stored
    first = rows["shard-00000.tar/000000000"]
    assert load_record_image(first).size == (48, 40)
    assert load_record_image(rows["shard-00002.tar/000020000"]).size == (48, 40)  # before the cut: whole
    # --prompt overrides captions and clears "no prompt", not the other errors
    forced = {r.id: r for r in read_records(tmp_path / "wds", prompt="one prompt")}
    assert forced["shard-00001.tar/000010001"].error is None
    assert forced["shard-00001.tar/000010003"].error.startswith("no image")

    assert is_shard_input(tmp_path / "wds") and not is_shard_input(tmp_path)
    (tmp_path / "wds" / "cover.png").write_bytes(b"")  # a folder of images with a tar beside them stays one
    assert not is_shard_input(tmp_path / "wds")
    (tmp_path / "wds" / "cover.png").unlink()
    with pytest.raises(InvalidInputError, match="no such file"):
        read_records(str(tmp_path / "wds" / "shard-{00000..00009}.tar"))
    (tmp_path / "fake.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InvalidInputError, match="not a readable tar"):
        read_records(tmp_path / "fake.tar")


@pytest.mark.integration
def test_single_process_engine_scores_shards_with_error_rows(tmp_path, tiny_model):
    write_shards(tmp_path / "wds", shards=3, per_shard=5, broken=True)
    out = tmp_path / "scores.jsonl"
    summary = score_dataset(tiny_model, tmp_path / "wds", out, batch_size=4, progress=False,
                            context=DistributedContext())
    got = {r["id"]: r for r in read_output(out)}
    assert summary["rows"] == 15 and summary["errors"] == 4 and len(got) == 15
    assert "cannot decode" in got["shard-00000.tar/000000002"]["error"]
    records = [r for r in read_records(tmp_path / "wds") if got[r.id]["error"] is None]
    reference = tiny_model.score_batch([r.prompt for r in records], [load_record_image(r) for r in records])
    torch.testing.assert_close(torch.tensor([got[r.id]["score"] for r in records]), reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- img2dataset
def _run_img2dataset(url_list: str, output: str) -> None:
    from img2dataset import download

    download(url_list=url_list, input_format="csv", url_col="url", caption_col="caption", output_format="webdataset",
             output_folder=output, processes_count=1, thread_count=2, image_size=32, resize_mode="no",
             number_sample_per_shard=4, distributor="multiprocessing", enable_wandb=False, timeout=5, retries=0)


@pytest.fixture(scope="module")
def img2dataset_output(tmp_path_factory):
    """img2dataset's own webdataset output for 6 images served on 127.0.0.1 plus one URL that 404s."""
    pytest.importorskip("img2dataset")
    root = tmp_path_factory.mktemp("img2dataset")
    (root / "www").mkdir()
    for i in range(6):
        (root / "www" / f"{i}.jpg").write_bytes(jpeg_bytes(100 + i))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root / "www"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [f"{base}/{i}.jpg,caption number {i}" for i in range(6)] + [f"{base}/missing.jpg,a lost image"]
    (root / "urls.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
    try:
        # img2dataset starts its workers with multiprocessing: run it in a child process of its own
        import multiprocessing

        process = multiprocessing.get_context("spawn").Process(
            target=_run_img2dataset, args=(str(root / "urls.csv"), str(root / "out")))
        process.start()
        process.join(timeout=240)
        assert process.exitcode == 0, f"img2dataset failed (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.kill()
        server.shutdown()
    return root / "out"


@pytest.mark.integration
def test_img2dataset_output_folder(img2dataset_output, tiny_model, tmp_path):
    folder = img2dataset_output
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("_")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    shards = list_shards(folder)
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"] and shards[0].metadata and shards[0].stats
    records = read_records(folder)
    # the failed download is not a row; the 6 images are, captions from their txt
    assert len(records) == 6 and all(r.error is None for r in records)
    assert sorted(r.prompt for r in records) == [f"caption number {i}" for i in range(6)]
    assert records[0].id.startswith("00000.tar/0000") and records[0].image == records[0].id + ".jpg"

    # a shard cut short after img2dataset wrote it: its Parquet file still lists the lost samples as successes
    cut = tmp_path / "cut"
    cut.mkdir()
    for path in folder.iterdir():
        if not path.name.startswith("_"):
            (cut / path.name).write_bytes(path.read_bytes())
    import tarfile

    with tarfile.open(cut / "00000.tar") as tar:
        second_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    data = (cut / "00000.tar").read_bytes()
    (cut / "00000.tar").write_bytes(data[: second_jpg.offset])  # ends cleanly after the first sample
    got = {r.id: r for r in read_records(cut)}
    assert sorted(got) == sorted(r.id for r in records) and got[records[0].id].error is None
    lost = [r for r in got.values() if r.error]
    expected = {r.id: r.prompt for r in records[1:4]}  # the Parquet file names them, with their captions
    assert {r.id: r.prompt for r in lost} == expected
    assert all("missing from shard '00000.tar'" in r.error for r in lost)

    out = tmp_path / "scores.parquet"
    summary = score_dataset(tiny_model, folder, out, batch_size=3, progress=False, context=DistributedContext())
    assert summary["scored"] == 6 and summary["errors"] == 0
    scored = read_output(out)
    reference = tiny_model.score_batch([r.prompt for r in records], [load_record_image(r) for r in records])
    torch.testing.assert_close(torch.tensor([r["score"] for r in scored]), reference, atol=1e-5, rtol=0)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_cli_engine_ray_rejects_what_it_cannot_do_before_starting_ray(tmp_path, capsys):
    from ImageReward.cli import main

    write_shards(tmp_path / "wds", shards=1, per_shard=2)
    (tmp_path / "gen").mkdir()
    base = ["score-dataset", "-o", str(tmp_path / "scores"), "--engine", "ray", "--model", str(tmp_path / "none")]
    assert main([base[0], str(tmp_path / "wds"), *base[1:], "--limit", "3", "--html"]) == 2
    assert "--limit, --html: not available with --engine ray" in capsys.readouterr().err
    pytest.importorskip("ray")
    assert main([base[0], str(tmp_path / "gen"), *base[1:]]) == 2
    assert "reads WebDataset / img2dataset tar shards" in capsys.readouterr().err
    (tmp_path / "file.parquet").write_bytes(b"")
    assert main([base[0], str(tmp_path / "wds"), "-o", str(tmp_path / "file.parquet"), *base[3:]]) == 2
    assert "name a folder" in capsys.readouterr().err
