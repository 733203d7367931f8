"""Sequence models on ``dlkernels.nn``: a BiLSTM tagger, an LSTM language model and a speech Transformer encoder
(convolutional subsampling, then encoder layers with truncated self-attention ``window=(left, right)``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import nn as dlnn
from ..nn.attention import window_mask
from .image import _conv_relu_pool


def _lstm_class(stock: bool):
    return nn.LSTM if stock else dlnn.LSTM


class BiLSTMTagger(nn.Module):
    """Embedding -> bidirectional multi-layer LSTM -> linear tag scores for every token."""

    def __init__(self, vocab: int, tags: int, embedding_dim: int = 128, hidden_size: int = 256, num_layers: int = 2,
                 dropout: float = 0.0, *, stock: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.lstm = _lstm_class(stock)(embedding_dim, hidden_size, num_layers, batch_first=True,
                                       bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden_size, tags)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> tag scores (B, T, tags); ``lengths`` (B,) runs each sequence over its own length only
        (scores past a sequence's end are those of a zero LSTM output)."""
        x = self.dropout(self.embedding(tokens))
        if lengths is None:
            out, _ = self.lstm(x)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=tokens.shape[1])
        return self.classifier(self.dropout(out))


def bilstm_tagger(vocab: int, tags: int, embedding_dim: int = 128, hidden_size: int = 256, num_layers: int = 2,
                  dropout: float = 0.0, *, stock: bool = False) -> BiLSTMTagger:
    """A BiLSTM sequence tagger (see ``BiLSTMTagger``)."""
    return BiLSTMTagger(vocab, tags, embedding_dim, hidden_size, num_layers, dropout, stock=stock)


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer LSTM -> next-token scores; ``tie_weights`` shares the embedding with the output."""

    def __init__(self, vocab: int, embedding_dim: int = 256, hidden_size: int = 512, num_layers: int = 2,
                 dropout: float = 0.0, tie_weights: bool = False, *, stock: bool = False) -> None:
        super().__init__()
        if tie_weights and embedding_dim != hidden_size:
            raise ValueError(f"tie_weights needs embedding_dim == hidden_size, got {embedding_dim} and {hidden_size}")
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.lstm = _lstm_class(stock)(embedding_dim, hidden_size, num_layers, batch_first=True,
                                       dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor, state=None):
        """tokens (B, T) -> (scores (B, T, vocab), (h, c)): pass the state back in to continue a sequence."""
        out, state = self.lstm(self.dropout(self.embedding(tokens)), state)
        return self.decoder(self.dropout(out)), state


def lstm_lm(vocab: int, embedding_dim: int = 256, hidden_size: int = 512, num_layers: int = 2, dropout: float = 0.0,
            tie_weights: bool = False, *, stock: bool = False) -> LSTMLanguageModel:
    """An LSTM language model (see ``LSTMLanguageModel``)."""
    return LSTMLanguageModel(vocab, embedding_dim, hidden_size, num_layers, dropout, tie_weights, stock=stock)


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, dim) sine/cosine position encodings of "Attention Is All You Need"."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return pe.to(dtype)


class SpeechEncoder(nn.Module):
    """Speech features (B, T, input_dim) -> encodings (B, T', d_model) (or scores, with ``num_classes``).

    Front end: two 3x3 stride-2 convolutions with ReLU (one fused conv each) over (time, frequency), so
    ``T' = ((T - 1) // 2 - 1) // 2``, then a linear projection to ``d_model`` plus sine positions. Then
    ``num_layers`` pre-norm Transformer encoder layers whose self-attention sees ``window=(left, right)`` frames
    around each frame (truncated attention: bounded look-back and look-ahead, as streaming recognizers use), and a
    final LayerNorm. The stock version gives its layers the same window as an explicit attention mask.
    """

    def __init__(self, input_dim: int = 80, d_model: int = 256, nhead: int = 4, num_layers: int = 6,
                 dim_feedforward: int = 1024, window: tuple = (64, 16), dropout: float = 0.1,
                 num_classes: Optional[int] = None, *, stock: bool = False) -> None:
        super().__init__()
        freq = ((input_dim - 1) // 2 - 1) // 2
        if freq < 1:
            raise ValueError(f"input_dim must be at least 7 for two stride-2 3x3 convolutions, got {input_dim}")
        self.stock = stock
        self.window = tuple(window) if window is not None else None
        self.subsampling = nn.Sequential(
            *_conv_relu_pool(stock, 1, d_model, 3, stride=2), *_conv_relu_pool(stock, d_model, d_model, 3, stride=2)
        )
        self.input_proj = nn.Linear(d_model * freq, d_model)
        self.dropout = nn.Dropout(dropout)
        extra = {} if stock else {"window": self.window}
        layer = nn.TransformerEncoderLayer if stock else dlnn.TransformerEncoderLayer
        self.layers = nn.ModuleList(
            layer(d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True, **extra)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes) if num_classes else None

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Frames left after subsampling, for input lengths (B,)."""
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, features: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (B, T, input_dim); ``lengths`` (B,) marks the frames past each utterance's end as padding."""
        x = self.subsampling(features.unsqueeze(1))  # (B, C, T', F')
        x = self.input_proj(x.permute(0, 2, 1, 3).flatten(2))
        steps = x.shape[1]
        x = self.dropout(x + sinusoidal_positions(steps, x.shape[2], x.device, x.dtype))
        padding = None
        if lengths is not None:
            padding = torch.arange(steps, device=x.device) >= self.output_lengths(lengths).to(x.device)[:, None]
        mask = window_mask(steps, steps, self.window, False, x.device) if self.stock and self.window else None
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=padding)
        x = self.norm(x)
        return self.head(x) if self.head is not None else x


def speech_encoder(input_dim: int = 80, d_model: int = 256, nhead: int = 4, num_layers: int = 6,
                   dim_feedforward: int = 1024, window: tuple = (64, 16), dropout: float = 0.1,
                   num_classes: Optional[int] = None, *, stock: bool = False) -> SpeechEncoder:
    """A speech Transformer encoder with truncated self-attention (see ``SpeechEncoder``)."""
    return SpeechEncoder(input_dim, d_model, nhead, num_layers, dim_feedforward, window, dropout, num_classes,
                         stock=stock)
