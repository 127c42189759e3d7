"""Keep a transformers model's size attributes and ``config`` in step with its pruned weights.

After heads or MLP units are removed, attention modules get their head counts
(``num_heads``, ``num_attention_heads``, ``all_head_size``, GPT-2's
``split_size``, ``num_key_value_heads``) from their projections, and the
model's ``config`` gets ``num_attention_heads`` / ``num_key_value_heads`` /
``head_dim`` / ``intermediate_size`` (``n_inner``, ``ffn_dim`` ...) when every
layer has the same size. The new config is checked by building the model from
it on the meta device: if some size cannot be expressed (GPT-2, BERT and ViT
derive ``head_dim = hidden_size // num_attention_heads``, so fewer heads with
the same hidden size cannot be described; or layers differ), the config keeps
what it can express and a note says to reload with
:func:`~prunekit.apply_shapes`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ...core.layerspec import weight_spec

__all__ = ["sync_transformers"]

_Q = ("q_proj", "query", "q", "q_lin")
_FUSED = ("c_attn", "qkv", "Wqkv", "query_key_value")
_K = ("k_proj", "key", "k", "k_lin")
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_MLP = ("gate_proj", "up_proj", "c_fc", "fc1", "wi", "w1", "lin1")
_CONFIG_FFN = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "d_ff", "hidden_dim")


def _out(module: nn.Module | None) -> int | None:
    if module is None or getattr(module, "weight", None) is None:
        return None
    spec = weight_spec(module, "weight")
    return int(module.weight.shape[spec.out_axis]) if spec is not None else None


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and _out(child) is not None:
            return name, child
    return None


def _sync_attention(module: nn.Module) -> tuple[int, int | None, int] | None:
    """Set the head-count attributes of one attention module; ``(heads, kv_heads, head_dim)`` or ``None``."""
    d = next((getattr(module, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim") if type(getattr(module, a, None)) is int),
             None)
    q, fused = _child(module, _Q), _child(module, _FUSED)
    if d is None or (q is None and fused is None):
        return None
    width = _out(q[1]) if q is not None else _out(fused[1]) // 3
    heads = width // d
    for attr in _HEADS:
        if type(getattr(module, attr, None)) is int:
            setattr(module, attr, heads)
    for attr in ("all_head_size", "inner_dim"):
        if type(getattr(module, attr, None)) is int:
            setattr(module, attr, width)
    if fused is not None and q is None and type(getattr(module, "split_size", None)) is int:
        module.split_size = width
    k = _child(module, _K)
    kv = _out(k[1]) // d if k is not None else None
    if kv is not None and type(getattr(module, "num_key_value_heads", None)) is int:
        module.num_key_value_heads = kv
    return heads, kv, d


def sync_transformers(model: nn.Module) -> list[str]:
    """Update attention attributes and ``model.config`` from the weights; returns notes on what it could not.

    Example:
        >>> sync_transformers(nn.Linear(2, 2))  # not a transformers model: nothing to do
        []
    """
    attention = [r for r in map(_sync_attention, model.modules()) if r is not None]
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return [note for inner in _wrapped(model) for note in _sync_config(inner, inner.config, attention)]
    return _sync_config(model, config, attention)


def _wrapped(model: nn.Module) -> list[nn.Module]:
    """Outermost transformers models inside a plain wrapper whose hidden size was pruned (their config follows)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p, _ in found) or not hasattr(getattr(module, "config", None), "to_dict"):
            continue
        width = getattr(input_embeddings(module), "embedding_dim", None)
        if type(width) is int and width != getattr(module.config, "hidden_size", width):
            found.append((path, module))
    return [m for _, m in found]


def _sync_config(model: nn.Module, config: Any, attention: list[tuple[int, int | None, int]]) -> list[str]:
    """Update one transformers model's ``config`` from its weights; notes on what it cannot express."""
    widths = [_out(_child(m, _MLP)[1]) for m in model.modules() if _child(m, _MLP) is not None and _is_mlp(m)]
    widths += [_out(m.intermediate.dense) for m in model.modules()
               if isinstance(getattr(m, "intermediate", None), nn.Module) and _out(getattr(m.intermediate, "dense",
                                                                                              None)) is not None]
    changes: dict[str, Any] = {}
    notes: list[str] = []
    if attention:
        heads = {h for h, _, _ in attention}
        kvs = {kv for _, kv, _ in attention if kv is not None}
        dims = {d for _, _, d in attention}
        if len(heads) == 1 and len(dims) == 1:
            changes["num_attention_heads"] = heads.pop()
            changes["head_dim"] = dims.pop()  # many models read getattr(config, "head_dim", hidden // heads)
        elif len(heads) > 1:
            notes.append(f"layers keep different numbers of heads {sorted(heads)}: config cannot express it; "
                         f"{_RELOAD}")
        if len(kvs) == 1 and hasattr(config, "num_key_value_heads"):
            changes["num_key_value_heads"] = kvs.pop()
    if widths:
        key = next((k for k in _CONFIG_FFN if hasattr(config, k)), None)
        if len(set(widths)) == 1 and key is not None:
            changes[key] = widths[0]
        elif len(set(widths)) > 1:
            notes.append(f"layers keep different MLP widths {sorted(set(widths))}: config cannot express it; "
                         f"{_RELOAD}")
    changes.update(_hidden_changes(model, config))
    return notes + _apply_config(model, config, changes)


