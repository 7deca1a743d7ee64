"""HPSv3 (Ma et al., ICCV 2025; MizzenAI/HPSv3) on transformers' own Qwen2-VL classes.

HPSv3 is Qwen2-VL-7B-Instruct with a reward head read at a ``<|Reward|>`` token. For one (prompt, image)
pair the original (PyPI ``hpsv3`` 1.0.0, ``HPSv3RewardInferencer.reward``) computes:

1. the image: hpsv3's ``fetch_image`` (RGB, :func:`~ImageReward.preprocess.smart_resize` to about 200,704
   pixels with sides multiples of 28, PIL bicubic), then Qwen2-VL's patching into 14x14x2 patches
   (:func:`patchify`) and the vision tower, whose merger gives one embedding per 2x2 patches;
2. the text: Qwen2-VL's chat template (default system turn) around ``<|vision_start|><|image_pad|>
   <|vision_end|>`` + ``INSTRUCTION.format(text_prompt=prompt) + PROMPT_SUFFIX``, with the ``<|image_pad|>``
   repeated once per image embedding; the prompt is neither stripped nor truncated;
3. the language model over the token embeddings with the image embeddings scattered into the
   ``<|image_pad|>`` positions, with **plain 1-D positions** ``arange(L)`` on all three M-RoPE sections (the
   original passes ``position_ids=None`` to transformers 4.45's ``Qwen2VLModel``; the 3-D M-RoPE ids would
   move the score by up to 0.22);
4. ``rm_head`` (``Linear(H,1024) ReLU Dropout Linear(1024,16) ReLU Linear(16,2)``) on the final hidden state at
   the ``<|Reward|>`` token (not the last token): ``[mu, sigma]``. The score is mu; sigma is the raw second
   output (the training loss uses ``exp(sigma)`` as the standard deviation; it can be negative).

Because attention is causal, the tokens after ``<|Reward|>`` (``\\n\\nEND\\n<|im_end|>...``) cannot change the
result: they are not computed. Prompts of different lengths are right-padded, as the original pads them.
The checkpoint's key names are transformers 4.45's (``visual.*``, ``model.*``, ``lm_head.*``, ``rm_head.*``);
:class:`HPSv3Model` is a container with exactly those names around transformers' vision tower and text
decoder classes, so the file loads as is on every supported transformers version (>= 4.45; 4.52+ renamed the
``Qwen2VLForConditionalGeneration`` layout, which this container does not use). ``lm_head`` is in the file but
unused for the score: it is skipped by name (1.1 GB less in bf16).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..checkpoint import build_from_state_dict, read_state_dict
from ..errors import CheckpointError, DependencyError, InvalidInputError
from ..image_io import ImageLike, describe, load_image
from ..preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, preprocess_pil
from ..scorer import Scorer
from ..tokenizer import check_prompts

__all__ = ["QWEN2_VL_MIN_TRANSFORMERS", "INSTRUCTION", "PROMPT_SUFFIX", "REWARD_TOKEN", "HPSV3_PREPROCESS",
           "qwen2_vl_classes", "patchify", "rebuild_rotary", "HPSv3Model", "HPSv3Scorer", "check_hpsv3_prompts",
           "load_tokenizer", "qwen2_vl_config", "hpsv3_preprocess_config"]

logger = logging.getLogger(__name__)

#: the first transformers release with the Qwen2-VL classes (hpsv3 itself pins 4.45.2)
QWEN2_VL_MIN_TRANSFORMERS = "4.45.0"

# hpsv3 1.0.0's instruction and the text after it (HPSv3RewardInferencer: INSTRUCTION / prompt_with_special_token)
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The "
    "following sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any "
    "significant biological or logical errors, such as abnormal body structures or nonsensical environmental "
    "setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail "
    "in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic "
    "and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, "
    "atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and "
    "balance.\n- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score should be "
    "the lowest possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across "
    "the following sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image "
    "(e.g., person, animal, object) align with the textual description. The subject should match the description "
    "in terms of number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular "
    "artistic or stylistic style, evaluate how well the image adheres to this style.\n- **Contextual "
    "Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit "
    "the scenario described in the prompt. The environment should support and enhance the subject without "
    "contradictions.\n- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., "
    "colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
    "deviations may be acceptable, but critical attributes should be preserved.\n- **Semantic Coherence**: "
    "Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated "
    "content should not introduce elements that conflict with or distort the original description.\nTextual "
    "prompt - {text_prompt}\n\n\n"
)
PROMPT_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
#: special-token strings a prompt may not contain: the original gives a second score (``<|Reward|>``) or crashes
#: (``<|image_pad|>`` takes the next image's grid); every other special-token string is a special token, as there
FORBIDDEN_IN_PROMPT = (REWARD_TOKEN, IMAGE_PAD)

#: hpsv3's ``fetch_image`` settings (min_pixels = max_pixels = 200,704, factor 28) and the processor's CLIP mean/std
HPSV3_PREPROCESS = PreprocessConfig(geometry="smart_resize", mean=CLIP_MEAN, std=CLIP_STD, resize_factor=28,
                                    min_pixels=200704, max_pixels=200704)


def qwen2_vl_classes() -> tuple[type, type, Any]:
    """``(vision tower class, text decoder class, config class)`` of the installed transformers. Raises
    :class:`DependencyError` naming the version needed when transformers is older than
    :data:`QWEN2_VL_MIN_TRANSFORMERS` (the WebUI pins 4.30.2, which has no Qwen2-VL)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(QWEN2_VL_MIN_TRANSFORMERS):
        raise DependencyError(f"HPSv3 needs transformers >= {QWEN2_VL_MIN_TRANSFORMERS} (its Qwen2-VL classes); "
                              f"transformers {transformers.__version__} is installed: pip install -U 'transformers>=4.45'")
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    # transformers >= 4.52 calls the text decoder Qwen2VLTextModel (Qwen2VLModel became vision + text)
    text_class = getattr(qwen2_vl, "Qwen2VLTextModel", None) or qwen2_vl.Qwen2VLModel
    return qwen2_vl.Qwen2VisionTransformerPretrainedModel, text_class, Qwen2VLConfig


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config  # transformers 4.45-4.5x: one flat config


