"""prunekit.methods.distill: the loss terms against independent float64 computations, and DistillLoss on real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from prunekit.methods.distill import (DistillLoss, call_model, cosine_loss, embedding_mse, hidden_mse, kl_loss,
                                      mean_pool)

SEEDS = [0, 1, 2]


def _kl_reference(student: np.ndarray, teacher: np.ndarray, temperature: float, mask: np.ndarray | None) -> float:
    """T² · KL(p_teacher ‖ q_student) per token by the definition, in float64, averaged over the kept tokens."""
    s = student.reshape(-1, student.shape[-1]).astype(np.float64) / temperature
    t = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64) / temperature
    keep = np.ones(len(s)) if mask is None else mask.reshape(-1).astype(np.float64)
    total = 0.0
    for row in range(len(s)):
        p = np.exp(t[row] - t[row].max())
        p /= p.sum()
        q = np.exp(s[row] - s[row].max())
        q /= q.sum()
        total += keep[row] * float(np.sum(p * (np.log(p) - np.log(q))))
    return temperature ** 2 * total / keep.sum()


def _logits(seed: int, shape=(3, 5, 11)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student, teacher = 3 * torch.randn(shape, generator=gen), 3 * torch.randn(shape, generator=gen)
    mask = torch.rand(shape[:-1], generator=gen) < 0.6
    mask[0, 0] = True  # at least one kept token
    return student, teacher, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_equals_the_float64_definition(seed, temperature, masked):
    student, teacher, mask = _logits(seed)
    mask = mask if masked else None
    expected = _kl_reference(student.numpy(), teacher.numpy(), temperature, None if mask is None else mask.numpy())
    got = kl_loss(student, teacher, temperature=temperature, mask=mask)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    exact = kl_loss(student.double(), teacher.double(), temperature=temperature, mask=mask)
    assert float(exact) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_gradient_is_t_times_q_minus_p_over_the_kept_tokens(seed):
    # d/ds [T² · KL(p ‖ softmax(s/T))] = T · (q - p) per token: the published reason for the T² factor.
    student, teacher, mask = _logits(seed)
    temperature = 2.0
    s = student.double().requires_grad_()
    kl_loss(s, teacher.double(), temperature=temperature, mask=mask).backward()
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    expected = temperature * (q - p) * mask.double().unsqueeze(-1) / mask.sum()
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def test_kl_is_zero_only_for_equal_distributions_and_ignores_masked_tokens():
    student, teacher, mask = _logits(0)
    assert float(kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(teacher + 5.0, teacher)) == pytest.approx(0.0, abs=1e-5)  # softmax is shift-invariant
    assert float(kl_loss(student, teacher)) > 0.1
    changed = student.clone()
    changed[~mask] = 100 * torch.randn_like(changed[~mask])  # garbage where the mask drops the token
    assert torch.equal(kl_loss(changed, teacher, mask=mask), kl_loss(student, teacher, mask=mask))
    assert float(kl_loss(student, teacher, mask=torch.zeros(mask.shape))) == 0.0
    half = kl_loss(student.half(), teacher.half())
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(kl_loss(student.half().float(),
                                                                                      teacher.half().float())))


@pytest.mark.parametrize("seed", SEEDS)
def test_hidden_mse_cosine_and_embedding_mse_equal_float64_references(seed):
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    mask[0, 0] = True
    sd, td, md = s.double().numpy(), t.double().numpy(), mask.numpy()
    expected_hidden = ((sd - td) ** 2)[md].mean()  # every feature of every kept token
    assert float(hidden_mse(s, t, mask=mask)) == pytest.approx(expected_hidden, rel=1e-5)
    assert float(hidden_mse(s, t)) == pytest.approx(((sd - td) ** 2).mean(), rel=1e-5)
    a, b = sd[:, 0], td[:, 0]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert float(cosine_loss(s[:, 0], t[:, 0])) == pytest.approx(float(np.mean(1 - cos)), rel=1e-5)
    assert float(cosine_loss(s[:, 0], 3.0 * s[:, 0])) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(embedding_mse(s[:, 0], t[:, 0])) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_pool_averages_the_unmasked_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 4, generator=gen)
    lengths = [5, 2, 1]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    expected = torch.stack([hidden[i, :n].double().mean(0) for i, n in enumerate(lengths)])
    torch.testing.assert_close(mean_pool(hidden, mask).double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean_pool(hidden), hidden.mean(1))


def test_mismatched_shapes_and_bad_arguments_are_named():
    s, t, mask = _logits(0)
    with pytest.raises(ValueError, match="kl_loss: the student's logits have shape"):
        kl_loss(s[..., :5], t)
    with pytest.raises(ValueError, match="kl_loss: mask must be a tensor of the token dimensions"):
        kl_loss(s, t, mask=mask[:, :2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        DistillLoss(nn.Linear(2, 2), kl=-1.0)
    with pytest.raises(ValueError, match="every weight is 0"):
        DistillLoss(nn.Linear(2, 2), kl=0.0)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        DistillLoss("teacher")  # type: ignore[arg-type]
    teacher = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="the student is the teacher"):
        DistillLoss(teacher)(teacher, torch.randn(2, 4))
    with pytest.raises(ValueError, match="task > 0 needs the student's own loss"):
        DistillLoss(teacher, kl=0.0, task=1.0)(nn.Linear(4, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="no hidden_states"):
        DistillLoss(teacher, kl=0.0, hidden=1.0)(nn.Linear(4, 3), torch.randn(2, 4))


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_loss_on_a_causal_lm_combines_masked_kl_hidden_and_task_terms(seed):
    teacher, student = _llama(seed), _llama(seed + 10)
    teacher.train()  # DistillLoss runs it in eval mode and gives the flag back
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    attention = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": ids}
    loss = DistillLoss(teacher, kl=1.0, temperature=2.0, hidden=0.5, task=0.25)
    value = loss(student, inputs)
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    value.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    with torch.no_grad():  # independently: both models' outputs, the float64 KL and the terms by hand
        teacher.eval()
        t_out = teacher(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        s_out = student(**inputs, output_hidden_states=True)
    kl = _kl_reference(s_out.logits.numpy(), t_out.logits.numpy(), 2.0, attention.numpy())
    hidden = np.mean([((s.double() - t.double()) ** 2)[attention.bool()].mean().item()
                      for s, t in zip(s_out.hidden_states, t_out.hidden_states)])
    assert len(s_out.hidden_states) == 3  # the embeddings and each of the 2 layers
    assert float(loss.last["kl"]) == pytest.approx(kl, rel=1e-4)  # a small KL: float32 rounding of log-probs
    assert float(loss.last["hidden"]) == pytest.approx(hidden, rel=1e-5)
    assert float(loss.last["task"]) == pytest.approx(float(s_out.loss), rel=1e-6)
    assert float(value.detach()) == pytest.approx(kl + 0.5 * hidden + 0.25 * float(s_out.loss), rel=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_loss_on_a_sentence_encoder_uses_mean_pooled_embeddings(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    teacher, student = BertModel(cfg), BertModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, 50, (3, 7), generator=gen),
              "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])}
    loss = DistillLoss(teacher, kl=0.0, cosine=1.0, mse=2.0)
    student.eval()  # no dropout: the reference below sees the same student output
    value = loss(student, inputs)
    with torch.no_grad():
        s = mean_pool(student(**inputs).last_hidden_state, inputs["attention_mask"]).double()
        t = mean_pool(teacher.eval()(**inputs).last_hidden_state, inputs["attention_mask"]).double()
    cos = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    assert float(loss.last["cosine"]) == pytest.approx(float(cos), rel=1e-5)
    assert float(loss.last["mse"]) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-5)
    assert float(value.detach()) == pytest.approx(float(cos) + 2 * float(((s - t) ** 2).mean()), rel=1e-5)
    custom = DistillLoss(teacher, kl=0.0, cosine=1.0, embed=lambda out, batch: out.last_hidden_state[:, 0])
    custom(student, inputs)  # the [CLS] token instead of the mean
    assert not math.isclose(float(custom.last["cosine"]), float(cos), rel_tol=1e-3)


def test_a_classifier_is_distilled_on_its_logits_and_models_are_called_by_input_kind():
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(6, 4)
    plain = DistillLoss(teacher, temperature=3.0)(student, x)
    with torch.no_grad():
        expected = _kl_reference(student(x).numpy(), teacher(x).numpy(), 3.0, None)
    assert float(plain.detach()) == pytest.approx(expected, rel=1e-5)
    assert call_model(nn.Bilinear(2, 2, 1), (torch.ones(1, 2), torch.ones(1, 2))).shape == (1, 1)
