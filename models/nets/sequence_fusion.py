"""The LMF seed model (Liu et al. 2018) and its TFN counterpart (Zadeh et al. 2017) with an
LSTM sub-network per modality, for any number of modalities.

Each modality's sequence (B, T_m, n_m) goes through an LSTM; its last hidden state, after
dropout and a linear layer, is that modality's vector (the official LMF code's text
sub-network, used here for every modality). Then:

- LMF: ``fastfusion.LowRankFusion`` straight to the outputs, as in the LMF paper;
- TFN: ``fastfusion.TensorFusion`` to ``post_fusion_dim`` and TFN's post-fusion network
  (ReLU, linear, ReLU, linear).

``task="regression"`` gives one output per sample (sentiment); TFN squashes it into
[-3, 3] with a scaled sigmoid as the official TFN does, LMF leaves it unbounded as the
official LMF does. ``task="classification"`` gives ``num_classes`` logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import fastfusion

TASKS = ("regression", "classification")


class LSTMSubNet(nn.Module):
    """(B, T, in_dim) -> (B, out_dim): LSTM, last hidden state, dropout, linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dropout: float = 0.2):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_dim, out_dim)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        _, (last_hidden, _) = self.lstm(sequence)
        return self.linear(self.dropout(last_hidden[-1]))


class _SequenceFusionNet(nn.Module):
    def __init__(self, in_dims, hidden_dims, out_dims, task, num_classes, dropout):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if not len(in_dims) == len(hidden_dims) == len(out_dims) >= 2:
            raise ValueError(
                f"in_dims, hidden_dims and out_dims need one entry per modality (at least 2), "
                f"got {len(in_dims)}, {len(hidden_dims)}, {len(out_dims)}"
            )
        self.task = task
        self.num_outputs = 1 if task == "regression" else num_classes
        self.subnets = nn.ModuleList(
            LSTMSubNet(n, h, o, dropout=dropout) for n, h, o in zip(in_dims, hidden_dims, out_dims)
        )

    def encode(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(sequences) != len(self.subnets):
            raise ValueError(f"forward expects {len(self.subnets)} sequences, one per modality, got {len(sequences)}")
        return [net(seq) for net, seq in zip(self.subnets, sequences)]

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        return out.squeeze(-1) if self.task == "regression" else out


class LMFNet(_SequenceFusionNet):
    """LSTM sub-networks + low-rank fusion. forward(*sequences) -> (B,) or (B, num_classes).

    Defaults follow the LMF paper's CMU-MOSI set-up (hidden sizes 32/32/128 for audio,
    video, text; rank 4).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        hidden_dims: Sequence[int] = (32, 32, 128),
        out_dims: Sequence[int] | None = None,
        *,
        rank: int = 4,
        task: str = "regression",
        num_classes: int = 2,
        dropout: float = 0.2,
    ):
        out_dims = tuple(hidden_dims) if out_dims is None else tuple(out_dims)
        super().__init__(tuple(in_dims), tuple(hidden_dims), out_dims, task, num_classes, dropout)
        self.fusion = fastfusion.LowRankFusion(list(out_dims), self.num_outputs, rank=rank)

    def forward(self, *sequences: torch.Tensor) -> torch.Tensor:
        return self._finish(self.fusion(*self.encode(sequences)))


class TFNNet(_SequenceFusionNet):
    """LSTM sub-networks + tensor fusion + TFN's post-fusion network.
    forward(*sequences) -> (B,) or (B, num_classes)."""

    def __init__(
        self,
        in_dims: Sequence[int],
        hidden_dims: Sequence[int] = (32, 32, 128),
        out_dims: Sequence[int] | None = None,
        *,
        post_fusion_dim: int = 128,
        task: str = "regression",
        num_classes: int = 2,
        dropout: float = 0.2,
    ):
        out_dims = tuple(hidden_dims) if out_dims is None else tuple(out_dims)
        super().__init__(tuple(in_dims), tuple(hidden_dims), out_dims, task, num_classes, dropout)
        self.fusion = fastfusion.TensorFusion(list(out_dims), post_fusion_dim)
        self.post_fusion = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(post_fusion_dim, post_fusion_dim), nn.ReLU(),
            nn.Linear(post_fusion_dim, self.num_outputs),
        )

    def forward(self, *sequences: torch.Tensor) -> torch.Tensor:
        out = self.post_fusion(self.fusion(*self.encode(sequences)))
        if self.task == "regression":
            out = 6.0 * torch.sigmoid(out) - 3.0
        return self._finish(out)


class AudioVideoSequences(nn.Module):
    """Feeds the audio-video dataset's tensors to a sequence model: the spectrogram image
    (B, 1, F, W) as W steps of F features, the clip (B, 3, T, H, W) as T steps of 3 H W
    pixels. forward(audio, video) -> the wrapped model's output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        audio_steps = audio.flatten(1, -2).transpose(1, 2)
        video_steps = video.transpose(1, 2).flatten(2)
        return self.model(audio_steps, video_steps)
