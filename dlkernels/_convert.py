"""``dlkernels.convert(model)``: puts the dlkernels drop-ins into an existing ``torch.nn`` model.

Replaced (exact torch classes only: a subclass may have its own ``forward``): ``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, ``MultiheadAttention``, ``TransformerEncoderLayer``, ``LSTM``, ``LSTMCell``, ``Conv2d``. Inside
every ``nn.Sequential``, runs ``Conv2d -> [ReLU] -> [MaxPool2d | AvgPool2d]`` become one ``dlkernels.nn.Conv2d``
with ``activation``/``pool`` in the conv's slot, and ``BatchNorm -> ReLU`` one batch norm with
``activation="relu"``; the ReLU and pool slots become ``nn.Identity`` (they hold no state, so ``state_dict`` keys do
not change and indices stay where they were).

Every replacement is built on the meta device and then takes over the old module's very Parameter and buffer
objects, children, hooks and train/eval mode: nothing is copied, an optimizer made before ``convert`` keeps
updating the model, and ``state_dict`` keys and values are unchanged. Modules whose configuration the kernels do
not cover are left alone. ``report(model)`` lists what happened to every module, with the reason.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import nn as dlnn

logger = logging.getLogger("dlkernels.convert")

_REPORT_ATTR = "_dlkernels_convert_report"
_HOOK_ATTRS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


@dataclass
class Entry:
    """What ``convert`` did with one module: ``action`` is ``replaced``, ``fused``, ``visited`` (a container whose
    children were converted one by one), ``kept`` (a part of a replaced module, reused as it is) or ``left alone``;
    ``detail`` says with what, or why not."""

    name: str
    type: str
    action: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name or '(model)'} [{self.type}]: {self.action}{' - ' + self.detail if self.detail else ''}"


class Report(list):
    """The entries of one ``convert`` call, one per module, in ``named_modules`` order."""

    @property
    def replaced(self) -> list[Entry]:
        return [e for e in self if e.action in ("replaced", "fused")]

    @property
    def left_alone(self) -> list[Entry]:
        return [e for e in self if e.action == "left alone"]

    def summary(self) -> str:
        return (f"dlkernels.convert: {len(self.replaced)} modules replaced or fused, {len(self.left_alone)} left "
                f"alone")

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"  {e}" for e in self)])


def report(model: nn.Module) -> Report:
    """The report of the last ``dlkernels.convert`` of ``model``."""
    found = getattr(model, _REPORT_ATTR, None)
    if found is None:
        raise ValueError(f"{type(model).__name__} was not converted by dlkernels.convert")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Taking over a module's state.


def _adopt(new: nn.Module, old: nn.Module, skip_children: Iterable[str] = ()) -> nn.Module:
    """Moves ``old``'s parameters, buffers, children, hooks and mode into ``new`` (the very same objects)."""
    for name in list(new._parameters):
        if name not in old._parameters:
            delattr(new, name)
    for name, p in old._parameters.items():
        setattr(new, name, p)  # setattr: modules such as nn.LSTM track their parameters in their own lists
    for name in list(new._buffers):
        if name not in old._buffers:
            delattr(new, name)
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, child in old._modules.items():
        if name not in skip_children:
            setattr(new, name, child)
    for attr in _HOOK_ATTRS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.train(old.training)
    return new


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


# ---------------------------------------------------------------------------------------------------------------
# One converter per torch class: (module, fused activation) -> (replacement or None, detail or reason).

_BATCH_NORMS = {nn.BatchNorm1d: "BatchNorm1d", nn.BatchNorm2d: "BatchNorm2d", nn.BatchNorm3d: "BatchNorm3d"}


def _batch_norm(m, relu=False):
    cls = getattr(dlnn, _BATCH_NORMS[type(m)])
    new = _meta(lambda: cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                            activation="relu" if relu else None))
    return _adopt(new, m), f"dlkernels.nn.{cls.__name__}" + (" + ReLU" if relu else "")


