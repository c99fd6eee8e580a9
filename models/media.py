"""Decoding the corpora's media files: mono waveforms and RGB frames.

``.wav`` files go through :func:`models.frontends.load_audio` (librosa and soundfile);
every other container (``.mp4``, ``.flv``, ...) through PyAV, whose wheels bundle FFmpeg
(``pip install av``). The ``corpora`` extra installs all three. Both imports happen on
first use, so the rest of :mod:`models` works without either library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .frontends import load_audio

WAVE_SUFFIXES = (".wav",)
VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".mov")


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("decoding video files needs PyAV: pip install av (part of fastfusion[corpora])") from error
    return av


def read_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform (L,) at ``sample_rate``: a ``.wav`` file, or the first audio
    track of a video container."""
    path = Path(path)
    if path.suffix.lower() in WAVE_SUFFIXES:
        wave = load_audio(str(path), sample_rate)
    else:
        wave = _read_audio_track(path, sample_rate)
    if wave.numel() == 0:
        raise ValueError(f"{path} holds no audio samples")
    return wave


def _read_audio_track(path: Path, sample_rate: int) -> torch.Tensor:
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track")
        # FFmpeg's resampler downmixes and converts rate and sample format in one pass.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(container.streams.audio[0]):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)


def read_frames(path: str | Path, size: int) -> tuple[torch.Tensor, float]:
    """Every frame of a video as uint8 (T, size, size, 3) RGB, and the frame rate.

    Each frame is scaled (area interpolation, inside FFmpeg) so its short side is ``size``,
    then the long side is centre-cropped: the speaker sits in the middle of the frame in
    both RAVDESS and CREMA-D, and a square crop keeps the face's aspect ratio, which a
    plain resize of a 16:9 frame would squash. Scaling during decoding keeps a clip of a
    few seconds at a few MB, however large the source frames.
    """
    av = _import_av()
    path = Path(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        scale = size / min(width, height)
        scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
        frames = [
            frame.to_ndarray(format="rgb24", width=scaled[0], height=scaled[1], interpolation="AREA")
            for frame in container.decode(stream)
        ]
        fps = float(stream.average_rate) if stream.average_rate else float("nan")
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    clip = np.stack(frames)
    top, left = (clip.shape[1] - size) // 2, (clip.shape[2] - size) // 2
    return torch.from_numpy(np.ascontiguousarray(clip[:, top:top + size, left:left + size])), fps
