"""Drop-in ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` on ``dlkernels.ops.lstm``.

They subclass torch's modules: the same constructor arguments, parameter names, shapes and gate order (i, f, g, o),
so ``state_dict`` loads both ways, and the same inputs and return values (optional ``(h0, c0)``, unbatched input,
``PackedSequence`` in and out, ``batch_first``, ``proj_size``, inter-layer dropout in training).
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _backend
from ..ops import lstm as lstm_ops


def _autocast_dtype(device_type: str):
    """The dtype torch's LSTM runs in under autocast on ``device_type`` (``lstm`` is on autocast's lower-precision
    list on CUDA and CPU), or None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _let_dynamo_trace(cls) -> None:
    """TorchDynamo refuses to trace any ``isinstance(m, torch.nn.LSTM)`` module unless ``allow_rnn`` is set (torch's
    own LSTM calls an opaque ATen kernel). Ours is plain Python over custom ops, so it lifts that refusal for
    instances of ``cls`` only, by wrapping the one function that checks it (``VariableBuilder.wrap_module``, torch
    2.x). Without dynamo, or if its internals moved, nothing changes and torch.compile graph-breaks as for torch's."""
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except ImportError:
        return
    original = VariableBuilder.wrap_module
    if getattr(original, "_dlkernels_lstm", False):
        return

    def wrap_module(self, value):
        if isinstance(value, cls) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._dlkernels_lstm = True
    VariableBuilder.wrap_module = wrap_module


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` whose layers run on ``dlkernels.ops.lstm_layer[_bidirectional]``.

    Where the engine table (``dlkernels.kernels.launch.lstm_engine``) predicts that none of our engines beats cuDNN
    for a CUDA call with the ``auto`` backend, ``forward`` runs torch's own LSTM instead.
    ``torch.compile(fullgraph=True)`` traces it with no graph break (see ``_let_dynamo_trace``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _let_dynamo_trace(LSTM)

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda name: getattr(self, name + suffix) if hasattr(self, name + suffix) else None  # noqa: E731
        return (get("weight_ih"), get("weight_hh"), get("bias_ih") if self.bias else None,
                get("bias_hh") if self.bias else None, get("weight_hr") if self.proj_size > 0 else None)

    def _use_cudnn(self, input) -> bool:
        """Whether the table sends this call to torch's own LSTM (only CUDA tensors with the ``auto`` backend)."""
        if isinstance(input, PackedSequence):
            x, steps, batch = input.data, input.batch_sizes.numel(), int(input.batch_sizes[0])
        elif isinstance(input, torch.Tensor) and input.dim() in (2, 3):
            x = input
            steps, batch = (input.shape[1], input.shape[0]) if self.batch_first and input.dim() == 3 else \
                (input.shape[0], input.shape[1] if input.dim() == 3 else 1)
        else:
            return False
        if x.device.type != "cuda" or _backend.get_backend() != "auto":
            return False
        from ..kernels.launch import lstm_engine

        training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return lstm_engine("cuda", x.dtype, steps, batch, self.hidden_size, self.proj_size > 0,
                           persistent_ok=lstm_ops.persistent_available(self.hidden_size, batch, x),
                           training=training, torch_path=True) == "cudnn"

    def forward(self, input, hx=None):
        if self._use_cudnn(input):
            return super().forward(input, hx)
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        lengths = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(data, batch_sizes)
            padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes), batch_first=False)
            x, batched = padded, True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
            self.check_input(x, None)
            sorted_indices = unsorted_indices = None
            if self.batch_first:
                x = x.transpose(0, 1)
        lstm_ops._check_input("LSTM", x)
        batch = x.shape[1]
        if hx is None:
            shape = (self.num_layers * directions, batch)
            hx = (x.new_zeros((*shape, out_size)), x.new_zeros((*shape, self.hidden_size)))
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("LSTM: hx must be a tuple (h_0, c_0) of tensors")
            want = 3 if batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            for name, t in (("h_0", hx[0]), ("c_0", hx[1])):
                if t.dtype != x.dtype:
                    raise RuntimeError(f"LSTM: {name} has dtype {t.dtype} but input has dtype {x.dtype}")
                if t.device != x.device:
                    raise RuntimeError(f"LSTM: {name} is on {t.device} but input is on {x.device}")
            self.check_forward_args(data if packed else (x.transpose(0, 1) if self.batch_first else x), hx,
                                    batch_sizes if packed else None)
            if packed:
                hx = self.permute_hidden(hx, sorted_indices)

        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        cast = _autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
            h_n, c_n, x = self._layers(x, hx, lengths, cast)
        if packed:
            out = pack_padded_sequence(x, lengths, enforce_sorted=True)
            output = PackedSequence(out.data, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden((h_n, c_n), unsorted_indices)
        if self.batch_first:
            x = x.transpose(0, 1)
        if not batched:
            return x.squeeze(1 if not self.batch_first else 0), (h_n.squeeze(1), c_n.squeeze(1))
        return x, (h_n, c_n)


    def _layers(self, x, hx, lengths, cast):
        """(h_n, c_n, output) of every layer; ``cast``: the autocast dtype everything runs in, or None."""
        directions = 2 if self.bidirectional else 1
        if cast is not None:
            x, hx = x.to(cast), (hx[0].to(cast), hx[1].to(cast))
        h_n, c_n = [], []
        dev_lengths = None if lengths is None else lengths.to(x.device)
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
            weights = [self._layer_weights(layer, d) for d in range(directions)]
            if cast is not None:
                weights = [[w if w is None else w.to(cast) for w in ws] for ws in weights]
            h0 = [hx[0][layer * directions + d] for d in range(directions)]
            c0 = [hx[1][layer * directions + d] for d in range(directions)]
            if directions == 1:
                w_ih, w_hh, b_ih, b_hh, w_hr = weights[0]
                x, h, c = lstm_ops.lstm_layer(x, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, w_hr, lengths=dev_lengths)
                h_n.append(h)
                c_n.append(c)
            else:
                w_ih, w_hh, b_ih, b_hh, w_hr = (tuple(w[i] for w in weights) for i in range(5))
                x, h, c = lstm_ops.lstm_layer_bidirectional(
                    x, tuple(h0), tuple(c0), w_ih, w_hh, b_ih if self.bias else None, b_hh if self.bias else None,
                    w_hr if self.proj_size > 0 else None, lengths=dev_lengths,
                )
                h_n.extend(h)
                c_n.extend(c)
        return torch.stack(h_n), torch.stack(c_n), x


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` on ``dlkernels.ops.lstm_cell``."""

    def forward(self, input: torch.Tensor, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTMCell: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"LSTMCell: input has inconsistent input_size: got {input.shape[-1]} expected "
                               f"{self.input_size}")
        if hx is None:
            zeros = input.new_zeros((*input.shape[:-1], self.hidden_size))
            hx = (zeros, zeros)
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        cast = _autocast_dtype("cuda") if input.device.type == "cuda" else None  # CPU autocast leaves lstm_cell alone
        if cast is None:
            return lstm_ops.lstm_cell(input, hx[0], hx[1], *weights)
        with torch.autocast("cuda", enabled=False):
            return lstm_ops.lstm_cell(input.to(cast), hx[0].to(cast), hx[1].to(cast),
                                      *(w if w is None else w.to(cast) for w in weights))