def patchify(pixels: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
             ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL's patching of one normalised image ``[3, h, w]`` (``h``, ``w`` multiples of
    ``patch_size * merge_size``): the frame tiled to ``temporal_patch_size`` frames, then
    ``reshape(t, 2, C, gh/2, 2, 14, gw/2, 2, 14).permute(0,3,6,4,7,2,1,5,8)`` (``Qwen2VLImageProcessor``),
    giving ``[gh * gw, 3 * 2 * 14 * 14]`` rows and the grid ``(1, gh, gw)``. Pure indexing: differentiable and
    exact. Raises :class:`InvalidInputError` for sides that are not multiples of 28."""
    channels, height, width = pixels.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise InvalidInputError(f"pixels of {height}x{width}: both sides must be multiples of {unit}")
    grid_h, grid_w = height // patch_size, width // patch_size
    frames = pixels.unsqueeze(0).expand(temporal_patch_size, channels, height, width)
    patches = frames.reshape(1, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return (patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size),
            (1, grid_h, grid_w))


def rebuild_rotary(model: nn.Module, config: Any, device: torch.device | str = "cpu") -> None:
    """(Re)compute the rotary embeddings' non-persistent ``inv_freq`` buffers, which no checkpoint holds: built
    on the meta device they hold nothing. Each rotary module is constructed again, by transformers' own class,
    on ``device`` in float32."""
    vision = config.vision_config
    with torch.device(device):
        for name, module in list(model.named_modules()):
            if "inv_freq" not in module._buffers:
                continue
            if getattr(module, "config", None) is not None:  # transformers >= 4.5x, and 4.45's model-level rotary
                fresh = type(module)(config=module.config)
            elif hasattr(module, "rope_kwargs"):  # transformers 4.45's per-layer rotary (unused: positions come in)
                kwargs = module.rope_kwargs
                fresh = type(module)(kwargs["dim"], max_position_embeddings=kwargs["max_position_embeddings"],
                                     base=kwargs["base"], scaling_factor=kwargs["factor"], rope_type=kwargs["rope_type"])
            else:  # transformers 4.45's VisionRotaryEmbedding(dim): half the vision head width
                fresh = type(module)((vision.embed_dim // vision.num_heads) // 2)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)


class HPSv3Model(nn.Module):
    """The modules of HPSv3 under the checkpoint's names: ``visual`` (transformers'
    ``Qwen2VisionTransformerPretrainedModel``), ``model`` (the Qwen2-VL text decoder: ``Qwen2VLTextModel``, or
    ``Qwen2VLModel`` before transformers 4.52) and ``rm_head``. ``config``: a ``Qwen2VLConfig`` whose text vocabulary
    is the checkpoint's embedding rows (``len(tokenizer)``, 151,658 for the real model)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision_class, text_class, _ = qwen2_vl_classes()
        self.config = config
        hidden = _text_config(config).hidden_size
        self.visual = vision_class(config.vision_config)
        self.model = text_class(_text_config(config))
        self.rm_head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16),
                                     nn.ReLU(), nn.Linear(16, 2))

    def image_embeddings(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised images ``[3, h_i, w_i]`` -> their merger outputs ``[h_i * w_i / 784, H]``, one vision-tower
        call for all (attention stays within each image)."""
        vision = self.config.vision_config
        rows, grids = zip(*(patchify(image, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
                            for image in pixels))
        grid_thw = torch.tensor(grids, dtype=torch.long, device=rows[0].device)
        dtype = self.visual.patch_embed.proj.weight.dtype
        output = self.visual(torch.cat(rows).to(dtype), grid_thw=grid_thw)
        merged = getattr(output, "pooler_output", output)  # transformers 5 returns an output object
        return list(merged.split([rows_i.shape[0] // vision.spatial_merge_size ** 2 for rows_i in rows]))

    def reward(self, input_ids: torch.Tensor, lengths: Sequence[int], image_embeds: Sequence[torch.Tensor],
               image_token_id: int) -> torch.Tensor:
        """``[B, 2]`` ``(mu, sigma)`` in the head's dtype (float32): ``input_ids`` ``[B, L]`` right-padded, each row ending at its
        ``<|Reward|>`` token (``lengths[b] - 1``); ``image_embeds[b]`` fills row ``b``'s ``<|image_pad|>`` positions."""
        embed = self.model.embed_tokens
        inputs_embeds = embed(input_ids)
        mask = (input_ids == image_token_id).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(mask, torch.cat(list(image_embeds)).to(inputs_embeds.dtype))
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        attention_mask = (positions[None] < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
        position_ids = positions.view(1, 1, -1).expand(3, batch, -1)  # 1-D positions on all three sections
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        last = torch.tensor(lengths, device=input_ids.device) - 1
        pooled = hidden[torch.arange(batch, device=input_ids.device), last]
        head_dtype = self.rm_head[0].weight.dtype
        return self.rm_head(pooled.to(head_dtype))  # the head's dtype: float32 (the original's autocast to fp32)


def check_hpsv3_prompts(prompts: str | Sequence[str]) -> list[str]:
    """``check_prompts`` plus HPSv3's rule: a prompt holding ``<|Reward|>`` or ``<|image_pad|>`` raises
    :class:`InvalidInputError` naming it (the original returns a second score or crashes there)."""
    prompt_list = check_prompts(prompts)
    for index, prompt in enumerate(prompt_list):
        found = [token for token in FORBIDDEN_IN_PROMPT if token in prompt]
        if found:
            raise InvalidInputError(f"prompt #{index} {prompt[:80]!r} contains the special token(s) {found}, which "
                                    "HPSv3 reserves (the original would score the wrong position or crash): remove them")
    return prompt_list


class HPSv3Scorer(Scorer):
    """HPSv3: ``mu`` of the reward head at ``<|Reward|>`` of a Qwen2-VL-7B preference model.

    >>> import ImageReward as RM
    >>> hps3 = RM.load_score("HPSv3")                        # doctest: +SKIP  (bf16 by default)
    >>> hps3.score("a cat", "cat.png")                       # doctest: +SKIP
    6.2
    >>> mu, sigma = hps3.score_with_uncertainty("a cat", ["cat.png"])  # doctest: +SKIP

    Images of any size are taken (each becomes ~200,704 pixels); pixels travel through the batch engine as
    ``[3, h, w]`` tensors (a list when sizes differ). ``encode_images`` returns one embedding tensor per image.
    """

    name = "HPSv3"
    higher_is_better = True
    is_differentiable = True
    uses_prompt = True
    default_batch_size = 8

    def __init__(self, model: HPSv3Model, tokenizer: Any, chat_template: str | None = None,
                 preprocess_config: PreprocessConfig = HPSV3_PREPROCESS) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._preprocess_config = preprocess_config
        self._column: int | slice = 0  # 0: mu; both columns inside score_with_uncertainty
        self._text_cache: dict[str, tuple[int, ...]] = {}
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        # right padding is masked out, so any id would do; the original pads with <|endoftext|>
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the chat template rendered once around a sentinel: what comes before and after the user's text
        sentinel = "\x00HPSV3_TEXT\x00"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
        try:
            chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **({"chat_template": chat_template} if chat_template else {}))
        except Exception as err:  # no template in the folder, or one this code cannot render
            raise CheckpointError(f"the Qwen2-VL processor folder has no usable chat template ({err})") from err
        if chat.count(sentinel) != 1 or IMAGE_PAD not in chat.split(sentinel)[0]:
            raise CheckpointError("the chat template does not place the image before the text as Qwen2-VL's does")
        before_text, after_text = chat.split(sentinel)
        before_image, _, between = before_text.partition(IMAGE_PAD)
        self._image_prefix_ids = self._encode(before_image)  # system turn ... <|vision_start|>
        self._text_parts = (between, after_text)              # <|vision_end|> ... / <|im_end|>\n<|im_start|>assistant\n

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        return self._preprocess_config

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model.visual.patch_embed.proj.weight.dtype

    # ------------------------------------------------------------------ tokens
    def _text_ids(self, prompt: str) -> tuple[int, ...]:
        """Ids of ``<|vision_end|>`` + instruction + prompt + suffix, up to and including ``<|Reward|>`` (the
        rest cannot change the result under the causal mask). Special tokens split the text before BPE, so
        these ids are the original's ids of the whole chat text, cut at its ``<|image_pad|>`` run."""
        cached = self._text_cache.get(prompt)
        if cached is None:
            between, _ = self._text_parts
            ids = self._encode(between + INSTRUCTION.format(text_prompt=prompt) + PROMPT_SUFFIX)
            cached = tuple(ids[: ids.index(self.reward_token_id) + 1])
            if len(self._text_cache) >= 4096:
                self._text_cache.clear()
            self._text_cache[prompt] = cached
        return cached

    def input_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        """The original's full input ids for ``prompt`` with an image of ``n_image_tokens`` embeddings, up to
        and including ``<|Reward|>`` (where the original's ids go on with ``\\n\\nEND\\n<|im_end|>...``)."""
        return self._image_prefix_ids + [self.image_token_id] * n_image_tokens + list(self._text_ids(prompt))

    # ------------------------------------------------------------------ the Scorer interface
    def preprocess(self, image: ImageLike, *, index: int | None = None) -> torch.Tensor:
        """One image -> normalised ``[3, h, w]`` float32 (hpsv3's ``fetch_image`` + the processor's
        rescale/normalise); an aspect ratio above 200 raises :class:`InvalidInputError` naming the image."""
        loaded = load_image(image, index=index, exif_transpose=self.exif_transpose)
        try:
            return preprocess_pil(loaded, self.preprocess_config)
        except InvalidInputError as err:
            raise InvalidInputError(f"{describe(image, index)}: {err}") from err

    def encode_images(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        """Normalised ``[B, 3, h, w]`` pixels, or a list of ``[3, h_i, w_i]`` -> one ``[n_i, H]`` embedding
        tensor per image (``n_i = h_i * w_i / 784``)."""
        return self.model.image_embeddings(list(pixel_values))

    def reward_pairs(self, prompts: Sequence[str], image_features: Sequence[torch.Tensor],
                     image_index: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` float32 ``(mu, sigma)`` of pairs ``(prompts[i], image_features[image_index[i]])``."""
        prompts = check_hpsv3_prompts(list(prompts))
        embeds = [image_features[int(i)] for i in image_index.tolist()]
        rows = [self.input_ids(prompt, embed.shape[0]) for prompt, embed in zip(prompts, embeds)]
        lengths = [len(row) for row in rows]
        padded = torch.full((len(rows), max(lengths)), self.pad_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            padded[b, : len(row)] = torch.tensor(row)
        return self.model.reward(padded.to(self.device), lengths, embeds, self.image_token_id)

    def score_pairs(self, prompts: Sequence[str], image_features: Sequence[torch.Tensor],  # type: ignore[override]
                    image_index: torch.Tensor) -> torch.Tensor:
        """mu ``[B]`` (``[B, 2]`` mu and sigma inside :meth:`score_with_uncertainty`)."""
        return self.reward_pairs(prompts, image_features, image_index)[:, self._column]

    def score_encoded(self, prompts: Sequence[str], image_features: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self.score_pairs(prompts, image_features, torch.arange(len(image_features)))

    def score_batch(self, prompts: str | Sequence[str], images: Sequence[ImageLike], *, batch_size: int | None = None,
                    progress: bool = False) -> torch.Tensor:
        check_hpsv3_prompts(self._no_prompt_allowed(prompts))  # before any image is read
        return super().score_batch(prompts, images, batch_size=batch_size, progress=progress)

    def score_grad(self, pixels: torch.Tensor, prompts: str | Sequence[str], *,
                   value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        check_hpsv3_prompts(self._no_prompt_allowed(prompts))
        return super().score_grad(pixels, prompts, value_range=value_range)

    @contextmanager
    def _both_outputs(self) -> Iterator[None]:
        self._column = slice(None)
        try:
            yield
        finally:
            self._column = 0

    def score_with_uncertainty(self, prompts: str | Sequence[str], images: Sequence[ImageLike], *,
                               batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)``, each float32 ``[N]`` on the CPU, of pairs ``prompts[i]`` / ``images[i]`` (one prompt
        is broadcast): the original's ``reward(...)[:, 0]`` and ``[:, 1]``, through the same batch engine.

        mu is the score. sigma is the head's raw second output: training (``loss_type: uncertainty``) models
        the score as ``N(mu, exp(sigma)^2)``, so ``exp(sigma)`` is a standard deviation and, for two images of
        one prompt, ``P(a preferred to b) = Phi((mu_a - mu_b) / sqrt(exp(sigma_a)^2 + exp(sigma_b)^2))``.
        The scale of mu is the model's own (no normalisation; see README "HPSv3")."""
        with self._both_outputs():
            both = self.score_batch(prompts, images, batch_size=batch_size)
        return both[:, 0].contiguous(), both[:, 1].contiguous()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_files(cls, checkpoint: str | os.PathLike, processor_dir: str | os.PathLike) -> "HPSv3Scorer":
        """From ``HPSv3.safetensors`` (transformers 4.45 key names, read safely, loaded strictly on the meta device:
        one copy of the weights in memory) and the ``Qwen2-VL-7B-Instruct`` processor folder (``config.json``,
        tokenizer files, ``chat_template.json``, ``preprocessor_config.json``). Tensors keep the file's dtype;
        cast with ``factory.place_model``. Raises :class:`CheckpointError` / :class:`DependencyError`."""
        qwen2_vl_classes()  # DependencyError before anything is read
        tokenizer, chat_template = load_tokenizer(processor_dir)
        state = read_state_dict(checkpoint)
        return cls.from_state_dict(state, processor_dir, tokenizer=tokenizer, chat_template=chat_template,
                                   source=os.fspath(checkpoint))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], processor_dir: str | os.PathLike, *,
                        tokenizer: Any = None, chat_template: str | None = None, source: str = "checkpoint"
                        ) -> "HPSv3Scorer":
        """Adopts the tensors of ``state`` (the dict is emptied of them, so that no second reference keeps
        memory alive)."""
        if tokenizer is None:
            tokenizer, chat_template = load_tokenizer(processor_dir)
        if "model.embed_tokens.weight" not in state or "rm_head.0.weight" not in state:
            raise CheckpointError(f"{source} is not an HPSv3 checkpoint (no model.embed_tokens.weight / rm_head.0.weight)")
        rows = state["model.embed_tokens.weight"].shape[0]
        if rows != len(tokenizer):
            raise CheckpointError(f"{source}: {rows} token embeddings, but the tokenizer of {os.fspath(processor_dir)!r} "
                                  f"with {REWARD_TOKEN} has {len(tokenizer)} tokens")
        config = qwen2_vl_config(processor_dir, rows)
        preprocess = hpsv3_preprocess_config(Path(processor_dir) / "preprocessor_config.json")

        def factory() -> HPSv3Model:
            model = HPSv3Model(config)
            rebuild_rotary(model, config)
            return model

        model = build_from_state_dict(factory, state, allow_unexpected=("lm_head.weight",), source=source)
        state.clear()
        return cls(model, tokenizer, chat_template, preprocess).eval()


def qwen2_vl_config(processor_dir: str | os.PathLike, vocab_size: int) -> Any:
    """The ``Qwen2VLConfig`` of ``processor_dir/config.json`` with ``vocab_size`` token embeddings (hpsv3's
    ``resize_token_embeddings(len(tokenizer))``) and SDPA attention (the original's, without flash-attn)."""
    _, _, config_class = qwen2_vl_classes()
    try:
        config = config_class.from_pretrained(os.fspath(processor_dir))
    except Exception as err:  # missing or malformed config.json
        raise CheckpointError(f"{os.fspath(processor_dir)!r}: no readable Qwen2-VL config.json ({err})") from err
    _text_config(config).vocab_size = vocab_size
    for sub in (config, _text_config(config), config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


def load_tokenizer(processor_dir: str | os.PathLike) -> tuple[Any, str | None]:
    """The Qwen2-VL tokenizer of ``processor_dir`` with ``<|Reward|>`` added as hpsv3 adds it (the next id:
    151657 for the real tokenizer), and the chat template of ``chat_template.json`` when the folder has one."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    folder = Path(processor_dir)
    if not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} is not a Qwen2-VL processor folder (no tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder))
    except Exception as err:  # missing or malformed tokenizer files
        raise CheckpointError(f"{str(folder)!r}: cannot load the Qwen2-VL tokenizer ({type(err).__name__}: {err})") from err
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    template = None
    if (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return tokenizer, template


def hpsv3_preprocess_config(path: str | os.PathLike) -> PreprocessConfig:
    """:data:`HPSV3_PREPROCESS` with the mean/std of ``preprocessor_config.json`` (absent: CLIP's); patch sizes
    other than Qwen2-VL's 14 / 2 / 2 raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        return HPSV3_PREPROCESS
    spec: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    sizes = (spec.get("patch_size", 14), spec.get("temporal_patch_size", 2), spec.get("merge_size", 2))
    if sizes != (14, 2, 2):
        raise CheckpointError(f"{str(path)!r}: patch/temporal/merge sizes {sizes}, expected Qwen2-VL's (14, 2, 2)")
    return PreprocessConfig(geometry="smart_resize", mean=tuple(spec.get("image_mean", CLIP_MEAN)),
                            std=tuple(spec.get("image_std", CLIP_STD)), resize_factor=28,
                            min_pixels=HPSV3_PREPROCESS.min_pixels, max_pixels=HPSV3_PREPROCESS.max_pixels)
