"""Baseline scorers ``"CLIP"``, ``"BLIP"``, ``"Aesthetic"``, ``"HPSv2"``, ``"HPSv2.1"`` and ``"PickScore"``:
their files, their builders, and their registration (:func:`ImageReward.factory.register_scorer`, at the
bottom of this file), which makes each name valid everywhere a model name is (``RM.load_scorer``,
``RM.load_score``, the CLI, eval, ReFL, the plugins).

Where the weights come from (the first that exists wins; nothing touches the network when a file is
already in ``download_root``, default ``~/.cache/ImageReward``):

* CLIP: ``ViT-L-14.pt`` (OpenAI's file, as the original caches it), then
  ``clip-vit-large-patch14.safetensors``, then the Hub (``openai/clip-vit-large-patch14`` at a pinned
  revision), then OpenAI's URL (SHA-256 checked).
* BLIP: ``model_large.pth`` (Salesforce's URL). Aesthetic: ``sac+logos+ava1-l14-linearMSE.pth`` or the
  original's literal ``sac%2Blogos%2Bava1-l14-linearMSE.pth`` (LAION's URL), plus CLIP's image tower.
* HPSv2 / HPSv2.1: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (Hub ``xswu/HPSv2``; open_clip
  ViT-H-14 state dict under ``'state_dict'``, read with ``weights_only``).
* PickScore: the folder ``PickScore_v1/`` (Hub ``yuvalkirstain/PickScore_v1``: ``config.json`` +
  ``model.safetensors``) and the processor folder ``CLIP-ViT-H-14-laion2B-s32B-b79K/`` (Hub
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: ``preprocessor_config.json``, tokenizer files).
* HPSv3: ``HPSv3.safetensors`` (Hub ``MizzenAI/HPSv3``: every weight, transformers 4.45 key names) and the
  folder ``Qwen2-VL-7B-Instruct/`` (Hub ``Qwen/Qwen2-VL-7B-Instruct``: ``config.json``, tokenizer files, chat
  template, ``preprocessor_config.json``; not its weights). bf16 by default (reward head float32).

All three are float32 unless ``dtype=torch.float16/bfloat16`` is asked for (the Aesthetic head stays
float32). Importing this module is cheap (``ImageReward/resolve.py`` imports it, so the names are registered
whenever the package is imported): the models and transformers are imported by the builders.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import DownloadError, UnsupportedInputError
from .factory import place_model, register_scorer
from .pretrained import PretrainedCfg, Requirement, default_cache_dir, fetch, fetch_folder, offline

__all__ = ["BASELINE_FILES", "CLIP_HUB", "CLIP_OPENAI", "BLIP_LARGE", "AESTHETIC_HEAD", "HPS_V2", "HPS_V2_1",
           "PICKSCORE_V1", "PICKSCORE_PROCESSOR", "HPS_V3", "QWEN2_VL_7B_PROCESSOR", "clip_weights_path", "build_clip",
           "build_blip", "build_aesthetic", "build_hps", "build_pickscore", "build_hpsv3"]

logger = logging.getLogger(__name__)

CLIP_OPENAI = PretrainedCfg(
    name="CLIP ViT-L/14 (OpenAI)",
    filename="ViT-L-14.pt",
    url="https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    license="MIT",
    description="OpenAI CLIP ViT-L/14 as a TorchScript archive (the file the original ImageReward used)",
)
CLIP_HUB = PretrainedCfg(
    name="CLIP ViT-L/14 (Hub)",
    filename="clip-vit-large-patch14.safetensors",
    hf_repo="openai/clip-vit-large-patch14",
    hf_filename="model.safetensors",
    # The snapshot commonly pinned for this repo (its model.safetensors is seen under this snapshot id in
    # public caches); could not be checked against the Hub from here.
    revision="32bd64288804d66eefd0ccbe215aa642df71cc41",
    license="MIT",
    description="OpenAI CLIP ViT-L/14 in transformers' layout (same weights as ViT-L-14.pt)",
)
BLIP_LARGE = PretrainedCfg(
    name="BLIP",
    filename="model_large.pth",
    url="https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth",
    license="BSD-3-Clause",
    description="Salesforce BLIP ViT-L pretraining checkpoint ({'model': state_dict})",
)
AESTHETIC_HEAD = PretrainedCfg(
    name="Aesthetic",
    filename="sac+logos+ava1-l14-linearMSE.pth",
    alt_filenames=("sac%2Blogos%2Bava1-l14-linearMSE.pth",),
    url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    license="see github.com/christophschuhmann/improved-aesthetic-predictor",
    description="LAION improved aesthetic predictor head (linear MLP on normalised CLIP ViT-L/14 image embeddings)",
)
# The revisions below are the snapshot ids these files are found under in public Hub caches (the same id in
# several independent projects' hard-coded cache paths, e.g. ``models--xswu--HPSv2/snapshots/697403c7...``);
# they could not be checked against the Hub itself from the machine this was written on. ``revision=`` on
# ``load_score`` overrides them per call (``revision="main"`` follows the branch).
HPS_V2 = PretrainedCfg(
    name="HPSv2",
    filename="HPS_v2_compressed.pt",
    hf_repo="xswu/HPSv2",
    hf_filename="HPS_v2_compressed.pt",
    revision="697403c78157020a1ae59d23f111aa58ced35b0a",
    license="Apache-2.0 (github.com/tgxs002/HPSv2)",
    description="HPSv2: open_clip ViT-H-14 fine-tuned on HPDv2 ({'state_dict': open_clip state dict})",
)
HPS_V2_1 = PretrainedCfg(
    name="HPSv2.1",
    filename="HPS_v2.1_compressed.pt",
    hf_repo="xswu/HPSv2",
    hf_filename="HPS_v2.1_compressed.pt",
    revision="697403c78157020a1ae59d23f111aa58ced35b0a",
    license="Apache-2.0 (github.com/tgxs002/HPSv2)",
    description="HPSv2.1: HPSv2 retrained on higher-quality HPDv2 data (same architecture and file format)",
)
PICKSCORE_V1 = PretrainedCfg(
    name="PickScore",
    filename="PickScore_v1",  # a folder
    hf_repo="yuvalkirstain/PickScore_v1",
    revision="a4e4367c6dfa7288a00c550414478f865b875800",
    folder_files=("config.json", ("model.safetensors", "pytorch_model.bin")),
    license="see huggingface.co/yuvalkirstain/PickScore_v1",
    description="PickScore v1: CLIP ViT-H-14 fine-tuned on Pick-a-Pic (transformers CLIPModel folder)",
)
PICKSCORE_PROCESSOR = PretrainedCfg(
    name="PickScore processor",
    filename="CLIP-ViT-H-14-laion2B-s32B-b79K",  # a folder
    hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    revision="1c2b8495b28150b8a4922ee1c8edee224c284c0c",
    folder_files=("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                  "merges.txt"),
    license="MIT",
    description="the CLIPProcessor PickScore's model card loads (image settings and tokenizer files)",
)
# HPSv3's revisions: MizzenAI/HPSv3 at the snapshot id a public project hard-codes in its Hub cache path (one
# project); Qwen/Qwen2-VL-7B-Instruct at the snapshot id found in many independent projects' cache paths. Neither
# could be checked against the Hub from here (docs/differences.md); ``revision=`` overrides them per call.
HPS_V3 = PretrainedCfg(
    name="HPSv3",
    filename="HPSv3.safetensors",
    hf_repo="MizzenAI/HPSv3",
    hf_filename="HPSv3.safetensors",
    revision="4f81e3e09edd82fe3c5f636444c721b592a735ca",
    license="MIT (github.com/MizzenAI/HPSv3); Qwen2-VL-7B-Instruct: Apache-2.0",
    description="HPSv3: Qwen2-VL-7B-Instruct + reward head at <|Reward|> (8.3B parameters, 16.6 GB in bf16)",
)
QWEN2_VL_7B_PROCESSOR = PretrainedCfg(
    name="HPSv3 processor (Qwen2-VL-7B-Instruct)",
    filename="Qwen2-VL-7B-Instruct",  # a folder: configuration and processor files, not the weights
    hf_repo="Qwen/Qwen2-VL-7B-Instruct",
    revision="eed13092ef92e448dd6875b2a00151bd3f7db0ac",
    folder_files=("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "chat_template.json"),
    license="Apache-2.0",
    description="Qwen2-VL-7B-Instruct's config.json, tokenizer, chat template and image processor settings",
)
# What each scorer needs, for listings and "missing files" messages: a file, or a tuple of alternatives (any one
# will do). PickScore's processor folder is not listed: without it the packaged equivalents are used.
BASELINE_FILES: dict[str, tuple[Requirement, ...]] = {
    "CLIP": ((CLIP_OPENAI, CLIP_HUB),),
    "BLIP": (BLIP_LARGE,),
    "Aesthetic": (AESTHETIC_HEAD, (CLIP_OPENAI, CLIP_HUB)),
    "HPSv2": (HPS_V2,),
    "HPSv2.1": (HPS_V2_1,),
    "PickScore": (PICKSCORE_V1,),
    "HPSv3": (HPS_V3, QWEN2_VL_7B_PROCESSOR),
}


def clip_weights_path(download_root: str | os.PathLike | None = None, *, revision: str | None = None) -> Path:
    """Local path of CLIP ViT-L/14 weights: a file already in ``download_root`` (OpenAI's ``ViT-L-14.pt``
    first), else downloaded from the Hub, else from OpenAI's URL."""
    root = Path(download_root) if download_root is not None else default_cache_dir()
    for cfg in (CLIP_OPENAI, CLIP_HUB):
        if (root / cfg.filename).is_file():
            return root / cfg.filename
    try:
        return fetch(CLIP_HUB, root, revision=revision)
    except DownloadError as hub_error:
        if offline():
            raise DownloadError(f"{hub_error} (or put OpenAI's {CLIP_OPENAI.filename} there)") from hub_error
        logger.warning("Hub download of CLIP failed (%s); trying OpenAI's URL", hub_error)
        return fetch(CLIP_OPENAI, root)


