"""Front-ends: waveforms to spectrogram images, videos to normalised frame clips.

The audio front-end computes what the seed papers compute with librosa (22050 Hz,
``n_fft=2048``, ``hop_length=512``, periodic Hann window, centred frames padded with
zeros, Slaney mel scale and filter normalisation, dB relative to the maximum with an
80 dB floor), but in PyTorch: batched, on any device, without librosa installed. The
tests hold it to librosa's own output whenever librosa imports. librosa is needed only to
read audio files (:func:`load_audio`, ``pip install fastfusion[audio]``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 22050
N_FFT = 2048
HOP_LENGTH = 512
TOP_DB = 80.0

# Per-channel RGB statistics of Kinetics-400, the ones torchvision's r3d_18 was trained with.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono waveform of an audio file resampled to ``sample_rate``, float32 (L,). Needs librosa."""
    try:
        import librosa
    except ImportError as error:
        raise ImportError("load_audio needs librosa: pip install librosa soundfile") from error
    wave, _ = librosa.load(path, sr=sample_rate, mono=True)
    return torch.from_numpy(wave)


def power_spectrogram(wave: torch.Tensor, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """|STFT|^2 of (..., L) waveforms: (..., n_fft // 2 + 1, frames), librosa.stft's framing."""
    window = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    lead = wave.shape[:-1]
    spec = torch.stft(
        wave.reshape(-1, wave.shape[-1]), n_fft, hop_length, window=window,
        center=True, pad_mode="constant", return_complex=True,
    )
    return spec.abs().square().reshape(*lead, *spec.shape[-2:])


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's auditory-toolbox scale: linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz, log_step = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = hz / f_sp
    log_region = hz >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / log_step, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, log_step = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """Triangular filters on the Slaney mel scale, each scaled to unit area per Hz (librosa's
    ``filters.mel`` defaults): float32 (n_mels, n_fft // 2 + 1)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    bin_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))
    widths = np.diff(edges_hz)
    distance = edges_hz[:, None] - bin_hz[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def power_to_db(power: torch.Tensor, top_db: float = TOP_DB, amin: float = 1e-10) -> torch.Tensor:
    """10 log10(power / max) per example (the max over the last two dims, librosa's
    ``ref=np.max``), floored at ``-top_db``: values in [-top_db, 0]."""
    db = 10.0 * torch.log10(power.clamp_min(amin))
    db = db - db.amax(dim=(-2, -1), keepdim=True)
    return db.clamp_min(-top_db)


class SpectrogramImage(nn.Module):
    """Waveforms (..., L) to spectrogram images (..., 1, height, width) in [0, 1].

    ``kind="stft"``: the dB power spectrogram (the seed CNN's input, resized to 224 x 224 in
    the paper); ``kind="logmel"``: the dB mel spectrogram with ``n_mels`` bands. Frequency
    runs along the height (low frequencies first), time along the width. ``size=None``
    keeps the native (bins, frames) shape. dB values map linearly from [-top_db, 0] to [0, 1].
    """

    def __init__(
        self,
        kind: str = "stft",
        *,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        n_mels: int = 128,
        fmax: float | None = None,
        size: Sequence[int] | None = (224, 224),
        top_db: float = TOP_DB,
    ):
        super().__init__()
        if kind not in ("stft", "logmel"):
            raise ValueError(f"kind must be 'stft' or 'logmel', got {kind!r}")
        self.kind, self.n_fft, self.hop_length, self.top_db = kind, n_fft, hop_length, top_db
        self.size = None if size is None else tuple(size)
        mel = mel_filterbank(sample_rate, n_fft, n_mels, fmax=fmax) if kind == "logmel" else torch.empty(0)
        self.register_buffer("mel", mel, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = power_spectrogram(wave, self.n_fft, self.hop_length)
        if self.kind == "logmel":
            power = torch.matmul(self.mel.to(power.dtype), power)
        image = (power_to_db(power, self.top_db) + self.top_db) / self.top_db
        image = image.unsqueeze(-3)
        if self.size is not None:
            lead = image.shape[:-3]
            image = F.interpolate(
                image.reshape(-1, *image.shape[-3:]), size=self.size, mode="bilinear", align_corners=False
            )
            image = image.reshape(*lead, *image.shape[-3:])
        return image

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_fft={self.n_fft}, hop_length={self.hop_length}, size={self.size}"


def sample_frame_indices(
    num_available: int, num_frames: int, *, mode: str = "uniform", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of ``num_frames`` frames out of ``num_available``, in time order.

    The clip is cut into ``num_frames`` equal segments; "uniform" takes each segment's
    middle frame (evaluation), "random" a random frame of each segment (training, as in
    TSN). Clips shorter than ``num_frames`` repeat frames.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame available and requested, got {num_available} and {num_frames}")
    starts = torch.arange(num_frames, dtype=torch.float64) * num_available / num_frames
    if mode == "uniform":
        offsets = torch.full((num_frames,), 0.5, dtype=torch.float64)
    elif mode == "random":
        offsets = torch.rand(num_frames, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"mode must be 'uniform' or 'random', got {mode!r}")
    positions = starts + offsets * num_available / num_frames
    return positions.floor().long().clamp_(0, num_available - 1)


def normalize_clip(
    frames: torch.Tensor,
    *,
    size: Sequence[int] | None = None,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
) -> torch.Tensor:
    """Frames (T, H, W, C), uint8 in [0, 255] or float in [0, 1], to a float clip
    (C, T, H', W') resized to ``size`` (bilinear) and standardised per channel."""
    if frames.dim() != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {tuple(frames.shape)}")
    clip = frames.permute(0, 3, 1, 2)
    clip = clip.float() / 255.0 if clip.dtype == torch.uint8 else clip.float()
    if size is not None:
        clip = F.interpolate(clip, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=clip.dtype, device=clip.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=clip.dtype, device=clip.device).view(1, -1, 1, 1)
    return ((clip - mean_t) / std_t).permute(1, 0, 2, 3).contiguous()
