"""prunekit: prune PyTorch models during training, one-shot or structurally; ship them small and fast.

Example:
    >>> import torch, prunekit
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> pruner = prunekit.Pruner(model, prunekit.PolynomialDecay(0.5, 0.8, 0, 1000), optimizer=opt)
    >>> # ... the usual training loop; masks follow every opt.step() ...
    >>> model = prunekit.strip(model)
"""

from .core.criteria import Criterion, Magnitude, Precomputed, Random, ScoreContext
from .core.granularity import NM, Blocks, Channels, Granularity, Unstructured
from .core.layerspec import WeightSpec, prunable_parameter_names, register_prunable, weight_spec
from .core.masks import MaskKeeper, strip
from .core.pruner import Pruner
from .core.report import LayerSparsity, SparsityReport, sparsity_report
from .core.schedules import ConstantSparsity, PolynomialDecay, Schedule, schedule_from_dict
from .formats import FormatError, export_onnx, load, quantize_int8, save, size_summary
from .formats.mobile import export_executorch, export_litert
from .methods.allocation import Allocation, allocate
from .methods.budget import BudgetResult, StopWhen, prune_channels_to_budget, prune_to_budget
from .methods.iterative import iterative_prune, round_sparsities
from .methods.obd import OBD, Taylor
from .methods.sensitivity import SensitivityResult, sensitivity
from .methods.structural import StructuredPruner, apply_shapes, prune_channels, register_surgery
from .runtime import AccelerationReport, SparseConv2d, SparseLinear, accelerate

__version__ = "0.1.0"

__all__ = [
    "AccelerationReport",
    "Allocation",
    "Blocks",
    "BudgetResult",
    "Channels",
    "ConstantSparsity",
    "Criterion",
    "FormatError",
    "Granularity",
    "LayerSparsity",
    "Magnitude",
    "MaskKeeper",
    "NM",
    "OBD",
    "PolynomialDecay",
    "Precomputed",
    "Pruner",
    "Random",
    "Schedule",
    "StructuredPruner",
    "ScoreContext",
    "SparseConv2d",
    "SensitivityResult",
    "SparseLinear",
    "SparsityReport",
    "StopWhen",
    "Taylor",
    "Unstructured",
    "WeightSpec",
    "accelerate",
    "allocate",
    "apply_shapes",
    "export_executorch",
    "export_litert",
    "export_onnx",
    "iterative_prune",
    "load",
    "prunable_parameter_names",
    "prune_channels",
    "prune_channels_to_budget",
    "prune_to_budget",
    "quantize_int8",
    "register_prunable",
    "register_surgery",
    "round_sparsities",
    "save",
    "sensitivity",
    "schedule_from_dict",
    "size_summary",
    "sparsity_report",
    "strip",
    "weight_spec",
]
