"""prunekit.methods.recover: sparse fine-tuning with distillation keeps masks, resumes bit for bit, and recovers."""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import assert_bit_identical
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from prunekit import Magnitude, MaskKeeper, PolynomialDecay, Pruner
from prunekit.methods.distill import DistillLoss, cosine_loss, kl_loss, mean_pool
from prunekit.methods.recover import recover, warmup_cosine, zero_masks
from prunekit.training.loop import LoopOptions, run_loop

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}
# Optimizer state that moves a weight by itself (second moments only scale a zero first moment).
_MOVING_STATE = ("momentum_buffer", "exp_avg")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _random_masks(model: nn.Module, seed: int, keep: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=gen) < keep for name, p in model.named_parameters()
            if name.endswith("weight")}


def _check_pruned(model: nn.Module, optimizer: torch.optim.Optimizer, keeps: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, keep in keeps.items():
        param = params[name]
        assert torch.equal(param.detach()[~keep], torch.zeros(int((~keep).sum()))), f"{name} revived"
        for key in _MOVING_STATE:
            value = optimizer.state.get(param, {}).get(key)
            if value is not None:
                assert not value[~keep].any(), f"{name}: {key} of pruned entries is not zero"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fixed_masks_are_never_revived_by_any_optimizer(name, single_thread):
    teacher, student = _mlp(0), _mlp(1)
    keeps = _random_masks(student, seed=2)
    opt = OPTIMIZERS[name](student.parameters())
    seen = []

    def check(model, pos):
        _check_pruned(model, opt, keeps)
        seen.append(pos.step)

    result = recover(student, DistillLoss(teacher, temperature=2.0), torch.randn(96, 8), optimizer=opt, steps=12,
                     masks=keeps, batch_size=16, lr_schedule=warmup_cosine(12, warmup=3), max_grad_norm=0.5,
                     callbacks=[check], progress=False)
    assert seen == list(range(1, 13)) and result.steps == 12 and len(result.losses) == 12
    assert result.sparsity == pytest.approx(sum(int((~k).sum()) for k in keeps.values())
                                            / sum(k.numel() for k in keeps.values()))
    _check_pruned(student, opt, keeps)
    assert not any(p.grad is not None and p.grad.abs().sum() == 0 for p in student.parameters())  # it trained
    Pruner(student, 0.5)  # the keeper was released: the model is plain again


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_scheduled_pruner_keeps_pruning_during_the_fine_tune(name, single_thread):
    teacher, student = _mlp(0), _mlp(1)
    pruner = Pruner(student, PolynomialDecay(0.3, 0.8, 0, 9, frequency=3), criterion=Magnitude())
    opt = OPTIMIZERS[name](student.parameters())
    sparsities = []

    def check(model, pos):
        _check_pruned(model, opt, pruner.masks)
        sparsities.append(round(pruner.report().sparsity, 3))

    result = recover(student, teacher, torch.randn(96, 8), optimizer=opt, steps=12, pruner=pruner, batch_size=16,
                     callbacks=[check], progress=False)
    assert sparsities[0] < sparsities[5] < sparsities[-1] == pytest.approx(0.8, abs=0.01)
    assert result.sparsity == pytest.approx(0.8, abs=0.01) and pruner.current_step == 12
    assert pruner.optimizers == ()  # attached for the call only


def test_without_masks_the_same_fine_tune_revives_pruned_weights(single_thread):
    # The negative control: the loop and loss of recover, with no keeper, move the pruned weights.
    teacher, student = _mlp(0), _mlp(1)
    keeps = _random_masks(student, seed=2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name in keeps:
                p.mul_(keeps[name])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    run_loop(student, opt, torch.randn(96, 8), torch.arange(96),
             LoopOptions(batch_size=16, max_steps=3, batch_loss=DistillLoss(teacher)))
    params = dict(student.named_parameters())
    revived = sum(int((params[name].detach()[~keep] != 0).sum()) for name, keep in keeps.items())
    assert revived > 0.5 * sum(int((~keep).sum()) for keep in keeps.values())  # (dead ReLU units get no gradient)


def _llama(seed: int, sharp: float = 1.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharp)  # peaked next-token distributions, as a trained LM has
    return model


def _tokens(seed: int, n: int, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    return {"input_ids": torch.randint(0, 100, (n, length), generator=gen),
            "attention_mask": (torch.arange(length) < lengths[:, None]).long()}


@pytest.mark.parametrize("engine", ["masks", "pruner"])
@pytest.mark.parametrize("cut", [4, 6])
def test_a_resumed_recovery_is_bit_identical_to_an_uninterrupted_one(tmp_path, engine, cut, single_thread):
    teacher, data, steps = _llama(0, sharp=20.0), _tokens(1, 24), 9

    def run(path, upto, seed):
        student = _llama(seed)  # a resumed run starts from other weights: the checkpoint must restore them
        if engine == "masks":
            kwargs = {"masks": _random_masks(student, seed=5, keep=0.5)}
        else:
            kwargs = {"pruner": Pruner(student, PolynomialDecay(0.2, 0.7, 0, 6, frequency=2))}
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        torch.manual_seed(seed)  # the RNG is restored from the checkpoint too
        result = recover(student, DistillLoss(teacher, temperature=2.0, hidden=0.1), data, optimizer=opt,
                         steps=upto, batch_size=4, seed=3, lr_schedule=warmup_cosine(steps, warmup=2),
                         max_grad_norm=1.0, checkpoint=path, checkpoint_every=3, progress=False, **kwargs)
        masks = kwargs["pruner"].masks if engine == "pruner" else None
        state = {i: dict(sorted(entry.items())) for i, entry in sorted(opt.state_dict()["state"].items())}
        return result, student.state_dict(), state, masks  # (a loaded optimizer state lists its keys in another order)

    whole, weights, opt_state, masks = run(tmp_path / "whole.safetensors", steps, seed=1)
    path = tmp_path / "cut.safetensors"
    first, *_ = run(path, cut, seed=1)
    assert first.steps == cut and first.resumed_from is None
    resumed, weights2, opt_state2, masks2 = run(path, steps, seed=7)
    assert resumed.resumed_from == cut and resumed.steps == steps
    assert first.losses + resumed.losses == whole.losses
    assert_bit_identical(weights2, weights, "weights")
    assert_bit_identical(opt_state2, opt_state, "optimizer")
    if masks is not None:
        assert_bit_identical(masks2, masks, "masks")
    again, weights3, *_ = run(path, steps, seed=9)  # a finished run resumes at its end and does nothing
    assert again.resumed_from == steps and again.losses == []
    assert_bit_identical(weights3, weights, "weights")


def _mean_kl(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(kl_loss(student.eval()(**data).logits, teacher.eval()(**data).logits,
                             mask=data["attention_mask"]))


def test_distillation_recovers_a_pruned_language_model(single_thread):
    teacher = _llama(0, sharp=20.0)
    student = copy.deepcopy(teacher)
    Pruner(student, 0.6, layers=["model.layers.*"]).remove()  # one-shot magnitude, then plain zeros
    keeps = zero_masks(student)
    held_out = _tokens(99, 32)
    before = _mean_kl(student, teacher, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    result = recover(student, DistillLoss(teacher), _tokens(1, 256), optimizer=opt, steps=60, batch_size=16,
                     masks=keeps, progress=False)
    after = _mean_kl(student, teacher, held_out)
    assert after < 0.5 * before, (before, after)
    assert sum(result.losses[-10:]) < sum(result.losses[:10])
    assert all(torch.equal(zero_masks(student)[n] | ~k, torch.ones_like(k)) for n, k in keeps.items())  # zeros kept
    assert result.sparsity > 0.3


def test_gradual_pruning_while_distilling_a_sentence_encoder_beats_one_shot(single_thread):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    teacher = BertModel(cfg)
    with torch.no_grad():  # at init the residual stream hides the layers (80% one-shot costs 1e-4): make them count
        for name, p in teacher.encoder.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    held_out = _tokens(99, 32)
    held_out["input_ids"] %= 60

    def cosine_to_teacher(model):
        with torch.no_grad():
            s = mean_pool(model.eval()(**held_out).last_hidden_state, held_out["attention_mask"])
            t = mean_pool(teacher.eval()(**held_out).last_hidden_state, held_out["attention_mask"])
        return float(cosine_loss(s, t))

    one_shot = copy.deepcopy(teacher)
    Pruner(one_shot, 0.8, layers=["encoder.*"]).remove()
    student = copy.deepcopy(teacher)
    pruner = Pruner(student, PolynomialDecay(0.2, 0.8, 0, 40, frequency=5), layers=["encoder.*"])
    data = _tokens(1, 256)
    data["input_ids"] %= 60
    result = recover(student, DistillLoss(teacher, kl=0.0, cosine=1.0), data, optimizer=torch.optim.AdamW(
        student.parameters(), lr=3e-3), steps=60, batch_size=16, pruner=pruner, progress=False)
    assert result.sparsity == pytest.approx(0.8, abs=0.01)
    assert cosine_to_teacher(student) < 0.25 * cosine_to_teacher(one_shot)  # measured 0.018 vs 0.244


def test_misuse_is_refused_with_a_clear_message():
    teacher, student = _mlp(0), _mlp(1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(8, 8)
    with pytest.raises(ValueError, match="give masks= .* or pruner="):
        recover(student, teacher, x, optimizer=opt, steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        recover(student, teacher, x, optimizer=opt, steps=1, masks={}, pruner=Pruner.manual(student))
    with pytest.raises(ValueError, match="the teacher is the student"):
        recover(teacher, teacher, x, optimizer=torch.optim.SGD(teacher.parameters(), lr=0.1), steps=1, masks={})
    shared = nn.Sequential(student[0], nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(ValueError, match="shares parameters with the student .*0.weight"):
        recover(student, shared, x, optimizer=opt, steps=1, masks={})
    with pytest.raises(TypeError, match="teacher must be an nn.Module or a DistillLoss"):
        recover(student, "teacher", x, optimizer=opt, steps=1, masks={})
    with pytest.raises(ValueError, match="data holds no sample"):
        recover(_mlp(2), teacher, torch.zeros(0, 8), optimizer=opt, steps=1, masks={})
    with pytest.raises(ValueError, match="one first dimension"):
        recover(_mlp(2), teacher, {"a": torch.zeros(3, 8), "b": torch.zeros(4, 8)}, optimizer=opt, steps=1, masks={})


def test_an_attached_pruner_stays_attached_and_a_keeper_can_be_the_engine(single_thread):
    teacher, student = _mlp(0), _mlp(1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    keeper = MaskKeeper(student, ["0.weight"], optimizer=opt)
    keeper.set_masks({"0.weight": _random_masks(student, 3)["0.weight"]})
    recover(student, teacher, torch.randn(32, 8), optimizer=opt, steps=4, pruner=keeper, progress=False)
    assert keeper.optimizers == (opt,) and not keeper.removed
    _check_pruned(student, opt, keeper.masks)


def test_structured_pruning_goes_on_during_the_fine_tune(single_thread):
    from prunekit import StructuredPruner

    teacher, student = _mlp(0), _mlp(1)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    pruner = StructuredPruner(student, torch.randn(1, 8), PolynomialDecay(0.0, 0.5, 0, 8, frequency=2))
    recover(student, teacher, torch.randn(64, 8), optimizer=opt, steps=10, pruner=pruner, batch_size=16,
            callbacks=[lambda model, pos: _check_pruned(model, opt, pruner.masks)], progress=False)
    assert pruner.masks and pruner.current_step == 10 and pruner.keeper.optimizers == ()
    rows = (~pruner.masks["0.weight"]).all(dim=1)  # whole output channels of the first layer are gone
    assert 0 < int(rows.sum()) < 32