def _sync_batch_norm(m, relu=False):
    new = _meta(lambda: dlnn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                           m.process_group, activation="relu" if relu else None))
    return _adopt(new, m), "dlkernels.nn.SyncBatchNorm" + (" + ReLU" if relu else "")


def _mha_unsupported(m) -> Optional[str]:
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn: the attention kernel does not cover them"
    return None


def _multihead_attention(m):
    why = _mha_unsupported(m)
    if why:
        return None, why
    new = _meta(lambda: dlnn.MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None, kdim=m.kdim, vdim=m.vdim,
        batch_first=m.batch_first))
    return _adopt(new, m), "dlkernels.nn.MultiheadAttention"


def _transformer_encoder_layer(m):
    if type(m.self_attn) is not nn.MultiheadAttention:
        return None, f"its self_attn is a {type(m.self_attn).__name__}, not torch's MultiheadAttention"
    why = _mha_unsupported(m.self_attn)
    if why:
        return None, why
    activation = m.activation
    new = _meta(lambda: dlnn.TransformerEncoderLayer(
        m.self_attn.embed_dim, m.self_attn.num_heads, dim_feedforward=m.linear1.out_features, dropout=m.dropout.p,
        activation=activation, layer_norm_eps=m.norm1.eps, batch_first=m.self_attn.batch_first,
        norm_first=m.norm_first, bias=m.linear1.bias is not None))
    _adopt(new, m, skip_children=("self_attn",))
    new.self_attn = _multihead_attention(m.self_attn)[0]
    new.activation = activation
    new.activation_relu_or_gelu = 0  # keeps nn.TransformerEncoder off its fast path, which would bypass the layer
    return new, "dlkernels.nn.TransformerEncoderLayer"


def _lstm(m):
    new = _meta(lambda: dlnn.LSTM(m.input_size, m.hidden_size, m.num_layers, bias=m.bias,
                                  batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional,
                                  proj_size=m.proj_size))
    return _adopt(new, m), "dlkernels.nn.LSTM"


def _lstm_cell(m):
    new = _meta(lambda: dlnn.LSTMCell(m.input_size, m.hidden_size, bias=m.bias))
    return _adopt(new, m), "dlkernels.nn.LSTMCell"


def _pool_spec(pool) -> tuple[Optional[tuple], Optional[str]]:
    """(``pool=`` argument of dlkernels.nn.Conv2d, None) for a pool the fused kernel covers, else (None, reason)."""
    if type(pool) is nn.MaxPool2d:
        if pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)) or pool.ceil_mode \
                or pool.return_indices:
            return None, "max pool with padding, dilation, ceil_mode or return_indices is not fused"
        return ("max", pool.kernel_size, pool.stride), None
    if type(pool) is nn.AvgPool2d:
        if pool.padding not in (0, (0, 0)) or pool.ceil_mode or pool.divisor_override is not None:
            return None, "average pool with padding, ceil_mode or divisor_override is not fused"
        return ("avg", pool.kernel_size, pool.stride), None
    return None, f"{type(pool).__name__} is not a pool the conv kernel fuses"


def _conv_unsupported(m) -> Optional[str]:
    if m.groups != 1:
        return f"groups={m.groups}: the conv kernel covers groups=1 (it would run the reference path)"
    return None


def _conv2d(m, relu=False, pool=None):
    why = _conv_unsupported(m)
    if why:
        return None, why
    new = _meta(lambda: dlnn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        m.bias is not None, m.padding_mode, activation="relu" if relu else None, pool=pool))
    fused = (" + ReLU" if relu else "") + (f" + {pool[0]} pool" if pool else "")
    return _adopt(new, m), "dlkernels.nn.Conv2d" + fused


