"""Decoding the corpora's media files: mono waveforms and RGB frames.

``.wav`` files go through :func:`models.features.frontends.load_audio` (librosa and soundfile);
every other container (``.mp4``, ``.flv``, ...) through PyAV, whose wheels bundle FFmpeg
(``pip install av``). The ``corpora`` extra installs all three. Both imports happen on
first use, so the rest of :mod:`models` works without either library.

A damaged ``.wav`` does not always fail to decode: a truncated one decodes as the few
samples present, an empty one fails inside audioread with a bare ``EOFError``.
:func:`wave_problem` reads the header and says what is wrong, so readers can refuse or
skip the file by name.

Both readers take an optional span, ``start`` and ``end`` in seconds from the start of
the file, for corpora whose labels cut one long recording into segments (CMU-MOSEI): a
video is seeked to the keyframe before ``start`` and decoded up to ``end`` only, so a
segment costs its own length to decode, not the whole video's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..features.frontends import load_audio

WAVE_SUFFIXES = (".wav",)
VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".mov")


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("decoding video files needs PyAV: pip install av (part of fastfusion[corpora])") from error
    return av


def read_audio(
    path: str | Path, sample_rate: int, min_samples: int = 1, *, start: float | None = None, end: float | None = None
) -> torch.Tensor:
    """Mono float32 waveform (L,) at ``sample_rate``: a ``.wav`` file, or the first audio
    track of a video container; with ``start`` / ``end`` (seconds), only the samples of
    [start, end). A damaged ``.wav`` (:func:`wave_problem`) or fewer than ``min_samples``
    samples raise ValueError naming the file (and the span)."""
    path = Path(path)
    _check_span(start, end)
    where = path if start is None and end is None else f"{path} [{_seconds(start)}, {_seconds(end)}) s"
    if path.suffix.lower() in WAVE_SUFFIXES:
        problem = wave_problem(path, sample_rate, min_samples if start is None and end is None else 1)
        if problem is not None:
            raise ValueError(f"{path} {problem}")
        if start is None and end is None:
            wave = load_audio(str(path), sample_rate)
        else:
            wave = _read_wave_span(path, sample_rate, start, end)
    else:
        wave = _read_audio_track(path, sample_rate, start, end)
    if wave.numel() == 0:
        raise ValueError(f"{where} holds no audio samples")
    if wave.numel() < min_samples:
        raise ValueError(f"{where} holds {wave.numel()} audio samples at {sample_rate} Hz, fewer than {min_samples}")
    return wave


def _check_span(start: float | None, end: float | None) -> None:
    if start is not None and not start >= 0:
        raise ValueError(f"start must be a time >= 0 in seconds, got {start}")
    if end is not None and not end > (start or 0):
        raise ValueError(f"end must be a time after start ({start or 0} s), got {end}")


def _seconds(value: float | None) -> str:
    return "..." if value is None else f"{value:g}"


def _read_wave_span(path: Path, sample_rate: int, start: float | None, end: float | None) -> torch.Tensor:
    # soundfile seeks to the span; only the span is downmixed and resampled.
    import librosa
    import soundfile

    info = soundfile.info(str(path))
    first = min(info.frames, round((start or 0.0) * info.samplerate))
    last = info.frames if end is None else min(info.frames, max(first, round(end * info.samplerate)))
    wave, rate = soundfile.read(str(path), start=first, stop=last, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != sample_rate and len(wave):
        wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def wave_problem(path: str | Path, sample_rate: int, min_samples: int = 1) -> str | None:
    """What makes the ``.wav`` file at ``path`` unusable, or None: it is empty, not
    RIFF/WAVE, truncated (its header declares more audio than the file holds), or shorter
    than ``min_samples`` samples at ``sample_rate``. Reads the header only; the answer
    reads after the path ("x.wav is empty")."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    with open(path, "rb") as file:
        head = file.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:] != b"WAVE":
            return "is not a RIFF/WAVE file"
        while True:
            chunk = file.read(8)
            if len(chunk) < 8:
                return "has no audio data (no data chunk)"
            kind, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"data":
                break
            file.seek(length + length % 2, os.SEEK_CUR)  # chunks are padded to an even size
        present = size - file.tell()
    # RF64 files and streaming writers may declare 0xFFFFFFFF: "up to the end of the file".
    if length != 0xFFFFFFFF and length > present:
        return f"is truncated: its header declares {length} bytes of audio, {present} are present"
    try:
        import soundfile
    except ImportError as error:
        raise ImportError("reading .wav files needs soundfile: pip install soundfile "
                          "(part of fastfusion[corpora])") from error
    try:
        info = soundfile.info(str(path))
    except RuntimeError as error:  # soundfile.LibsndfileError
        return f"cannot be decoded ({error})"
    if info.frames * sample_rate < min_samples * info.samplerate:
        return (f"holds {info.frames} samples at {info.samplerate} Hz ({1000 * info.frames / info.samplerate:.0f} ms), "
                f"fewer than {min_samples} at {sample_rate} Hz ({1000 * min_samples / sample_rate:.0f} ms)")
    return None