def _checkpoint_arg(kwargs: dict[str, Any], name: str) -> str | None:
    value = kwargs.pop(name, None)
    if kwargs:
        raise UnsupportedInputError(f"unexpected arguments: {sorted(kwargs)}")
    return os.fspath(value) if value is not None else None


def build_clip(device: str | torch.device | None = None, download_root: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("CLIP", ...)``; ``checkpoint=`` names a weights file (OpenAI ``.pt`` or ``.safetensors``)."""
    from .models.clip import CLIPScorer

    path = _checkpoint_arg(kwargs, "checkpoint") or clip_weights_path(download_root)
    logger.info("loading CLIP from %s", path)
    return place_model(CLIPScorer.from_checkpoint(path), device, dtype)


def build_blip(device: str | torch.device | None = None, download_root: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("BLIP", ...)``; ``checkpoint=`` names a ``{'model': state_dict}`` file."""
    from .checkpoint import read_state_dict
    from .models.blip import BLIPConfig, TextConfig
    from .models.blip_itc import BLIPITCScorer

    path = _checkpoint_arg(kwargs, "checkpoint") or fetch(BLIP_LARGE, download_root)
    logger.info("loading BLIP from %s", path)
    config = BLIPConfig(text=TextConfig.from_med_config(None, encoder_width=1024))
    scorer = BLIPITCScorer.from_state_dict(read_state_dict(path, nested_key="model"), config, source=os.fspath(path))
    return place_model(scorer, device, dtype)


def build_aesthetic(device: str | torch.device | None = None, download_root: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("Aesthetic", ...)``; ``checkpoint=`` names the head file, ``clip_checkpoint=`` the CLIP
    weights, ``clip=`` an already loaded CLIP scorer whose image tower is shared."""
    from .models.aesthetic import AestheticScorer
    from .models.clip import load_clip_weights

    clip = kwargs.pop("clip", None)
    clip_path = kwargs.pop("clip_checkpoint", None)
    head_path = _checkpoint_arg(kwargs, "checkpoint") or fetch(AESTHETIC_HEAD, download_root)
    if clip is not None:
        scorer = AestheticScorer.from_clip(clip)
    else:
        clip_path = os.fspath(clip_path) if clip_path is not None else clip_weights_path(download_root)
        logger.info("loading the Aesthetic CLIP image tower from %s", clip_path)
        hparams, vision_state = load_clip_weights(clip_path, vision_only=True)
        scorer = AestheticScorer.build(hparams, vision_state, source=os.fspath(clip_path))
    logger.info("loading the Aesthetic head from %s", head_path)
    scorer.load_head(head_path)
    if clip is not None:  # the shared tower already has its device and dtype
        scorer.mlp.to(scorer.device)
        return scorer.eval()
    return place_model(scorer, device, dtype, keep_fp32=("mlp",))


def build_hps(version: str = "HPSv2.1", device: str | torch.device | None = None,
              download_root: str | os.PathLike | None = None, dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("HPSv2" | "HPSv2.1", ...)``; ``checkpoint=`` names a ``{'state_dict': open_clip state
    dict}`` file, ``revision=`` a Hub revision of ``xswu/HPSv2``, ``hparams=`` another open_clip ViT
    architecture than ViT-H-14 (see ``models.clip.VIT_H_14``; tests use a tiny one)."""
    from .checkpoint import read_state_dict
    from .models.clip import VIT_H_14
    from .models.hps import HPSv2Scorer

    cfg = {"HPSv2": HPS_V2, "HPSv2.1": HPS_V2_1}[version]
    revision = kwargs.pop("revision", None)
    hparams = kwargs.pop("hparams", VIT_H_14)
    path = _checkpoint_arg(kwargs, "checkpoint") or fetch(cfg, download_root, revision=revision)
    logger.info("loading %s from %s", version, path)
    state = read_state_dict(path, nested_key="state_dict")
    scorer = HPSv2Scorer.from_open_clip_state_dict(state, hparams=hparams, name=version, source=os.fspath(path))
    del state
    return place_model(scorer, device, dtype)


def build_pickscore(device: str | torch.device | None = None, download_root: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("PickScore", ...)``; ``checkpoint=`` names a ``CLIPModel`` folder, ``processor=`` the
    processor folder (default: ``download_root``'s, else downloaded, else the packaged equivalents of its
    settings and vocabulary), ``revision=`` a Hub revision of ``yuvalkirstain/PickScore_v1``."""
    from .models.pickscore import PickScoreScorer

    revision = kwargs.pop("revision", None)
    processor = kwargs.pop("processor", None)
    model_dir = _checkpoint_arg(kwargs, "checkpoint")
    if model_dir is None:
        model_dir = fetch_folder(PICKSCORE_V1, download_root, revision=revision)
    if processor is None:
        local = Path(download_root or default_cache_dir()) / PICKSCORE_PROCESSOR.filename
        try:
            processor = local if local.is_dir() else fetch_folder(PICKSCORE_PROCESSOR, download_root)
        except DownloadError as err:  # its settings and vocabulary ship with the package: no need to fail
            logger.warning("%s; using the packaged equivalents (laion's CLIPImageProcessor settings, CLIP's BPE)", err)
    logger.info("loading PickScore from %s (processor %s)", model_dir, processor)
    return place_model(PickScoreScorer.from_folders(model_dir, processor), device, dtype)


def build_hpsv3(device: str | torch.device | None = None, download_root: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None, **kwargs: Any):
    """``load_score("HPSv3", ...)``: bf16 unless ``dtype`` says otherwise (the reward head stays float32).
    ``checkpoint=`` names an ``HPSv3.safetensors``, ``processor=`` a Qwen2-VL-7B-Instruct folder, ``revision=`` a Hub
    revision of ``MizzenAI/HPSv3``. Needs transformers >= 4.45 (:class:`~ImageReward.errors.DependencyError`
    before any file is read or downloaded otherwise)."""
    from .models.hpsv3 import HPSv3Scorer, qwen2_vl_classes

    qwen2_vl_classes()
    revision = kwargs.pop("revision", None)
    processor = kwargs.pop("processor", None)
    path = _checkpoint_arg(kwargs, "checkpoint")
    processor = processor or fetch_folder(QWEN2_VL_7B_PROCESSOR, download_root)
    path = path or fetch(HPS_V3, download_root, revision=revision)
    logger.info("loading HPSv3 from %s (processor %s)", path, processor)
    scorer = HPSv3Scorer.from_files(path, processor)
    # The reward head stays out of the cast: float32 with the file's values (the original loads the checkpoint into
    # an fp32 head), never rounded through bf16. The rest is cast where it was read, then moved: a file in another
    # dtype never reaches the device at its own size.
    head, scorer.model.rm_head = scorer.model.rm_head, None
    dtype = torch.bfloat16 if dtype is None else dtype
    place_model(place_model(scorer, "cpu", dtype), device, dtype)
    scorer.model.rm_head = head.to(scorer.device).float()
    return scorer.eval()


register_scorer("CLIP", build_clip, files=BASELINE_FILES["CLIP"],
                description="CLIP ViT-L/14 cosine similarity of prompt and image (OpenAI)")
register_scorer("BLIP", build_blip, files=BASELINE_FILES["BLIP"],
                description="BLIP ViT-L image-text contrastive (ITC) similarity (Salesforce)")
register_scorer("Aesthetic", build_aesthetic, files=BASELINE_FILES["Aesthetic"],
                description="LAION improved aesthetic predictor on CLIP ViT-L/14 (ignores the prompt)")
register_scorer("HPSv2", functools.partial(build_hps, "HPSv2"), files=BASELINE_FILES["HPSv2"],
                description="HPSv2: cosine of open_clip ViT-H-14 embeddings tuned on human preferences (HPDv2)")
register_scorer("HPSv2.1", functools.partial(build_hps, "HPSv2.1"), files=BASELINE_FILES["HPSv2.1"],
                description="HPSv2.1: HPSv2 retrained on higher-quality HPDv2 data")
register_scorer("PickScore", build_pickscore, files=BASELINE_FILES["PickScore"],
                description="PickScore v1: logit_scale.exp() * CLIP ViT-H-14 cosine, tuned on Pick-a-Pic")
register_scorer("HPSv3", build_hpsv3, files=BASELINE_FILES["HPSv3"],
                description="HPSv3: mu of a Qwen2-VL-7B reward head at <|Reward|> (MizzenAI, ICCV 2025; bf16 by default)")