def _converters() -> dict:
    """torch class -> converter, for the drop-ins this installation has."""
    table = {cls: _batch_norm for cls in _BATCH_NORMS}
    table.update({
        nn.SyncBatchNorm: _sync_batch_norm,
        nn.MultiheadAttention: _multihead_attention,
        nn.TransformerEncoderLayer: _transformer_encoder_layer,
    })
    optional = {nn.LSTM: ("LSTM", _lstm), nn.LSTMCell: ("LSTMCell", _lstm_cell), nn.Conv2d: ("Conv2d", _conv2d)}
    for cls, (name, fn) in optional.items():
        if hasattr(dlnn, name):
            table[cls] = fn
    return table


def _ours() -> tuple:
    return tuple(getattr(dlnn, name) for name in dlnn.__all__)


# ---------------------------------------------------------------------------------------------------------------
# The walk.


class _Walk:
    def __init__(self, include, exclude):
        self.include = None if include is None else list(_as_iterable(include))
        self.exclude = list(_as_iterable(exclude)) if exclude is not None else []
        self.table = _converters()
        self.ours = _ours()
        self.entries: dict[str, Entry] = {}

    def wanted(self, name: str, module: nn.Module) -> bool:
        if any(_matches(rule, name, module) for rule in self.exclude):
            return False
        return self.include is None or any(_matches(rule, name, module) for rule in self.include)

    def note(self, name, module, action, detail):
        self.entries[name] = Entry(name, type(module).__name__, action, detail)

    def convert_module(self, name: str, module: nn.Module) -> Optional[nn.Module]:
        """The replacement of ``module`` (None: keep it), noting the outcome."""
        if isinstance(module, self.ours):
            self.note(name, module, "left alone", "already a dlkernels module")
            return None
        converter = self.table.get(type(module))
        if converter is None:
            if module._modules:
                self.note(name, module, "visited", "children converted one by one")
            else:
                self.note(name, module, "left alone", _no_kernel_reason(module, self.table))
            return None
        if not self.wanted(name, module):
            self.note(name, module, "left alone", "excluded by include/exclude")
            return None
        new, detail = converter(module)
        self.note(name, module, "replaced" if new is not None else "left alone", detail)
        return new

    def walk(self, module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential):
            self.fuse(module, prefix)
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name in self.entries:  # fused above
                continue
            new = self.convert_module(name, child)
            if new is None:
                if child._modules:  # a container, or a module kept whole whose children may still be converted
                    self.walk(child, name)
                continue
            setattr(module, child_name, new)
            self.note_parts(name, child, new)

    def note_parts(self, name: str, old: nn.Module, new: nn.Module) -> None:
        """Lists a replacement's own children (a TransformerEncoderLayer's attention, norms, linears)."""
        for sub_name, sub in new.named_modules(prefix=name):
            if sub_name != name:
                self.note(sub_name, sub, "replaced" if isinstance(sub, self.ours) else "kept",
                          f"part of the replaced {type(old).__name__}")

    def fuse(self, seq: nn.Sequential, prefix: str) -> None:
        """Fuses Conv2d -> [ReLU] -> [pool] and BatchNorm -> ReLU runs among ``seq``'s children."""
        keys = list(seq._modules)
        mods = [seq._modules[k] for k in keys]
        full = [f"{prefix}.{k}" if prefix else k for k in keys]
        i = 0
        while i < len(mods):
            m = mods[i]
            relu = i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU and self.wanted(full[i + 1], mods[i + 1])
            plain_conv = nn.Conv2d in self.table and type(m) in (nn.Conv2d, dlnn.Conv2d) \
                and getattr(m, "activation", None) is None and getattr(m, "pool", None) is None
            if plain_conv and self.wanted(full[i], m) and _conv_unsupported(m) is None:
                j = i + 1 + relu
                pool, why = (None, None)
                if j < len(mods) and type(mods[j]) in (nn.MaxPool2d, nn.AvgPool2d) and self.wanted(full[j], mods[j]):
                    pool, why = _pool_spec(mods[j])
                if relu or pool is not None:
                    new, detail = _conv2d(m, relu=relu, pool=pool)
                    setattr(seq, keys[i], new)
                    self.note(full[i], m, "fused", detail)
                    taken = [i + 1] * relu + [j] * (pool is not None)
                    for k in taken:
                        self.note(full[k], mods[k], "fused", f"into {full[i]} (now Identity)")
                        setattr(seq, keys[k], nn.Identity())
                    if pool is None and why is not None:
                        self.note(full[j], mods[j], "left alone", why)
                    i = max(taken) + 1
                    continue
                if why is not None:  # the conv itself is replaced by the walk; say why its pool stays
                    self.note(full[j], mods[j], "left alone", why)
            bn_types = tuple(_BATCH_NORMS) + (nn.SyncBatchNorm,)
            if relu and type(m) in bn_types and self.wanted(full[i], m):
                new, detail = (_sync_batch_norm if type(m) is nn.SyncBatchNorm else _batch_norm)(m, relu=True)
                setattr(seq, keys[i], new)
                self.note(full[i], m, "fused", detail)
                self.note(full[i + 1], mods[i + 1], "fused", f"into {full[i]} (now Identity)")
                setattr(seq, keys[i + 1], nn.Identity())
                i += 2
                continue
            if relu and isinstance(m, self.ours) and getattr(m, "activation", "x") is None \
                    and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.activation = "relu"  # a dlkernels batch norm already: switch its fused ReLU on
                self.note(full[i], m, "fused", f"{type(m).__name__} + ReLU (activation switched on)")
                self.note(full[i + 1], mods[i + 1], "fused", f"into {full[i]} (now Identity)")
                setattr(seq, keys[i + 1], nn.Identity())
                i += 2
                continue
            i += 1


