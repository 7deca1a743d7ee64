"""score-dataset: readers, scoring equal to the engine, error rows, resume, shards + merge, URLs, Hub, HTML."""

from __future__ import annotations

import csv
import http.server
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ImageReward.errors import InvalidInputError
from ImageReward.scoring import datasets as ds
from ImageReward.scoring.datasets import read_records
from ImageReward.scoring.runner import DistributedContext, score_dataset
from ImageReward.scoring.writers import Journal, done_ids, parts_dir, read_journal, read_output

torch.set_num_threads(1)

PROMPTS = ["a red bicycle", "two cats on a sofa", "a castle at night"]


def _images(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (36 + i, 44, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _table(tmp_path: Path, count: int = 7) -> tuple[Path, list[dict]]:
    paths = _images(tmp_path / "imgs", count)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % 3], "image": f"imgs/{p.name}"} for i, p in enumerate(paths)]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table, rows


def _single() -> DistributedContext:
    return DistributedContext()


def test_folder_reader_sidecars_and_prompt_override(tmp_path):
    paths = _images(tmp_path / "gen", 4)
    (tmp_path / "gen" / "img00.txt").write_text("  a red bicycle \n")
    (tmp_path / "gen" / "img01.json").write_text(json.dumps({"caption": "two cats"}))
    (tmp_path / "gen" / "img02.json").write_text("{not json")
    (tmp_path / "gen" / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "gen" / "sub" / "deep.jpg")
    records = read_records(tmp_path / "gen")
    assert [r.id for r in records] == ["img00.png", "img01.png", "img02.png", "img03.png", "sub/deep.jpg"]
    assert [r.prompt for r in records[:2]] == ["a red bicycle", "two cats"]
    assert records[2].error.startswith("no prompt") and "not valid JSON" in records[2].error
    assert records[3].error.startswith("no prompt") and records[3].prompt is None
    assert records[0].source == str(paths[0])
    forced = read_records(tmp_path / "gen", prompt="one prompt")
    assert {r.prompt for r in forced} == {"one prompt"} and all(r.error is None for r in forced)


def test_table_readers_agree_and_reject_bad_tables(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table, rows = _table(tmp_path)
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "image"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    expected = [(r.id, r.prompt, r.source) for r in read_records(table)]
    assert expected[0] == ("r0", "a red bicycle", str(tmp_path / "imgs" / "img00.png"))
    for name in ("pairs.csv", "pairs.parquet", "pairs.json"):
        assert [(r.id, r.prompt, r.source) for r in read_records(tmp_path / name)] == expected, name

    messy = tmp_path / "messy.jsonl"
    messy.write_text('{"caption": "a", "file_name": "imgs/img00.png"}\n[1, 2]\n{"caption": "", "file_name": "x.png"}\n')
    got = read_records(messy)
    assert [r.id for r in got] == ["0", "1", "2"]  # no id column: the row number
    assert got[0].prompt == "a" and got[0].error is None
    assert "line 2" in got[1].error and got[2].error.startswith("no prompt")

    with pytest.raises(InvalidInputError, match="image column"):
        read_records(messy, image_column="nope")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "prompt": "a", "image": "x"}\n{"id": 1, "prompt": "b", "image": "y"}\n')
    with pytest.raises(InvalidInputError, match="more than once"):
        read_records(tmp_path / "dup.jsonl")
    with pytest.raises(InvalidInputError, match="hf://datasets/owner/name"):
        read_records("owner/name")


