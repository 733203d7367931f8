"""Drop-in ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` on ``dlkernels.ops.attention``, plus a
``window=(left, right)`` option for truncated (sliding-window) self-attention.

Which path a call takes:

- **Kernel path** (``dlkernels.ops.attention``, which itself picks Triton or its eager reference by device and
  backend): ``need_weights=False``, no ``bias_k``/``bias_v``, no ``add_zero_attn``, ``attn_mask`` either absent or
  accompanied by the ``is_causal=True`` hint (the hint is trusted, as ``torch`` does), and a ``key_padding_mask`` that
  is bool, or float holding only ``0`` and ``-inf`` (what ``nn.TransformerEncoder`` turns a bool mask into; checking
  the values costs one device sync, and under ``torch.compile`` a float mask always takes the reference path).
- **Reference path** (``torch.nn.MultiheadAttention.forward`` itself): everything else, e.g. ``need_weights=True``
  (torch's default: the attention weights are returned exactly as torch does, without a warning, since asking for
  weights is a legitimate request the kernel cannot answer; pass ``need_weights=False`` for speed, as torch's own
  documentation advises), an arbitrary ``attn_mask``, a float ``key_padding_mask`` with other values,
  ``add_bias_kv``, ``add_zero_attn``, nested tensors. A ``window`` (and ``is_causal`` without ``attn_mask``) is
  turned into an explicit mask there, so both paths compute the same function. Configurations that asked for output
  only (``need_weights=False``) yet cannot use the kernel warn once per reason where a kernel would have run (not
  while ``torch.compile`` traces: a warning cannot be traced).

Inside a stock ``nn.TransformerEncoder`` of our layers, the float ``0/-inf`` padding mask the encoder makes runs
the kernel in eager mode; under ``torch.compile`` it takes the reference path, so for compiled padded encoders call
the layers in a loop with a bool ``src_key_padding_mask``.

Differences from torch, all deliberate:

- ``is_causal=True`` without ``attn_mask`` means causal attention (torch raises "Need attn_mask if specifying the
  is_causal hint").
- A query row with no key left to attend (a fully padded sequence, or a window that leaves no key) gives attention
  output zeros on the kernel path, so the layer returns ``out_proj.bias`` there; torch returns NaN on its
  ``need_weights=True`` path and on its eval fast path, and zeros on its SDPA path. The reference path keeps
  torch's behaviour.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend
from ..ops.attention import attention as attention_op

__all__ = ["MultiheadAttention", "TransformerEncoderLayer"]


def _check_window(window):
    """Validates ``window=(left, right)``: each side a non-negative int or None (unbounded)."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
    for side, reach in zip(("left", "right"), window):
        if reach is None:
            continue
        if isinstance(reach, bool) or not isinstance(reach, int):
            raise TypeError(f"window {side} reach must be an int or None, got {reach!r}")
        if reach < 0:
            raise ValueError(f"window {side} reach must be >= 0, got {reach}")
    return tuple(window)


def window_mask(
    query_len: int, key_len: int, window, causal: bool, device: torch.device | str | None = None
) -> Tensor:
    """Bool (query_len, key_len) mask, True where query i may NOT attend key j: outside ``i - left <= j <= i + right``
    (positions top-left aligned), or ``j > i`` when ``causal``. The reference path's equivalent of ``window=``."""
    left, right = window if window is not None else (None, None)
    i = torch.arange(query_len, device=device).unsqueeze(1)
    j = torch.arange(key_len, device=device).unsqueeze(0)
    blocked = torch.zeros(query_len, key_len, dtype=torch.bool, device=device)
    if left is not None:
        blocked |= j < i - left
    if right is not None:
        blocked |= j > i + right
    if causal:
        blocked |= j > i
    return blocked


