"""prunekit.apps.hf_trainer: pruning masks and distillation in a transformers.Trainer, through steps, saves and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from core_helpers import assert_bit_identical
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from prunekit import PolynomialDecay, Pruner
from prunekit.apps.hf_trainer import MASKS_FILE, DistillTrainer, PruneDistillCallback
from prunekit.methods.distill import DistillLoss, kl_loss

STEPS, SAVE = 8, 4
_MOVING_STATE = ("momentum_buffer", "exp_avg")


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences with padding, as a tokenizer and a causal-LM collator give them."""

    def __init__(self, n: int = 32, length: int = 12, seed: int = 1, pad: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen) if pad else torch.full((n,), length)
        self.mask = (torch.arange(length) < lengths[:, None]).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def _args(out: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
                   save_steps=SAVE, report_to="none", use_cpu=True, seed=3, learning_rate=5e-3, logging_steps=1000,
                   disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="cosine", warmup_steps=2)
    return TrainingArguments(**{**options, **overrides})


class _CheckMasks(TrainerCallback):
    """After every optimizer step: pruned weights are exact zeros and move no optimizer state."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner, self.steps = pruner, 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        params, inner = dict(model.named_parameters()), getattr(optimizer, "optimizer", optimizer)
        for name, keep in self.pruner.masks.items():
            assert not params[name].detach()[~keep].any(), f"{name} revived at step {state.global_step}"
            for key in _MOVING_STATE:
                value = inner.state.get(params[name], {}).get(key)
                assert value is None or not value[~keep].any(), f"{name}: {key} of pruned entries"
        self.steps += 1


def _scheduled(model) -> Pruner:
    return Pruner(model, PolynomialDecay(0.2, 0.6, 0, 6, frequency=2), layers=["model.layers.*"])


def _distill_trainer(out: Path, student, pruner, teacher, **overrides) -> DistillTrainer:
    return DistillTrainer(model=student, args=_args(out, **overrides), train_dataset=_Tokens(),
                          distill=DistillLoss(teacher, kl=1.0, temperature=2.0), pruner=pruner)


def _fresh_student(seed: int):
    student = _llama(seed)  # other weights and other step-0 masks than the run it resumes: all must be restored
    return student, _scheduled(student)


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_distill_trainer_resumes_exactly_with_masks_and_schedule(tmp_path, optim, single_thread):
    teacher = _llama(0)
    student, pruner = _fresh_student(1)
    check = _CheckMasks(pruner)
    trainer = _distill_trainer(tmp_path / "whole", student, pruner, teacher, optim=optim)
    trainer.add_callback(check)
    trainer.train()
    assert check.steps == STEPS and pruner.current_step == STEPS and pruner.optimizers == ()
    assert (tmp_path / "whole" / f"checkpoint-{SAVE}" / MASKS_FILE).is_file()
    weights, masks = {k: v.clone() for k, v in student.state_dict().items()}, pruner.masks
    assert pruner.report().sparsity == pytest.approx(0.6, abs=0.01)

    # The interrupted run: only the step-4 checkpoint is left in its output folder; resume from the last one.
    shutil.copytree(tmp_path / "whole" / f"checkpoint-{SAVE}", tmp_path / "cut" / f"checkpoint-{SAVE}")
    student2, pruner2 = _fresh_student(7)
    check2 = _CheckMasks(pruner2)
    trainer2 = _distill_trainer(tmp_path / "cut", student2, pruner2, teacher, optim=optim)
    trainer2.add_callback(check2)
    trainer2.train(resume_from_checkpoint=True)
    assert check2.steps == STEPS - SAVE and pruner2.current_step == STEPS
    assert_bit_identical(student2.state_dict(), weights, "weights")
    assert_bit_identical(pruner2.masks, masks, "masks")


def test_a_plain_trainer_with_the_callback_resumes_from_a_folder_elsewhere(tmp_path, single_thread):
    def trainer_for(out, student, pruner, **callback):
        return Trainer(model=student, args=_args(out), train_dataset=_Tokens(),
                       callbacks=[PruneDistillCallback(pruner, **callback), _CheckMasks(pruner)])

    student, pruner = _fresh_student(1)
    trainer_for(tmp_path / "whole", student, pruner).train()  # the model's own loss: pruning alone
    weights, masks = {k: v.clone() for k, v in student.state_dict().items()}, pruner.masks
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE}"

    student2, pruner2 = _fresh_student(7)
    with pytest.raises(ValueError, match=f"resumes at step {SAVE} but no {MASKS_FILE}.*resume_from="):
        trainer_for(tmp_path / "other", student2, pruner2).train(resume_from_checkpoint=str(checkpoint))
    pruner2.remove()
    student2, pruner2 = _fresh_student(7)
    trainer_for(tmp_path / "other", student2, pruner2, resume_from=checkpoint).train(
        resume_from_checkpoint=str(checkpoint))
    assert_bit_identical(student2.state_dict(), weights, "weights")
    assert_bit_identical(pruner2.masks, masks, "masks")


def test_without_the_callback_the_trainer_revives_pruned_weights(tmp_path, single_thread):
    # The negative control: the same Trainer run on the same pruned model, with no callback.
    student = _llama(1)
    _scheduled(student).remove()  # zeros in place, no hooks left
    keeps = {name: p.detach() != 0 for name, p in student.named_parameters() if name.startswith("model.layers")
             and p.dim() == 2}
    Trainer(model=student, args=_args(tmp_path, save_strategy="no"), train_dataset=_Tokens()).train()
    params = dict(student.named_parameters())
    revived = sum(int((params[n].detach()[~k] != 0).sum()) for n, k in keeps.items())
    assert revived > 0.9 * sum(int((~k).sum()) for k in keeps.values())


def test_a_mask_file_of_another_step_is_refused(tmp_path):
    student, pruner = _fresh_student(1)
    callback = PruneDistillCallback(pruner)
    callback.save(tmp_path / MASKS_FILE, global_step=3)
    with pytest.raises(ValueError, match="holds the masks of step 3, but the Trainer resumes at step 4"):
        callback.load(tmp_path / MASKS_FILE, global_step=4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="is unreadable"):
        callback.load(tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="must be a prunekit.Pruner or MaskKeeper"):
        PruneDistillCallback(object())


def _mean_kl(student, teacher, data: _Tokens) -> float:
    with torch.no_grad():
        inputs = {"input_ids": data.ids, "attention_mask": data.mask}
        return float(kl_loss(student.eval()(**inputs).logits, teacher.eval()(**inputs).logits, mask=data.mask))


def test_the_distillation_loss_is_averaged_over_gradient_accumulation_and_recovers(tmp_path, single_thread):
    teacher = _llama(0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # peaked next-token distributions, as a trained LM has

    def run(out, batch, accumulate, steps, pad=True, optim="sgd", lr=0.5):
        student = _llama(0)
        with torch.no_grad():
            student.lm_head.weight.mul_(20.0)
        pruner = Pruner(student, 0.5, layers=["model.layers.*"])
        args = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, max_steps=steps,
                    optim=optim, learning_rate=lr, save_strategy="no", lr_scheduler_type="constant", warmup_steps=0,
                    max_grad_norm=0.0)  # no clipping: it would hide a loss scaled twice
        DistillTrainer(model=student, args=_args(out, **args), train_dataset=_Tokens(n=64, pad=pad),
                       distill=DistillLoss(teacher), pruner=pruner).train()
        return student

    # Same samples per step; no padding, so the mean over 8 sequences is the mean of the means over 4 and 4.
    whole, split = run(tmp_path / "a", 8, 1, 2, pad=False), run(tmp_path / "b", 4, 2, 2, pad=False)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)

    held_out = _Tokens(n=32, seed=99)
    pruned = _llama(0)
    with torch.no_grad():
        pruned.lm_head.weight.mul_(20.0)
    Pruner(pruned, 0.5, layers=["model.layers.*"]).remove()
    recovered = run(tmp_path / "c", 8, 1, 40, optim="adamw_torch", lr=1e-3)  # KL measured 0.075 -> 0.030
    assert _mean_kl(recovered, teacher, held_out) < 0.5 * _mean_kl(pruned, teacher, held_out)
