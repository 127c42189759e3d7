"""PrunedMultiheadAttention against torch's layer; MAC counts against hand formulas."""

from __future__ import annotations

import pytest
import torch
from structural_zoo import rel_err
from torch import nn

from prunekit.methods.structural import PrunedMultiheadAttention, count_macs


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float+padding"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_attention_with_all_heads_equals_torch(batch_first: bool, masks: str, seed: int) -> None:
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    mine = PrunedMultiheadAttention(16, 4, 4, batch_first=batch_first).eval()
    mine.load_state_dict(ref.state_dict())
    assert list(mine.state_dict()) == list(ref.state_dict())
    n, length, source = 3, 5, 6
    q = torch.randn((n, length, 16) if batch_first else (length, n, 16))
    kv = torch.randn((n, source, 16) if batch_first else (source, n, 16))
    kwargs = {}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(length, source) > 0.7
        kwargs["attn_mask"][:, 0] = False  # no fully masked row
    elif masks == "float+padding":
        kwargs["attn_mask"] = torch.randn(n * 4, length, source)
        kwargs["key_padding_mask"] = torch.zeros(n, source)
        kwargs["key_padding_mask"][:, -2:] = float("-inf")
    with torch.no_grad():
        for average in (True, False):
            out_ref, w_ref = ref(q, kv, kv, average_attn_weights=average, **kwargs)
            out, w = mine(q, kv, kv, average_attn_weights=average, **kwargs)
            assert rel_err(out, out_ref) < 1e-5 and rel_err(w, w_ref) < 1e-5


def test_pruned_attention_unbatched_and_no_bias() -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, bias=False).eval()
    mine = PrunedMultiheadAttention(8, 2, 4, bias=False).eval()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert rel_err(mine(x, x, x)[0], ref(x, x, x)[0]) < 1e-5


def test_macs_of_attention_and_lstm_follow_the_formulas() -> None:
    n, length, dim, heads, head_dim = 2, 7, 16, 2, 4
    mha = PrunedMultiheadAttention(dim, heads, head_dim, out_dim=12, batch_first=True)
    inner = heads * head_dim
    expected = n * length * (3 * inner * dim) + 2 * n * length * length * inner + n * length * inner * 12
    assert count_macs(mha, (torch.randn(n, length, dim),) * 3) == expected
    lstm = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    steps = 4 * 3  # sequence 4, batch 3
    per_dir = 4 * 6 * (5 + 6) + 4 * 6 * (12 + 6)
    assert count_macs(lstm, torch.randn(4, 3, 5)) == steps * 2 * per_dir
