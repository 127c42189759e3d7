"""Structural pruning: remove channels, convolution groups, attention heads and LSTM units for real.

A dependency graph recorded from the model's real forward (a ``TorchFunctionMode``
plus module hooks, so transformers models and vision backbones work) finds which
dimensions are coupled (conv -> BatchNorm -> conv, residual additions,
concatenation, chunk, flatten into a linear layer, depthwise and grouped
convolutions, GroupNorm groups, channel shuffle, attention heads including
grouped-query KV heads with their query groups, gated MLPs, LSTM hidden units);
:func:`prune_channels` ranks the coupled units and slices the layers in place,
keeping module objects, types, names and ``state_dict`` keys, and updates a
transformers model's ``config``. With ``hidden_sparsity=`` (opt-in) it also
shrinks the hidden size (residual stream) of models normalized by RMS-type
norms (Llama, Qwen2, Mistral, Gemma, T5), rescaling the norms so the function
is unchanged (:mod:`prunekit.methods.structural.rmsnorm`); mean-centering LayerNorm
streams (GPT-2, BERT, ViT, OPT) keep their width and the report says why.
:class:`StructuredPruner` zeroes whole units gradually during training and
removes them at the end. :func:`register_surgery` teaches it a custom layer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.methods.structural import prune_channels
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    >>> net, report = prune_channels(net, torch.randn(1, 3, 8, 8), sparsity=0.5)
    >>> net[0].out_channels, net[3].in_features
    (8, 288)
"""

from .flow import Flow, GraphError
from .gradual import StructuredPruner
from .graph import Context, DependencyGraph
from .groups import Group, find_groups, param_masks
from .importance import group_scores
from .macs import count_macs, count_params
from .prune import GroupResult, StructuralReport, prune_channels, select_units
from .recurrent import PrunedMultiheadAttention
from .registry import register_surgery, slice_state
from .surgery import apply_shapes
from .trace import build_graph

__all__ = [
    "Context",
    "DependencyGraph",
    "Flow",
    "GraphError",
    "Group",
    "GroupResult",
    "PrunedMultiheadAttention",
    "StructuralReport",
    "StructuredPruner",
    "apply_shapes",
    "build_graph",
    "count_macs",
    "count_params",
    "find_groups",
    "group_scores",
    "param_masks",
    "prune_channels",
    "register_surgery",
    "select_units",
    "slice_state",
]
