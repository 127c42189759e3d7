"""Tiny random-init models of real architectures (transformers configs) and a ResNet-ish CNN, with samples."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

VOCAB = 100


def _text_samples(seed: int, n: int = 2, batch: int = 2, seq: int = 8, mask: bool = True,
                  decoder: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + seed)
    samples = []
    for i in range(n):
        s = {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=gen)}
        if mask:
            m = torch.ones(batch, seq, dtype=torch.long)
            m[1, seq - 2 - i:] = 0  # a padded second row: the mask reaches the blocks as a keyword
            s["attention_mask"] = m
        if decoder:
            s["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, seq - 2), generator=gen)
        samples.append(s)
    return samples


def _lm(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers
        config = getattr(transformers, config_cls)(**kw)
        return getattr(transformers, model_cls)(config)
    return make


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)

FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "gpt2": (_lm("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64),
             {}),
    "llama": (_lm("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True, **_DECODER), {}),
    "qwen2": (_lm("Qwen2Config", "Qwen2ForCausalLM", **_DECODER), {}),
    "mistral": (_lm("MistralConfig", "MistralForCausalLM", sliding_window=4, **_DECODER), {}),
    "phi3": (_lm("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_DECODER), {}),
    "phi": (_lm("PhiConfig", "PhiForCausalLM", **_DECODER), {}),
    "gemma2": (_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4, **_DECODER), {}),
    "gemma3": (_lm("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"], **_DECODER), {}),
    "opt": (_lm("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64), {}),
    "bert": (_lm("BertConfig", "BertModel", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64), {}),
    "vit": (_lm("ViTConfig", "ViTModel", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64), {"image": True}),
    "t5": (_lm("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16,
               num_layers=2, num_decoder_layers=2, num_heads=2), {"decoder": True}),
}


def family(name: str, seed: int) -> tuple[nn.Module, list[Any]]:
    """A fresh random-init model of ``name`` (seeded) and calibration samples for it."""
    make, opts = FAMILIES[name]
    torch.manual_seed(seed)
    model = make().eval()
    if opts.get("image"):
        gen = torch.Generator().manual_seed(1000 + seed)
        return model, [{"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)} for _ in range(2)]
    return model, _text_samples(seed, decoder=opts.get("decoder", False))


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convs with batch norm, a strided/projected shortcut where shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    """Stem conv, two stages of basic blocks (one strided), a depthwise conv, a linear head."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stage1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage2(self.stage1(torch.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def resnet(seed: int) -> tuple[TinyResNet, list[torch.Tensor]]:
    """A :class:`TinyResNet` with non-trivial batch-norm statistics, and image samples."""
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(2000 + seed)
    return model.eval(), [torch.randn(2, 3, 12, 12, generator=gen) for _ in range(2)]
