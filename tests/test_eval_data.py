"""Evaluation data: safe zip extraction, test.json validation, generation discovery, the ImageRewardDB
parquet + archive reader, offline download errors, and the resumable score cache."""

from __future__ import annotations

import json
import stat
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ImageReward.errors import DownloadError, InvalidInputError
from ImageReward.eval.cache import ScoreCache, cached_scores, image_identity
from ImageReward.eval.data import find_generations, load_imagerewarddb, load_test_json
from ImageReward.eval.download import ensure_benchmark_generations, ensure_test_images, ensure_test_json
from ImageReward.preference.archives import extract_archive_to, safe_extract_zip


def _png(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- zips
@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_zip_entries_escaping_the_target_are_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(name, "bad")
    with pytest.raises(InvalidInputError, match="outside the target|escapes"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()  # nothing written before every entry is checked
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlinks_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidInputError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")


def test_extract_archive_to_collapses_single_top_folder(tmp_path):
    nested, flat = tmp_path / "nested.zip", tmp_path / "flat.zip"
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("versatile-diffusion/a_0.png", "x")
        zf.writestr("versatile-diffusion/a_1.png", "y")
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("a_0.png", "x")
        zf.writestr("b_0.png", "y")
    assert sorted(p.name for p in extract_archive_to(nested, tmp_path / "vd").iterdir()) == ["a_0.png", "a_1.png"]
    assert sorted(p.name for p in extract_archive_to(flat, tmp_path / "g").iterdir()) == ["a_0.png", "b_0.png"]
    assert [p.name for p in tmp_path.iterdir() if "extracting" in p.name] == []  # no staging left behind
    with pytest.raises(InvalidInputError, match="already exists"):
        extract_archive_to(flat, tmp_path / "g")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="not a readable zip"):
        extract_archive_to(tmp_path / "broken.zip", tmp_path / "h")
    assert not (tmp_path / "h").exists()


# ------------------------------------------------------------------------------------------- test.json
def test_load_test_json_joins_prefix_and_validates(tmp_path):
    good = [{"id": "1", "prompt": "p", "generations": ["a.png", "b.png"], "ranking": [2, 1]}]
    (tmp_path / "t.json").write_text(json.dumps(good))
    [item] = load_test_json(tmp_path / "t.json", img_prefix="imgs")
    assert item.images == ["imgs/a.png", "imgs/b.png"] and item.ranking == [2, 1]
    bad = [good[0], {"id": "2", "prompt": "p", "generations": ["a.png"], "ranking": [1, 2]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InvalidInputError, match=r"\[1\].*one rank per generation"):
        load_test_json(tmp_path / "bad.json")
    (tmp_path / "missing.json").write_text(json.dumps([{"id": "3", "prompt": "p"}]))
    with pytest.raises(InvalidInputError, match=r"id '3'.*missing field"):
        load_test_json(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        load_test_json(tmp_path / "junk.json")


def test_find_generations_sorts_numerically_and_names_missing(tmp_path):
    for k in (10, 2, 0, 1):
        (tmp_path / f"p1_{k}.png").write_bytes(b"")
    (tmp_path / "p2_0.webp").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    found = find_generations(tmp_path, ["p1", "p2"])
    assert [p.rsplit("_", 1)[1] for p in found["p1"]] == ["0.png", "1.png", "2.png", "10.png"]
    assert len(found["p2"]) == 1
    with pytest.raises(InvalidInputError, match=r"1 prompt\(s\).*'p3'"):
        find_generations(tmp_path, ["p1", "p3"])


# ------------------------------------------------------------------------------------------ downloads
def test_missing_data_offline_raises_download_error(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 and blocks sockets: every path must fail fast with a typed error
    with pytest.raises(DownloadError, match="raw.githubusercontent.com/THUDM/ImageReward"):
        ensure_test_json(tmp_path / "data" / "test.json")
    with pytest.raises(DownloadError, match="test_images.zip"):
        ensure_test_images(tmp_path / "data" / "test_images")
    with pytest.raises(DownloadError, match="downloads disabled"):
        ensure_test_json(tmp_path / "t.json", download=False)
    with pytest.raises(DownloadError, match="versatile-diffusion.zip"):
        ensure_benchmark_generations(tmp_path / "fresh" / "generations", ["vd"])
    with pytest.raises(InvalidInputError, match="no published archive"):
        ensure_benchmark_generations(tmp_path / "gen", ["my-model"])


def test_test_images_zip_already_downloaded_is_extracted(tmp_path):
    archive = tmp_path / "data" / "test_images.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("test_images/part-1/images/0001/x.webp", "x")
    folder = ensure_test_images(tmp_path / "data" / "test_images")
    assert (folder / "part-1" / "images" / "0001" / "x.webp").is_file()


# --------------------------------------------------------------------------------------- ImageRewardDB
def test_imagerewarddb_from_parquet_and_archives(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "ImageRewardDB"
    rows = {"image_path": [], "prompt_id": [], "prompt": [], "rank": []}
    archive = root / "images" / "test" / "test_1.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for pid, ranks in (("p1", [2, 1, 3]), ("p2", [1, 1]), ("p3", [1, 2])):
            for k, rank in enumerate(ranks):
                name = f"{pid}-{k}.png"
                zf.write(_png(tmp_path / "src" / name, seed=k), name)
                rows["image_path"].append(f"images/test/test_1/{name}")
                rows["prompt_id"].append(pid)
                rows["prompt"].append(f"prompt {pid}")
                rows["rank"].append(rank)
    pq.write_table(pa.table(rows), root / "metadata-test.parquet")
    items = load_imagerewarddb("test", root, download=False)
    # p2 has only a human tie (no pairs) and is dropped by the reader
    assert [(i.id, i.ranking) for i in items] == [("p1", [2, 1, 3]), ("p3", [1, 2])]
    assert all(Image.open(path).size == (12, 10) for path in items[0].images)
    assert (root / "images" / "test" / "test_1" / "p1-0.png").is_file()
    assert [i.id for i in load_imagerewarddb("test", root, download=False)] == ["p1", "p3"]  # second read


# ------------------------------------------------------------------------------------------- the cache
class CountingScorer:
    """Deterministic fake scorer counting the pairs it scores; it can fail after a number of calls."""

    name = "counting"
    higher_is_better = True

    def __init__(self, fail_after_calls=None):
        self.pairs = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def score_batch(self, prompts, images, batch_size=None):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt
        self.calls += 1
        self.pairs += len(images)
        return torch.tensor([len(p) + int(str(i).rsplit("_", 1)[1].split(".")[0]) for p, i in zip(prompts, images)],
                            dtype=torch.float32)


def test_cache_makes_reruns_free_and_resumes_after_interruption(tmp_path):
    images = [str(_png(tmp_path / f"img_{k}.png", seed=k)) for k in range(10)]
    prompts = ["ab"] * 5 + ["abcd"] * 5
    expected = [len(p) + k for k, p in enumerate(prompts)]
    path = tmp_path / "cache.sqlite"
    interrupted = CountingScorer(fail_after_calls=2)
    with ScoreCache(path) as cache, pytest.raises(KeyboardInterrupt):
        cached_scores(interrupted, prompts, images, cache=cache, scorer_id="s", chunk_pairs=3)
    assert interrupted.pairs == 6
    resumed = CountingScorer()
    with ScoreCache(path) as cache:
        assert len(cache) == 6
        assert cached_scores(resumed, prompts, images, cache=cache, scorer_id="s", chunk_pairs=3) == expected
    assert resumed.pairs == 4  # only what the interrupted run had not finished
    again = CountingScorer()
    with ScoreCache(path) as cache:
        assert cached_scores(again, prompts, images, cache=cache, scorer_id="s") == expected
        assert again.pairs == 0
        other = CountingScorer()
        cached_scores(other, prompts, images, cache=cache, scorer_id="another scorer")
        assert other.pairs == 10  # entries are per scorer
    key_before = image_identity(images[0])
    _png(tmp_path / "img_0.png", seed=99, size=(13, 10))  # edited in place -> new identity
    assert image_identity(images[0]) != key_before
    with pytest.raises(InvalidInputError, match="scorer_id"):
        cached_scores(again, prompts, images, cache=ScoreCache(tmp_path / "c2.sqlite"))