def _as_iterable(rules):
    return [rules] if isinstance(rules, (str, type)) else rules


def _matches(rule, name: str, module: nn.Module) -> bool:
    if isinstance(rule, type):
        return isinstance(module, rule)
    if isinstance(rule, str):
        return type(module).__name__ == rule or fnmatch.fnmatchcase(name, rule)
    raise TypeError(f"include/exclude entries must be module classes or name patterns (str), got {rule!r}")


def _no_kernel_reason(module: nn.Module, table: dict) -> str:
    for cls in table:
        if isinstance(module, cls):
            return f"a subclass of torch's {cls.__name__} (its own forward is kept)"
    if isinstance(module, (nn.LSTM, nn.LSTMCell, nn.Conv2d)):
        return f"this installation has no dlkernels.nn.{type(module).__name__}"
    return "no dlkernels kernel for this module"


def convert(
    model: nn.Module,
    *,
    inplace: bool = True,
    include: Optional[Iterable] = None,
    exclude: Optional[Iterable] = None,
) -> nn.Module:
    """Replaces the modules of ``model`` that dlkernels has kernels for; returns the model.

    ``inplace=False`` converts a deep copy (whose parameters are then new tensors). ``include`` / ``exclude``:
    module classes (matched with ``isinstance``) or strings (a class name such as ``"BatchNorm2d"``, or an
    ``fnmatch`` pattern of qualified module names such as ``"encoder.*"``); only included, not excluded modules
    are replaced or fused. The outcome for every module is logged (logger ``dlkernels.convert``, INFO) and kept:
    ``dlkernels.convert.report(model)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    walk = _Walk(include, exclude)
    new_root = walk.convert_module("", model)
    if new_root is not None:
        walk.note_parts("", model, new_root)
        model = new_root
    elif model._modules:
        walk.walk(model, "")
    ordered = Report()
    for name, module in model.named_modules(remove_duplicate=False):
        if name in walk.entries:
            ordered.append(walk.entries.pop(name))
    ordered.extend(walk.entries.values())  # fused slots, now Identity
    object.__setattr__(model, _REPORT_ATTR, ordered)
    logger.info("%s", ordered)
    return model


convert.report = report
