"""open_clip models behind dmclip's model contract (any of open_clip's architectures), loaded offline.

Model references (``dmclip.models.refs``), weights always named explicitly:

    open_clip:<arch>:<checkpoint file>   an open_clip architecture (``open_clip.list_models()``) with weights
                                         from a local file: a bare state_dict, a training checkpoint
                                         ({"state_dict": ...}, DDP "module." prefixes too) or .safetensors
    open_clip:local-dir:<directory>      a model saved in the Hugging Face hub layout (open_clip_config.json +
                                         open_clip_model.safetensors / open_clip_pytorch_model.bin, as
                                         open_clip's push_to_hf_hub writes it): architecture, preprocessing and
                                         weights all come from the directory
    open_clip:hf-hub:<org>/<repo>        the same layout from the Hugging Face hub (or its local cache when
                                         offline)
    open_clip:<arch>:<pretrained tag>    weights of one of open_clip's tags (the hub, or its local cache)
    open_clip:<arch>:random              random weights, only when asked for like this

``open_clip:<arch>`` alone is an error (it used to build random weights silently). The model keeps the
teacher's own preprocessing (image size, mean/std, interpolation) and tokenizer. Its ``arch`` holds the full
open_clip config, so a model saved with it (e.g. a distilled student's text tower) is rebuilt offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmclip.errors import DmclipError, did_you_mean
from dmclip.registry import families

PREFIX = "open_clip:"
SCHEMAS = ("local-dir", "hf-hub")
RANDOM = "random"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
WEIGHTS_HINT = ("name the weights: open_clip:<arch>:/path/checkpoint.pt, open_clip:local-dir:/path/to/hub-dir, "
                "open_clip:<arch>:<pretrained tag> (from the Hugging Face cache when offline), or "
                "open_clip:<arch>:random for random weights")


class _OpenClipTokenizer:
    def __init__(self, tokenizer, context_length: int):
        self._tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(texts, context_length=self.context_length)


class OpenClipModel(nn.Module):
    """An open_clip model with dmclip's contract; images in [0, 1] are resized and normalised as the model's
    own preprocessing does (its image size, mean/std and interpolation)."""

    def __init__(self, model: nn.Module, tokenizer, arch: dict):
        super().__init__()
        import open_clip

        self.arch = arch
        self.model = model
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        mean = preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN
        std = preprocess.get("std") or open_clip.OPENAI_DATASET_STD
        self.interpolation = "bilinear" if preprocess.get("interpolation") == "bilinear" else "bicubic"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77))
        self.tokenizer = _OpenClipTokenizer(tokenizer, self.context_length)
        out = getattr(model, "text_projection", None)
        if isinstance(out, torch.Tensor):
            self.embed_dim = int(out.shape[1])
        elif isinstance(out, nn.Linear):
            self.embed_dim = int(out.out_features)
        else:
            self.embed_dim = int(arch.get("model_cfg", {}).get("embed_dim") or 0)
        self.logit_scale = model.logit_scale

    def drop_image_tower(self) -> OpenClipModel:
        """Keep only what text encoding uses: a distilled student's text tower is its teacher's, and the teacher's
        image tower (most of a ViT-S-32's 250 MB) would otherwise be saved in every checkpoint and model file.
        ``arch["towers"] = "text"`` rebuilds it the same way from model.json."""
        self.model.visual = None
        self.arch = {**self.arch, "towers": "text"}
        return self

    def tokenize(self, texts) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.model.visual is None:
            raise DmclipError(f"the open_clip model {self.arch.get('architecture')} here is a text tower only",
                              "encode images with the student's image tower, or load the teacher itself")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode=self.interpolation,
                                   align_corners=False, antialias=True).clamp(0, 1)
        return self.model.encode_image((images - self.mean) / self.std)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


# ------------------------------------------------------------------------------------------ loading


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1 and text.endswith(":"):  # load_state_dict: "Error(s) in loading state_dict for CLIP:"
        text += " " + lines[1]
    return text[:200]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip logs on the root logger ("initialized randomly" before dmclip loads saved weights, download
    errors dmclip reports itself): silence it while it builds."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _create(name: str, pretrained: str | None, what: str, hint: str, *, remote: bool = False) -> nn.Module:
    """open_clip.create_model with its errors as one DmclipError; ``remote``: weights come from the hub."""
    import open_clip

    try:
        with _quiet():
            return open_clip.create_model(name, pretrained=pretrained, load_weights=True)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/ValueError/KeyError, hub errors ...
        if remote and _offline():
            raise DmclipError(f"{what} is not on this machine (not in the Hugging Face cache, and HF_HUB_OFFLINE "
                              "is set)", hint) from None
        raise DmclipError(f"open_clip could not load {what}: {_first_line(exc)}", hint) from None


def _tokenizer(source: str, model_cfg: dict):
    import open_clip

    try:
        return open_clip.get_tokenizer(source)
    except FileNotFoundError:
        if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
            raise
        with _config_dir(model_cfg, {}) as directory:  # CLIP's BPE: the config alone says which tokenizer
            return open_clip.get_tokenizer(f"local-dir:{directory}")


@contextlib.contextmanager
def _config_dir(model_cfg: dict, preprocess_cfg: dict) -> Iterator[str]:
    """A temporary hub-layout directory holding only open_clip_config.json (no weights)."""
    with tempfile.TemporaryDirectory(prefix="dmclip-open-clip-") as directory:
        Path(directory, "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}), encoding="utf-8")
        yield directory


def _jsonable_cfg(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=list))


def _wrap(model: nn.Module, name: str, weights: str, model_cfg: dict | None, tokenizer_source: str) -> OpenClipModel:
    import open_clip

    if model_cfg is None:
        model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = _jsonable_cfg(open_clip.get_model_preprocess_cfg(model))
    arch = {"family": "open_clip", "architecture": name, "weights": weights,
            "model_cfg": _jsonable_cfg(model_cfg or {}), "preprocess_cfg": preprocess_cfg,
            "tokenizer": tokenizer_source}
    tokenizer = _tokenizer(tokenizer_source, model_cfg or {})
    return OpenClipModel(model, tokenizer, arch).eval()


def _check_architecture(arch: str) -> None:
    import open_clip

    if arch in open_clip.list_models():
        return
    if arch and Path(arch).is_dir():
        raise DmclipError(f"open_clip:{arch} names a directory, not an open_clip architecture",
                          f"a model saved in the hub layout loads as open_clip:local-dir:{arch}")
    raise DmclipError(f"open_clip has no architecture {arch!r}",
                      f"{did_you_mean(arch, open_clip.list_models())} (a hub-layout directory: "
                      "open_clip:local-dir:/path)")


def _load_local_dir(directory: str) -> OpenClipModel:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise DmclipError(f"open_clip:local-dir:{directory}: no such directory",
                          "pass a directory in the hub layout (open_clip_config.json + open_clip_model.safetensors "
                          "or open_clip_pytorch_model.bin)")
    config = path / "open_clip_config.json"
    if not config.is_file():
        raise DmclipError(f"{path} has no open_clip_config.json, so it is not an open_clip hub-layout directory",
                          "save the model with open_clip's save_for_hf / push_to_hf_hub layout, or pass a checkpoint "
                          "file as open_clip:<arch>:/path/checkpoint.pt")
    try:
        model_cfg = json.loads(config.read_text(encoding="utf-8"))["model_cfg"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DmclipError(f"{config} is not an open_clip config ({_first_line(exc)})",
                          "it needs a JSON object with a 'model_cfg' entry, as open_clip writes it") from None
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth")]
    if not weights:
        raise DmclipError(f"{path} holds open_clip_config.json but no weights",
                          "add open_clip_model.safetensors or open_clip_pytorch_model.bin (or use "
                          "open_clip:<arch>:random for random weights)")
    name = f"local-dir:{path}"
    model = _create(name, None, f"the hub-layout directory {path}",
                    "the weights do not fit open_clip_config.json, or are damaged; save the directory again")
    return _wrap(model, name, str(path), model_cfg, name)


def _load_hf_hub(repo: str) -> OpenClipModel:
    name = f"hf-hub:{repo}"
    model = _create(name, None, name, "download it once where the hub is reachable, or copy the repository to a "
                    "directory and pass open_clip:local-dir:/path/to/it", remote=True)
    return _wrap(model, name, name, None, name)


def _load_arch(arch: str, weights: str | None) -> OpenClipModel:
    import open_clip

    _check_architecture(arch)
    if not weights:
        raise DmclipError(f"open_clip:{arch} names an architecture but no weights (it would be random)",
                          WEIGHTS_HINT)
    if weights == RANDOM:
        model = _create(arch, None, f"{arch} (random weights)", WEIGHTS_HINT)
        return _wrap(model, arch, RANDOM, None, arch)
    path = Path(weights).expanduser()
    if path.is_dir():
        raise DmclipError(f"open_clip:{arch}:{weights} is a directory, not a checkpoint file",
                          f"a model saved in the hub layout loads as open_clip:local-dir:{weights}")
    if path.is_file():
        model = _create(arch, str(path), f"the checkpoint {path} into {arch}",
                        "the file holds another architecture's weights (check <arch>), or is damaged")
        return _wrap(model, arch, str(path.resolve()), None, arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        if os.sep in weights or weights.endswith(CHECKPOINT_SUFFIXES):
            raise DmclipError(f"checkpoint file {weights!r} does not exist", "check the path after open_clip:<arch>:")
        raise DmclipError(f"{weights!r} is neither a file nor a pretrained tag of {arch}",
                          f"{did_you_mean(weights, tags) if tags else f'{arch} has no pretrained tags'}; "
                          "or pass a checkpoint path, or 'random'")
    model = _create(arch, weights, f"the pretrained tag {weights!r} of {arch}",
                    f"pass a local checkpoint, e.g. open_clip:{arch}:/path/open_clip_pytorch_model.bin, or download "
                    "the tag once where the hub is reachable", remote=True)
    return _wrap(model, arch, weights, None, arch)


def load_open_clip(ref: str) -> OpenClipModel:
    """The model named by an ``open_clip:...`` reference (see the module docstring), in eval mode."""
    if not ref.startswith(PREFIX):
        raise DmclipError(f"{ref!r} is not an open_clip reference", "write open_clip:<arch>:<weights>")
    rest = ref[len(PREFIX):]
    schema, _, tail = rest.partition(":")
    if schema in SCHEMAS:
        if not tail:
            raise DmclipError(f"{ref!r} has nothing after {schema}:",
                              "open_clip:local-dir:/path/to/dir or open_clip:hf-hub:org/repo")
        return _load_local_dir(tail) if schema == "local-dir" else _load_hf_hub(tail)
    return _load_arch(schema, tail or None)


# ------------------------------------------------------------------------------------------ rebuilding


def _rebuild(architecture: str, weights: str | None = None, model_cfg: dict | None = None,
             preprocess_cfg: dict | None = None, tokenizer: str | None = None,
             pretrained: str | None = None, towers: str = "both") -> OpenClipModel:
    """``build_model(arch)``: the architecture with random weights (``load_saved_model`` loads the saved ones);
    ``towers="text"``: without its image tower (:meth:`OpenClipModel.drop_image_tower`)."""
    model = _rebuild_both(architecture, weights, model_cfg, preprocess_cfg, tokenizer, pretrained)
    return model.drop_image_tower() if towers == "text" else model


def _rebuild_both(architecture: str, weights: str | None, model_cfg: dict | None, preprocess_cfg: dict | None,
                  tokenizer: str | None, pretrained: str | None) -> OpenClipModel:
    import open_clip

    if not model_cfg:  # a model.json from before the config was recorded: a built-in architecture
        _check_architecture(architecture)
        model = _create(architecture, None, architecture, WEIGHTS_HINT)
        return _wrap(model, architecture, weights or pretrained or RANDOM, None, architecture)
    with _config_dir(model_cfg, preprocess_cfg or {}) as directory:
        try:
            with _quiet():
                model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
        except Exception as exc:
            raise DmclipError(f"open_clip cannot build the saved architecture {architecture}: {_first_line(exc)}",
                              "the model was saved with another open_clip version; use the one it was saved with"
                              ) from None
    return _wrap(model, architecture, weights or RANDOM, model_cfg, tokenizer or architecture)


@families.register("open_clip",
                   description="an open_clip model rebuilt from its recorded config (weights saved beside it)")
def _build_open_clip(**arch) -> OpenClipModel:
    return _rebuild(**arch)