_RELOAD = ("save_pretrained/from_pretrained will not round-trip. Reload with "
           "prunekit.apply_shapes(ModelClass(config), report.shapes), then load the weights")
_EPS_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps", "rms_norm_epsilon")
_SIZE_ATTRS = ("hidden_size", "embed_dim", "d_model", "n_embd")
_HEAD_KEYS = ("num_attention_heads", "head_dim", "num_key_value_heads")


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` of a transformers model, or ``None`` (vision models raise there)."""
    try:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    return embed if isinstance(embed, nn.Module) else None


def _hidden_changes(model: nn.Module, config: Any) -> dict[str, Any]:
    """``hidden_size`` (and the RMS norms' rescaled eps) when the token embedding became narrower."""
    width = getattr(input_embeddings(model), "embedding_dim", None)
    if type(width) is not int or type(getattr(config, "hidden_size", None)) is not int or width == config.hidden_size:
        return {}
    from .rmsnorm import rms_norm_info

    changes: dict[str, Any] = {"hidden_size": width}
    for module in model.modules():  # sizes kept for reference (LlamaMLP.hidden_size): the stream's new width
        for attr in _SIZE_ATTRS:
            if type(getattr(module, attr, None)) is int and getattr(module, attr) == config.hidden_size:
                setattr(module, attr, width)
    _fold_width_constants(model, config.hidden_size, width)
    eps = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 1 and weight.numel() == width:
            info = rms_norm_info(module)
            if info is not None:
                eps.add(getattr(module, info.eps_attr))
    key = next((k for k in _EPS_KEYS if isinstance(getattr(config, k, None), float)), None)
    if len(eps) == 1 and key is not None:
        changes[key] = eps.pop()
    return changes


def _fold_width_constants(model: nn.Module, old: int, new: int) -> None:
    """Constants a model derives from ``hidden_size`` take their new value; weights absorb the difference.

    A model built from a config with the new width computes these constants
    from it, so they must change for ``from_pretrained`` to round-trip, and the
    function is kept by scaling the weights next to them:

    * Gemma's embedding scale ``sqrt(hidden_size)``: the embedding weight is
      multiplied by ``sqrt(old / new)``; a tied output head then sees the same
      factor, which the final norm's scale ``s(w)`` divides out.
    * T5's tied-head scale ``model_dim ** -0.5``: the decoder's final norm weight
      is multiplied by ``sqrt(new / old)``.

    Example:
        >>> _fold_width_constants(nn.Linear(2, 2), 32, 16)  # nothing of the kind: nothing to do
    """
    from .rmsnorm import rms_norm_info

    embed = input_embeddings(model)
    scale = getattr(embed, "scalar_embed_scale", None)
    if isinstance(scale, float) and math.isclose(scale, math.sqrt(old), rel_tol=1e-9):
        factor = math.sqrt(old / new)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        norm = getattr(getattr(model, "base_model", None), "norm", None)
        info = rms_norm_info(norm) if isinstance(norm, nn.Module) else None
        tied = head is not None and getattr(head, "weight", None) is embed.weight
        if not tied or info is not None:
            with torch.no_grad():
                embed.weight.mul_(factor)
                if tied:
                    norm.weight.copy_(((norm.weight.double() + info.offset) / factor - info.offset).to(norm.weight))
                embed.scalar_embed_scale = math.sqrt(new)
                if isinstance(getattr(embed, "embed_scale", None), torch.Tensor):
                    embed.embed_scale.fill_(math.sqrt(new))
    decoder_norm = getattr(getattr(model, "decoder", None), "final_layer_norm", None)
    if type(getattr(model, "model_dim", None)) is int and model.model_dim == old and isinstance(
            getattr(decoder_norm, "weight", None), torch.Tensor):
        config = model.config  # transformers 5 says scale_decoder_outputs, earlier ones tie_word_embeddings
        if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False)):
            with torch.no_grad():
                decoder_norm.weight.mul_(math.sqrt(new / old))
        model.model_dim = new


def _is_mlp(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, n, None), nn.Module) for n in ("down_proj", "c_proj", "fc2", "wo", "w2",
                                                                        "lin2"))


def _apply_config(model: nn.Module, config: Any, changes: dict[str, Any]) -> list[str]:
    """Apply ``changes`` to ``config`` keeping only what builds the pruned shapes; notes for the rest.

    A hidden-size change is kept only together with everything it implies (a
    fresh model must have the same constants, e.g. norm eps and embedding
    scales); otherwise ``config.hidden_size`` stays and a note says why.
    """
    changes = {k: v for k, v in changes.items() if getattr(config, k, None) != v}
    if not changes and _builds(model, config):
        return []
    hidden_keys = ("hidden_size", *_EPS_KEYS)
    without_heads = {k: v for k, v in changes.items() if k not in _HEAD_KEYS}
    without_hidden = {k: v for k, v in changes.items() if k not in hidden_keys}
    trials = [changes, without_heads, without_hidden, {k: v for k, v in without_heads.items() if k not in hidden_keys}]
    for subset in trials:
        trial = copy.deepcopy(config)
        for key, value in subset.items():
            setattr(trial, key, value)
        if _builds(model, trial):
            for key, value in subset.items():
                setattr(config, key, value)
            dropped = {k for k in changes if k not in subset and k in hidden_keys}
            return [_hidden_note(model, changes, trials[0])] if dropped else []
    kept = {k: v for k, v in changes.items() if k not in _HEAD_KEYS and k not in hidden_keys}
    for key, value in kept.items():
        setattr(config, key, value)
    if "hidden_size" in changes:
        return [_hidden_note(model, changes, changes)]
    why = ("per-layer channel counts" if not changes else
           f"{changes} (a model that derives head_dim = hidden_size // num_attention_heads cannot describe fewer "
           "heads of the same size)")
    return [f"{type(model).__name__}.config cannot express the pruned sizes: {why}; save_pretrained/from_pretrained "
            "will not round-trip. Reload with prunekit.apply_shapes(ModelClass(config), report.shapes), "
            "then load the weights"]


def _hidden_note(model: nn.Module, changes: dict[str, Any], tried: dict[str, Any]) -> str:
    trial = copy.deepcopy(model.config)
    for key, value in tried.items():
        setattr(trial, key, value)
    why = _mismatch(model, trial) or "it does not build"
    return (f"{type(model).__name__}.config keeps hidden_size={model.config.hidden_size}: a model built with "
            f"hidden_size={changes['hidden_size']} would differ ({why}); save_pretrained/from_pretrained will not "
            "round-trip. Reload with prunekit.apply_shapes(ModelClass(config), report.shapes), then load "
            "the weights")


def _constants(model: nn.Module) -> dict[str, int | float]:
    """Every int/float attribute of every module (eps, scales, head counts): what a fresh build must match."""
    return {f"{path}.{attr}" if path else attr: value for path, module in model.named_modules()
            for attr, value in vars(module).items() if type(value) in (int, float) and not attr.startswith("_")}


def _mismatch(model: nn.Module, config: Any) -> str | None:
    """Why ``type(model)(config)`` (built on the meta device) differs from ``model``, or ``None``.

    Parameter shapes must match, and so must the float attributes of the
    modules both have (a norm's eps, an embedding scale) and the int ones that
    still hold ``model.config.hidden_size`` (T5's ``model_dim`` scale).
    """
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))
    except Exception as exc:  # a config the class rejects
        return f"the class rejects the config: {type(exc).__name__}"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    shapes = [k for k, s in mine.items() if theirs.get(k, s) != s]
    if shapes:
        return f"shapes of {shapes[:3]}"
    here, there = _constants(model), _constants(fresh)
    old_width = model.config.hidden_size  # ints only where they still hold the unpruned width (T5's model_dim)
    diff = [f"{k}={here[k]!r} vs {there[k]!r}" for k in here if k in there and there[k] != here[k]
            and (type(here[k]) is float or here[k] == old_width)]
    return f"constants {', '.join(diff[:3])}" if diff else None


def _builds(model: nn.Module, config: Any) -> bool:
    """Whether ``type(model)(config)`` has exactly the model's parameter shapes and constants."""
    return _mismatch(model, config) is None
