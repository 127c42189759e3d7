"""Knowledge distillation losses for sparse recovery: a pruned student learns from its dense teacher.

Pure loss functions on tensors, and :class:`DistillLoss`, which runs the frozen
teacher and combines the terms:

* :func:`kl_loss` — token-level KL on logits at a temperature ``T`` (Hinton et al. 2015):
  ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over tokens (every position of
  every sequence, or those a mask keeps). The ``T²`` keeps gradients of the same size
  whatever the temperature.
* :func:`hidden_mse` — mean squared error between hidden states.
* :func:`cosine_loss` / :func:`embedding_mse` — sentence embeddings (``1 - cos`` and MSE),
  with :func:`mean_pool` the sentence-transformers pooling over the attention mask.

Outputs are read duck-typed, so nothing here imports ``transformers``: a tensor is the
logits (or the embedding); an object or mapping with ``logits``, ``hidden_states``,
``last_hidden_state`` or ``loss`` is a transformers model output.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import in_mode
from .._validate import check_real

__all__ = ["DistillLoss", "call_model", "cosine_loss", "embedding_mse", "hidden_mse", "kl_loss", "mean_pool"]

Embed = Callable[[Any, Any], torch.Tensor]
_TERMS = ("kl", "hidden", "cosine", "mse", "task")


def _token_mask(owner: str, mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``mask`` as float weights of the token dimensions ``shape`` (``None``: every token)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{owner}: mask must be a tensor of the token dimensions {tuple(shape)}, got "
                         f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    return mask.to(torch.float32)


def _token_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    # A batch without any kept token contributes 0 rather than NaN.
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per token, averaged over tokens.

    Args:
        student_logits: ``(..., vocab)``; every leading position is a token.
        teacher_logits: the same shape.
        temperature: ``T > 0``; both distributions are softened by it.
        mask: ``(...)`` (the leading dimensions), nonzero where a token counts (an
            attention mask, or ``labels != -100``); ``None``: every token.

    Returns:
        A scalar in float32 (or float64 for float64 logits); 0 when every token is masked out.

    Raises:
        ValueError: shapes that differ, a mask of another shape, a temperature <= 0.

    Example:
        >>> s, t = torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)
        >>> float(kl_loss(s, t, temperature=2.0))
        0.0
    """
    owner = "kl_loss"
    temperature = _check_positive(owner, "temperature", temperature)
    _check_same(owner, student_logits, teacher_logits, "logits")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16/fp16 logits: softmax in float32
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return temperature ** 2 * _token_mean(per_token, _token_mask(owner, mask, per_token.shape))


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between hidden states ``(..., features)``, over the tokens ``mask`` keeps and every feature.

    Example:
        >>> float(hidden_mse(torch.ones(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.tensor([[1, 1, 0], [1, 0, 0]])))
        1.0
    """
    owner = "hidden_mse"
    _check_same(owner, student, teacher, "hidden states")
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return _token_mean(per_token, _token_mask(owner, mask, per_token.shape))


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` of embeddings ``(..., dim)``, averaged: 0 when they point the same way.

    Example:
        >>> round(float(cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))), 6)
        1.0
    """
    _check_same("cosine_loss", student, teacher, "embeddings")
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)).mean()


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between embeddings ``(..., dim)``, over every entry.

    Example:
        >>> float(embedding_mse(torch.ones(2, 4), torch.zeros(2, 4)))
        1.0
    """
    _check_same("embedding_mse", student, teacher, "embeddings")
    return (student.float() - teacher.float()).pow(2).mean()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embeddings ``(batch, dim)``: the mean of ``hidden`` ``(batch, tokens, dim)`` over unmasked tokens.

    The pooling of sentence-transformers models (all-MiniLM-L6-v2): padding is left out.

    Example:
        >>> h = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    if hidden.dim() != 3:
        raise ValueError(f"mean_pool: hidden states must be (batch, tokens, dim), got shape {tuple(hidden.shape)}")
    if attention_mask is None:
        return hidden.mean(1)
    weights = _token_mask("mean_pool", attention_mask, hidden.shape[:2]).to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _check_positive(owner: str, name: str, value: Any) -> float:
    value = check_real(owner, name, value)
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")
    return value


def _check_same(owner: str, student: Any, teacher: Any, what: str) -> None:
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: the {name}'s {what} must be a tensor, got {type(value).__name__}")
    if student.shape != teacher.shape:
        raise ValueError(f"{owner}: the student's {what} have shape {tuple(student.shape)}, the teacher's "
                         f"{tuple(teacher.shape)}; they must agree (same vocabulary / hidden size)")


# -- reading model outputs --------------------------------------------------------------------------------------


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _logits(output: Any, who: str) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else _field(output, "logits")
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"DistillLoss: the {who}'s output has no logits (a tensor, or an output with .logits) "
                         f"for the kl term; got {type(output).__name__}")
    return logits


def _hidden_states(output: Any, who: str) -> tuple[torch.Tensor, ...]:
    states = _field(output, "hidden_states")
    if not isinstance(states, (tuple, list)) or not states:
        raise ValueError(f"DistillLoss: the {who}'s output has no hidden_states for the hidden term (a transformers "
                         "model called with output_hidden_states=True, which DistillLoss asks for on dict inputs)")
    return tuple(states)


def _default_embed(output: Any, inputs: Any, mask_key: str | None) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output
    hidden = _field(output, "last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        mask = inputs.get(mask_key) if isinstance(inputs, Mapping) and mask_key else None
        return mean_pool(hidden, mask)
    raise ValueError(f"DistillLoss: cannot find sentence embeddings in a {type(output).__name__} output for the "
                     "cosine/mse terms (a (batch, dim) tensor or .last_hidden_state); pass embed=(output, inputs) -> "
                     "embeddings")


def call_model(model: nn.Module, inputs: Any, **extra: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``.

    ``extra`` keyword arguments go to a mapping's call only (a plain module takes none).

    Example:
        >>> call_model(nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# -- the combined loss ------------------------------------------------------------------------------------------


class DistillLoss:
    """The loss of a student distilled from a frozen teacher: weighted terms, the teacher run under ``no_grad``.

    Called as ``loss(student, inputs)`` (or ``loss(student, inputs, targets)``, the
    signature of :attr:`prunekit.training.loop.LoopOptions.batch_loss`), it runs both
    models on ``inputs`` (``model(**inputs)`` for a dict such as a tokenizer's output,
    ``model(inputs)`` for a tensor), the teacher in eval mode without gradients, and
    returns the weighted sum of the terms whose weight is not zero:

    * ``kl``: :func:`kl_loss` on the logits at ``temperature`` (decoder LMs, classifiers);
    * ``hidden``: :func:`hidden_mse` averaged over every hidden state the models return
      (``output_hidden_states=True`` is passed on dict inputs; same architecture);
    * ``cosine`` / ``mse``: :func:`cosine_loss` / :func:`embedding_mse` on sentence embeddings
      (``embed(output, inputs)``; default: a ``(batch, dim)`` output as it is, else
      :func:`mean_pool` of ``last_hidden_state`` over the attention mask);
    * ``task``: the student's own loss (``output.loss``, e.g. a causal LM given ``labels``).

    Tokens count where ``inputs[mask_key]`` is nonzero (padding is left out of ``kl`` and
    ``hidden``). The unweighted terms of the last call are in :attr:`last` (detached).

    Args:
        teacher: the dense model (not modified; its train/eval flags are restored after each call).
        kl, hidden, cosine, mse, task: non-negative weights; at least one positive.
        temperature: softening of the ``kl`` term (> 0).
        embed: ``(output, inputs) -> (batch, dim)`` sentence embeddings (``None``: see above).
        mask_key: key of the token mask in dict inputs (``None``: every token counts).

    Raises:
        TypeError / ValueError: a teacher that is no module, a negative weight, all weights zero, ``temperature <= 0``.

    Example:
        >>> teacher = nn.Linear(4, 3)
        >>> student = nn.Linear(4, 3)
        >>> loss = DistillLoss(teacher, kl=1.0, temperature=2.0)
        >>> value = loss(student, torch.randn(8, 4))
        >>> value.requires_grad, sorted(loss.last)
        (True, ['kl'])
    """

    def __init__(self, teacher: nn.Module, *, kl: float = 1.0, temperature: float = 1.0, hidden: float = 0.0,
                 cosine: float = 0.0, mse: float = 0.0, task: float = 0.0, embed: Embed | None = None,
                 mask_key: str | None = "attention_mask") -> None:
        owner = "DistillLoss"
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"{owner}: teacher must be an nn.Module, got {type(teacher).__name__}")
        given = {"kl": kl, "hidden": hidden, "cosine": cosine, "mse": mse, "task": task}
        weights = {name: check_real(owner, name, value) for name, value in given.items()}
        negative = [name for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(f"{owner}: weights must be >= 0, got {', '.join(f'{n}={weights[n]}' for n in negative)}")
        if not any(weights.values()):
            raise ValueError(f"{owner}: every weight is 0; give kl, hidden, cosine, mse or task a positive weight")
        if embed is not None and not callable(embed):
            raise TypeError(f"{owner}: embed must be callable (output, inputs) -> embeddings, got {type(embed).__name__}")
        if mask_key is not None and not isinstance(mask_key, str):
            raise TypeError(f"{owner}: mask_key must be a str or None, got {type(mask_key).__name__}")
        self.teacher = teacher
        self.temperature = _check_positive(owner, "temperature", temperature)
        self.weights = {name: value for name, value in weights.items() if value > 0}
        self.embed, self.mask_key = embed, mask_key
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, student: nn.Module, inputs: Any, targets: Any = None) -> torch.Tensor:
        """The weighted loss of ``student`` on ``inputs`` (``targets`` is ignored: the teacher gives them)."""
        return self.from_outputs(self.student_outputs(student, inputs), inputs)

    def _extra(self, inputs: Any) -> dict[str, Any]:
        return {"output_hidden_states": True} if "hidden" in self.weights and isinstance(inputs, Mapping) else {}

    def student_outputs(self, student: nn.Module, inputs: Any) -> Any:
        """The student's forward on ``inputs`` with what the terms need (hidden states), gradients on."""
        if student is self.teacher:
            raise ValueError("DistillLoss: the student is the teacher; distil into a copy (copy.deepcopy(teacher) "
                             "before pruning)")
        return call_model(student, inputs, **self._extra(inputs))

    @torch.no_grad()
    def teacher_outputs(self, inputs: Any) -> Any:
        """The teacher's forward on ``inputs`` (``labels`` left out: its loss is not needed), eval mode, no gradients."""
        extra = self._extra(inputs)
        if isinstance(inputs, Mapping) and "labels" in inputs:
            inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with in_mode(self.teacher, training=False):
            return call_model(self.teacher, inputs, **extra)

    def from_outputs(self, student_output: Any, inputs: Any) -> torch.Tensor:
        """The weighted loss given the student's output (the teacher is run here), e.g. in ``Trainer.compute_loss``."""
        terms = self.terms(student_output, self.teacher_outputs(inputs), inputs)
        self.last = {name: value.detach() for name, value in terms.items()}
        return _total([self.weights[name] * value for name, value in terms.items()])

    def terms(self, student_output: Any, teacher_output: Any, inputs: Any) -> dict[str, torch.Tensor]:
        """The unweighted terms that have a weight, from both models' outputs."""
        mask = inputs.get(self.mask_key) if isinstance(inputs, Mapping) and self.mask_key else None
        terms: dict[str, torch.Tensor] = {}
        if "kl" in self.weights:
            s, t = _logits(student_output, "student"), _logits(teacher_output, "teacher")
            terms["kl"] = kl_loss(s, t, temperature=self.temperature, mask=_fits(mask, s))
        if "hidden" in self.weights:
            pairs = list(zip(_hidden_states(student_output, "student"), _hidden_states(teacher_output, "teacher")))
            terms["hidden"] = _total([hidden_mse(s, t, mask=_fits(mask, s)) for s, t in pairs]) / len(pairs)
        if "cosine" in self.weights or "mse" in self.weights:
            s, t = self._embeddings(student_output, inputs), self._embeddings(teacher_output, inputs)
            if "cosine" in self.weights:
                terms["cosine"] = cosine_loss(s, t)
            if "mse" in self.weights:
                terms["mse"] = embedding_mse(s, t)
        if "task" in self.weights:
            own = _field(student_output, "loss")
            if not isinstance(own, torch.Tensor):
                raise ValueError("DistillLoss: task > 0 needs the student's own loss (output.loss): a transformers "
                                 "model given labels in its inputs")
            terms["task"] = own
        return terms

    def _embeddings(self, output: Any, inputs: Any) -> torch.Tensor:
        if self.embed is not None:
            return self.embed(output, inputs)
        return _default_embed(output, inputs, self.mask_key)

    def __repr__(self) -> str:
        weights = ", ".join(f"{name}={value:g}" for name, value in self.weights.items())
        return f"DistillLoss({weights}, temperature={self.temperature:g})"


def _fits(mask: Any, values: torch.Tensor) -> torch.Tensor | None:
    """The inputs' token mask for per-token ``values`` ``(..., features)``; ``None`` where they have no token axis.

    A classifier's ``(batch, classes)`` logits have none; a mask of the right rank but
    another shape reaches the loss, which names the mismatch.
    """
    return mask if isinstance(mask, torch.Tensor) and mask.dim() + 1 == values.dim() else None


def _total(values: list[torch.Tensor]) -> torch.Tensor:
    return sum(values[1:], values[0])