def _padding_as_bool(key_padding_mask: Tensor) -> Tensor | None:
    """The kernel's bool padding mask for ``key_padding_mask``, or None when the kernel cannot express it."""
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    if torch.compiler.is_compiling():
        return None
    # A float mask is additive; only 0 (keep) and -inf (drop) mean padding. Reading the values syncs once.
    is_padding = key_padding_mask == float("-inf")
    return is_padding if bool((is_padding | (key_padding_mask == 0)).all()) else None


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with its attention on ``dlkernels.ops.attention``.

    Same constructor arguments, parameters, ``state_dict`` and ``forward`` as torch's, plus ``window=(left, right)``:
    query i attends key j only if ``i - left <= j <= i + right`` (None on a side: unbounded), composed with
    ``is_causal``. See the module docstring for which calls run the kernel and how the rest behave.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        window=None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.window = window

    @property
    def window(self):
        """``(left, right)`` reach of each query (None: unbounded side), or None for full attention."""
        return self._window

    @window.setter
    def window(self, window) -> None:
        self._window = _check_window(window)

    def extra_repr(self) -> str:
        return f"window={self.window}" if self.window is not None else ""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``; same arguments and results as
        ``torch.nn.MultiheadAttention.forward``, plus this module's ``window``.

        Args (as torch's): ``query`` (L, N, E) or (N, L, E) with ``batch_first``, or (L, E) unbatched; ``key`` and
        ``value`` likewise with S keys (and ``kdim``/``vdim`` features); ``key_padding_mask`` (N, S) bool (True =
        ignore) or float (added to the scores); ``need_weights`` (default True, as torch: returns the weights,
        averaged over heads if ``average_attn_weights``); ``attn_mask`` (L, S) or (N * num_heads, L, S), bool or
        float; ``is_causal`` (a hint that ``attn_mask`` is the causal mask). Returns ``(attn_output,
        attn_weights or None)``, shapes as torch's.

        Which calls run the kernel (``dlkernels.ops.attention``): ``need_weights=False``, no ``bias_k``/``bias_v``,
        no ``add_zero_attn``, no ``attn_mask`` other than with ``is_causal=True``, and a bool (or float 0/-inf)
        ``key_padding_mask``. Everything else runs torch's own forward (with ``window`` turned into an explicit
        mask), and warns once when the caller asked for the output only; ``need_weights=True`` is torch's default
        and runs torch's path silently.

        Differences from torch, all deliberate:

        - ``window=(left, right)``: query i attends key j only if ``i - left <= j <= i + right``.
        - ``is_causal=True`` without ``attn_mask`` means causal attention (torch raises "Need attn_mask if
          specifying the is_causal hint").
        - A query with no key left to attend (all keys padded, or a window that leaves none) gets zero attention
          on the kernel path (so the layer returns ``out_proj.bias`` there, with finite gradients), as torch's
          SDPA path does; torch's ``need_weights=True`` path returns NaN there and so does ours on that path.
        - A NaN query row gives a NaN output row on every path, as torch's math path (``need_weights=True``) does;
          torch's CPU SDPA path returns a finite row for it.
        - ``dropout`` draws its mask from the kernel's own random stream (reproducible under
          ``torch.manual_seed``), not torch's, so dropped elements differ; and
          ``torch.use_deterministic_algorithms(True)`` costs nothing (the kernel's backward has no atomics).
        - Empty sequences and batches return empty results as torch does.
        """
        padding = None
        why_not_kernel = None  # a reason worth a warning: the caller asked for the output only
        if need_weights or query.is_nested or self._torch_must_handle(query, key, value, key_padding_mask):
            kernel = False  # weights requested, or input torch's own code must handle (or reject)
        elif self.bias_k is not None or self.add_zero_attn:
            kernel, why_not_kernel = False, "add_bias_kv and add_zero_attn are not supported by the kernel"
        elif attn_mask is not None and not is_causal:
            kernel, why_not_kernel = False, "an attn_mask other than the is_causal hint is not supported by the kernel"
        elif key_padding_mask is not None and (padding := _padding_as_bool(key_padding_mask)) is None:
            kernel = False
            why_not_kernel = "a key_padding_mask other than bool (or float 0/-inf) is not supported by the kernel"
        else:
            kernel = True
        if kernel:
            return self._kernel_forward(query, key, value, padding, is_causal), None
        # warnings.warn cannot be traced: under torch.compile the fallback is silent (eager mode shows it).
        if why_not_kernel is not None and not torch.compiler.is_compiling() and _kernel_device(query.device):
            _backend.warn_fallback("nn.MultiheadAttention", why_not_kernel)
        return self._reference_forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    def _torch_must_handle(self, query, key, value, key_padding_mask) -> bool:
        """True for input the kernel path does not take (wrong shapes, integer masks): torch's forward then raises
        its own error for it, or handles it as torch does."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return True
        if (query.shape[-1], key.shape[-1], value.shape[-1]) != (self.embed_dim, self.kdim, self.vdim):
            return True
        if key.shape[:-1] != value.shape[:-1]:
            return True
        batched = query.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if batched and query.shape[batch_dim] != key.shape[batch_dim]:
            return True
        if key_padding_mask is None:
            return False
        if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
            return True
        key_len = key.shape[1 - batch_dim] if batched else key.shape[0]
        expected = (key.shape[batch_dim], key_len) if batched else (key_len,)
        return tuple(key_padding_mask.shape) != expected

    def _kernel_forward(self, query, key, value, padding, is_causal) -> Tensor:
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of one, sequence first
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            padding = padding.unsqueeze(0) if padding is not None else None
        sequence_first = not (batched and self.batch_first)
        q, k, v = self._project(query, key, value, self_attention)

        def heads(x: Tensor) -> Tensor:  # (.., E) projections -> (B, H, N, D) views, last stride 1
            x = x.unflatten(-1, (self.num_heads, self.head_dim))
            return x.permute(1, 2, 0, 3) if sequence_first else x.transpose(1, 2)

        out = attention_op(
            heads(q),
            heads(k),
            heads(v),
            causal=is_causal,
            window=self.window,
            key_padding_mask=padding,
            dropout_p=self.dropout if self.training else 0.0,
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        out = out.permute(2, 0, 1, 3) if sequence_first else out.transpose(1, 2)  # (.., .., H, D)
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(1)

    def _project(self, query, key, value, self_attention):
        if not self._qkv_same_embed_dim:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        elif self_attention:  # one matmul for all three
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _reference_forward(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
    ):
        causal_without_mask = is_causal and attn_mask is None
        if self.window is None and not causal_without_mask:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if query.is_nested:
            raise NotImplementedError("dlkernels.nn.MultiheadAttention: nested tensors with window= or is_causal=True "
                                      "without attn_mask are not supported")
        sequence_dim = 1 if query.dim() == 3 and self.batch_first else 0
        blocked = window_mask(
            query.shape[sequence_dim], key.shape[sequence_dim], self.window, causal_without_mask, query.device
        )
        if attn_mask is None:
            # Match the padding mask's kind: torch deprecates mixing bool and float masks.
            float_padding = key_padding_mask is not None and key_padding_mask.is_floating_point()
            attn_mask = _as_additive(blocked, query.dtype) if float_padding else blocked
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | blocked
        else:
            attn_mask = attn_mask.masked_fill(blocked, float("-inf"))
        # The mask now says everything; is_causal=True would let torch drop it in favour of a plain causal mask.
        return super().forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal=False
        )


def _as_additive(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, float("-inf"))


def _kernel_device(device: torch.device) -> bool:
    """Whether ``dlkernels.ops.attention`` would run a kernel (not its reference) for tensors on ``device``."""
    if _backend.get_backend() == "reference":
        return False
    return device.type == "cuda" or (device.type == "cpu" and _backend.interpreter_active())


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` whose ``self_attn`` is a ``dlkernels.nn.MultiheadAttention``.

    Same arguments, parameters (initialised identically for a given seed) and ``state_dict`` as torch's, plus
    ``window=(left, right)`` for the self-attention. ``forward`` always runs the layer's own sublayers, never torch's
    fused eval fast path (``torch._transformer_encoder_layer_fwd``, which would bypass the kernel and the window).
    Inside ``nn.TransformerEncoder``, the encoder's nested-tensor fast path is switched off for these layers (it
    would hand them nested tensors and bypass them too); ``nn.TransformerEncoder`` warns about that when built with
    its default ``enable_nested_tensor=True``, so pass ``enable_nested_tensor=False``.
    """

    def __init__(
        self,
        d_model,
        nhead,
        dim_feedforward=2048,
        dropout=0.1,
        activation=F.relu,
        layer_norm_eps=1e-5,
        batch_first=False,
        norm_first=False,
        bias=True,
        device=None,
        dtype=None,
        *,
        window=None,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        # Adopt the parameters torch just initialised (same values and random stream as torch's layer): build
        # ours without storage and move theirs in.
        initialised = self.self_attn
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, device="meta", dtype=dtype,
            window=window,
        )
        self.self_attn.load_state_dict(initialised.state_dict(), assign=True)
        # nn.TransformerEncoder reads this flag to decide on its nested-tensor fast path; 0 declines it.
        self.activation_relu_or_gelu = 0

    @property
    def window(self):
        return self.self_attn.window

    @window.setter
    def window(self, window) -> None:
        self.self_attn.window = window

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Same arguments and result as ``torch.nn.TransformerEncoderLayer.forward``: ``src`` (S, N, E) or (N, S, E)
        with ``batch_first``, optional ``src_mask``, ``src_key_padding_mask`` and ``is_causal`` hint.

        Differences from torch: the self-attention is this layer's ``dlkernels.nn.MultiheadAttention`` (see its
        ``forward`` for which calls run the kernel and how it differs), with ``window``; torch's fused eval fast
        path (``torch._transformer_encoder_layer_fwd``) is never taken, so eval and training compute the same
        function; ``is_causal=True`` without ``src_mask`` means causal attention.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x