def test_scores_equal_the_engine_and_bad_images_become_error_rows(tmp_path, tiny_model):
    table, rows = _table(tmp_path)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    with table.open("a") as handle:
        handle.write(json.dumps({"id": "bad", "prompt": "x", "image": "imgs/broken.png"}) + "\n")
        handle.write(json.dumps({"id": "gone", "prompt": "x", "image": "imgs/missing.png"}) + "\n")
        handle.write(json.dumps({"id": "again", "prompt": "another prompt", "image": "imgs/img00.png"}) + "\n")
    out = tmp_path / "scores.jsonl"
    summary = score_dataset(tiny_model, table, out, batch_size=4, num_workers=2, progress=False, context=_single())
    got = read_output(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows] + ["bad", "gone", "again"]
    assert summary["scored"] == 8 and summary["errors"] == 2 and summary["total_rows"] == 10
    by_id = {r["id"]: r for r in got}
    assert by_id["bad"]["score"] is None and "cannot decode" in by_id["bad"]["error"]
    assert by_id["gone"]["score"] is None and "does not exist" in by_id["gone"]["error"]
    prompts = [r["prompt"] for r in rows] + ["another prompt"]
    images = [str(tmp_path / r["image"]) for r in rows] + [str(tmp_path / "imgs" / "img00.png")]
    reference = tiny_model.score_batch(prompts, images, batch_size=3)
    ours = torch.tensor([by_id[i]["score"] for i in [r["id"] for r in rows] + ["again"]])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_resume_skips_done_rows_and_repairs_a_torn_line(tmp_path, tiny_model):
    table, rows = _table(tmp_path, 9)
    out = tmp_path / "scores.jsonl"
    score_dataset(tiny_model, table, out, batch_size=4, progress=False, context=_single())
    full = out.read_bytes()
    clean = {r["id"]: r["score"] for r in read_output(out)}
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # killed in the middle of row 4
    assert {r["id"] for r in read_journal(out)} == {"r0", "r1", "r2", "r3"}
    summary = score_dataset(tiny_model, table, out, batch_size=4, progress=False, context=_single())
    assert summary["resumed"] == 4 and summary["scored"] == 5
    got = read_output(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # every row exactly once, in order
    assert {r["id"]: r["score"] for r in got} == pytest.approx(clean, abs=1e-6)
    again = score_dataset(tiny_model, table, out, progress=False, context=_single())  # nothing left to do
    assert again["scored"] == 0 and again["resumed"] == 9 and len(read_output(out)) == 9

    with pytest.raises(InvalidInputError, match="another output or pass --overwrite"):
        score_dataset(tiny_model, table, out, model_name="other-model", progress=False, context=_single())
    fresh = score_dataset(tiny_model, table, out, model_name="other-model", overwrite=True, progress=False,
                          context=_single())
    assert fresh["scored"] == 9 and {r["model"] for r in read_output(out)} == {"other-model"}


def test_journal_keeps_a_complete_row_without_newline_and_rejects_corruption(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"id": "a", "index": 0}\n{"id": "b", "index": 1}')
    with Journal(path) as journal:
        journal.append([{"id": "c", "index": 2}])
    assert [r["id"] for r in read_journal(path)] == ["a", "b", "c"]
    path.write_bytes(b'{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(InvalidInputError, match="line 2"):
        read_journal(path)


def test_parquet_output_from_two_shards_is_merged_once(tmp_path, tiny_model):
    pytest.importorskip("pyarrow")
    table, rows = _table(tmp_path, 7)
    out = tmp_path / "scores.parquet"
    one = score_dataset(tiny_model, table, out, batch_size=2, progress=False, context=DistributedContext(1, 2))
    assert one["scored"] == 3 and not out.exists()  # rank 1 scores rows 1, 3, 5 and does not merge
    assert sorted(done_ids(out)) == ["r1", "r3", "r5"]
    # the main process resumes under another world size: only the missing rows are scored, then merged
    zero = score_dataset(tiny_model, table, out, batch_size=2, progress=False, context=DistributedContext(0, 1))
    assert zero["resumed"] == 3 and zero["scored"] == 4
    got = read_output(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows] and not parts_dir(out).exists()
    reference = tiny_model.score_batch([r["prompt"] for r in rows], [str(tmp_path / r["image"]) for r in rows])
    torch.testing.assert_close(torch.tensor([r["score"] for r in got]), reference, atol=1e-5, rtol=0)


class _Handler(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path in ("/ok.png", "/slow.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                self.wfile.write(self.png)
            except OSError:  # the client gave up (timeout): expected for /slow.png
                pass
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def test_url_images_are_fetched_and_failures_become_rows(tmp_path, tiny_model):
    path = _images(tmp_path / "imgs", 1)[0]
    _Handler.png = path.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        table = tmp_path / "urls.csv"
        table.write_text(f"caption,url\na cat,{base}/ok.png\na cat,{base}/missing.png\na cat,{base}/slow.png\n")
        out = tmp_path / "scores.jsonl"
        score_dataset(tiny_model, table, out, timeout=0.3, progress=False, context=_single())
    finally:
        server.shutdown()
    ok, missing, slow = read_output(out)
    assert ok["error"] is None and ok["score"] == pytest.approx(tiny_model.score("a cat", path), abs=1e-5)
    assert "404" in missing["error"] and missing["score"] is None
    assert "download failed" in slow["error"] and "timed out" in slow["error"]


def test_hub_dataset_reads_parquet_with_embedded_images(tmp_path, tiny_model, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = _images(tmp_path / "imgs", 5)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, members in (("train", paths[:3]), ("test", paths[3:])):
        table = pa.table({"prompt": [f"{split} {i}" for i in range(len(members))],
                          "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p in members], image_type)})
        pq.write_table(table, repo / "data" / f"{split}-00000-of-00001.parquet", row_group_size=2)
    calls = []
    monkeypatch.setattr(ds, "_hub_list_files", lambda repo_id, revision: calls.append((repo_id, revision)) or
                        ["README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"])
    monkeypatch.setattr(ds, "_hub_download", lambda repo_id, name, revision: str(repo / name))
    records = read_records("hf://datasets/someone/gen-images", split="train")
    assert calls == [("someone/gen-images", None)]
    assert [r.id for r in records] == [f"data/train-00000-of-00001.parquet#{i}" for i in range(3)]
    assert isinstance(records[2].source, ds.ParquetBlob) and records[2].source.row_group == 1
    out = tmp_path / "hub.jsonl"
    score_dataset(tiny_model, "hf://datasets/someone/gen-images@main", out, split="train", num_workers=1,
                  html=tmp_path / "hub.html", progress=False, context=_single())
    got = read_output(out)
    assert calls[-1] == ("someone/gen-images", "main") and len(got) == 3
    reference = tiny_model.score_batch([f"train {i}" for i in range(3)], [str(p) for p in paths[:3]])
    torch.testing.assert_close(torch.tensor([r["score"] for r in got]), reference, atol=1e-5, rtol=0)
    assert (tmp_path / "hub.html").read_text().count("data:image/jpeg;base64,") == 3
    assert ds.parse_hub_uri("hf://datasets/a/b@v1.0/sub/dir") == ("a/b", "v1.0", "sub/dir")


def test_gallery_shows_the_best_and_worst_per_prompt(tmp_path, tiny_model):
    paths = _images(tmp_path / "gen", 10)
    out = tmp_path / "scores.jsonl"
    html_path = tmp_path / "gallery.html"
    prompt = "a <b>bold</b> & odd prompt"
    summary = score_dataset(tiny_model, tmp_path / "gen", out, prompt=prompt, html=html_path, html_per_prompt=2,
                            progress=False, context=_single())
    assert summary["html"] == str(html_path)
    page = html_path.read_text()
    rows = sorted(read_output(out), key=lambda r: -r["score"])
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; odd prompt" in page and "<b>bold</b>" not in page
    assert "top 2" in page and "bottom 2" in page and page.count("<figure>") == 4
    for row in rows[:2] + rows[-2:]:
        assert f"{row['score']:+.4f}" in page
    for row in rows[2:-2]:
        assert f">{row['image']}</figcaption>" not in page
    assert len(paths) == 10


def test_cli_scores_a_folder_and_reports_bad_arguments(tmp_path, tiny_model, capsys):
    from ImageReward.cli import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    _images(tmp_path / "gen", 3)
    out = tmp_path / "s.parquet"
    code = main(["score-dataset", str(tmp_path / "gen"), "-o", str(out), "--prompt", "a cat", "--model",
                 str(model_dir), "--num-workers", "0", "--html", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_rows"] == 3 and (tmp_path / "s.html").exists()
    assert [r["id"] for r in read_output(out)] == ["img00.png", "img01.png", "img02.png"]
    assert main(["score-dataset", str(tmp_path / "gen"), "-o", str(tmp_path / "s.txt"), "--model", str(model_dir)]) == 2
    assert "name it .jsonl or .parquet" in capsys.readouterr().err


def test_a_row_the_scorer_rejects_becomes_an_error_row(tmp_path, tiny_model, monkeypatch):
    table, rows = _table(tmp_path, 5)
    with table.open("a") as handle:
        handle.write(json.dumps({"id": "rejected", "prompt": "REJECT me", "image": "imgs/img01.png"}) + "\n")
    real = tiny_model.score_pairs

    def picky(prompts, features, image_index):
        if any(p.startswith("REJECT") for p in prompts):
            raise InvalidInputError("this scorer rejects the prompt")
        return real(prompts, features, image_index)

    monkeypatch.setattr(tiny_model, "score_pairs", picky)
    out = tmp_path / "scores.jsonl"
    summary = score_dataset(tiny_model, table, out, batch_size=4, progress=False, context=_single())
    got = {r["id"]: r for r in read_output(out)}
    assert summary["scored"] == 5 and summary["errors"] == 1
    assert got["rejected"]["score"] is None and "rejects the prompt" in got["rejected"]["error"]
    reference = tiny_model.score_batch([r["prompt"] for r in rows], [str(tmp_path / r["image"]) for r in rows])
    torch.testing.assert_close(torch.tensor([got[r["id"]]["score"] for r in rows]), reference, atol=1e-5, rtol=0)


def test_an_uncached_hub_dataset_offline_is_a_typed_error_without_network():
    from ImageReward.errors import DownloadError

    with pytest.raises(DownloadError, match="nobody/nothing"):
        read_records("hf://datasets/nobody/nothing")