def _read_audio_track(
    path: Path, sample_rate: int, start: float | None = None, end: float | None = None
) -> torch.Tensor:
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track")
        stream = container.streams.audio[0]
        if start:
            container.seek(int(start / stream.time_base), stream=stream)
        # FFmpeg's resampler downmixes and converts rate and sample format in one pass.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, first = [], None
        for frame in container.decode(stream):
            if end is not None and frame.time is not None and frame.time >= end:
                break
            if first is None:
                first = frame.time or 0.0
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if chunks and (start is not None or end is not None):
        # The decoded audio starts at the first frame's time, at or before start: trim to the span.
        begin = max(0, round(((start or 0.0) - first) * sample_rate))
        stop = None if end is None else max(begin, round((end - first) * sample_rate))
        wave = wave[begin:stop]
    return torch.from_numpy(np.ascontiguousarray(wave))


def read_frames(
    path: str | Path, size: int, *, start: float | None = None, end: float | None = None
) -> tuple[torch.Tensor, float]:
    """Every frame of a video as uint8 (T, size, size, 3) RGB, and the frame rate; with
    ``start`` / ``end`` (seconds), the frames whose timestamps lie in [start, end).

    Each frame is scaled (area interpolation, inside FFmpeg) so its short side is ``size``,
    then the long side is centre-cropped: the speaker sits in the middle of the frame in
    both RAVDESS and CREMA-D, and a square crop keeps the face's aspect ratio, which a
    plain resize of a 16:9 frame would squash. Scaling during decoding keeps a clip of a
    few seconds at a few MB, however large the source frames.
    """
    av = _import_av()
    path = Path(path)
    _check_span(start, end)
    spanned = start is not None or end is not None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        scale = size / min(width, height)
        scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
        if start:
            container.seek(int(start / stream.time_base), stream=stream)  # the keyframe at or before start
        frames = []
        for frame in container.decode(stream):
            if spanned and frame.time is None:
                raise ValueError(f"{path} has frames without timestamps: a span of it cannot be read")
            if end is not None and frame.time >= end:
                break
            if start is not None and frame.time < start:
                continue  # decoded from the keyframe on, but before the span
            frames.append(frame.to_ndarray(format="rgb24", width=scaled[0], height=scaled[1], interpolation="AREA"))
        fps = float(stream.average_rate) if stream.average_rate else float("nan")
    if not frames:
        where = f" in [{_seconds(start)}, {_seconds(end)}) s" if spanned else ""
        raise ValueError(f"{path} holds no video frames{where}")
    clip = np.stack(frames)
    top, left = (clip.shape[1] - size) // 2, (clip.shape[2] - size) // 2
    return torch.from_numpy(np.ascontiguousarray(clip[:, top:top + size, left:left + size])), fps
