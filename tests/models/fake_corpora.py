"""Tiny fake corpora in the real layouts, written with real codecs (PyAV, soundfile), for
the reader tests. Their content depends on the emotion, so the hand-crafted pipeline can
also learn from them: the voice's pitch rises with the class index, and a bright blob
moves across the frame at a class-dependent height and speed, turning back mid-clip for
odd classes."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FPS = 16


def clip(label: int, speaker: int, *, take: int = 0, num_frames: int = 8, height: int = 32, width: int = 48,
         duration: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(mono float32 waveform at SAMPLE_RATE, uint8 (T, H, W, 3) frames) of one performance."""
    rng = np.random.default_rng([label, speaker, take])
    t = np.arange(round(duration * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120.0 * 2.0 ** (label / 6) * (1 + 0.03 * rng.standard_normal())
    voice = sum(np.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 4))
    wave = 0.3 * voice * np.sin(math.pi * t / duration) + 0.01 * rng.standard_normal(t.size)
    y, x = np.mgrid[:height, :width]
    background = 40 + 5 * (speaker % 4)
    frames = []
    for i in range(num_frames):
        progress = i / (num_frames - 1)
        if label % 2:
            progress = 1 - abs(2 * progress - 1)  # out and back
        cx = 8 + progress * (width - 16) * (0.4 + 0.1 * label)
        cy = 8 + (label % 4) * (height - 16) / 3
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 3.0**2))
        grey = background + 200 * blob + rng.normal(0, 2, blob.shape)
        frames.append(np.repeat(grey[..., None], 3, axis=-1))
    return wave.astype(np.float32), np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def write_wav(path: Path, wave: np.ndarray) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, SAMPLE_RATE)


def write_video(path: Path, frames: np.ndarray, wave: np.ndarray | None = None) -> None:
    """An .mp4 (MPEG-4 part 2 + AAC) or .flv (Sorenson H.263 + AAC) file, audio optional."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("flv" if path.suffix == ".flv" else "mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = None if wave is None else container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in [*audio.encode(frame), *audio.encode(None)]:
                container.mux(packet)


def make_ravdess(root: Path, *, actors=(1, 2, 3, 4), emotions=range(1, 9), wav: bool = True, av_mp4: bool = True,
                 video_only: bool = False, song: bool = False) -> None:
    """The official zips' layout: Audio_Speech_Actors_01-24/Actor_XX/03-...wav and
    Video_Speech_Actor_XX/Actor_XX/0{1,2}-...mp4; song files (vocal channel 02) beside."""
    channels = (1, 2) if song else (1,)
    for actor in actors:
        for channel in channels:
            for emotion in emotions:
                wave, frames = clip(emotion - 1, actor, take=channel)
                codes = f"{channel:02d}-{emotion:02d}-01-01-01-{actor:02d}"
                kind = "Speech" if channel == 1 else "Song"
                if wav:
                    write_wav(root / f"Audio_{kind}_Actors_01-24" / f"Actor_{actor:02d}" / f"03-{codes}.wav", wave)
                video_dir = root / f"Video_{kind}_Actor_{actor:02d}" / f"Actor_{actor:02d}"
                if av_mp4:
                    write_video(video_dir / f"01-{codes}.mp4", frames, wave)
                if video_only:
                    write_video(video_dir / f"02-{codes}.mp4", frames)
    (root / "README.txt").write_text("not a recording\n")


CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def make_cremad(root: Path, *, actors=(1001, 1002, 1003, 1004), sentences=("DFA", "IEO"), wav: bool = True,
                video_suffix: str | None = ".flv", demographics: bool = True) -> None:
    """AudioWAV/AAAA_SSS_EEE_LL.wav, VideoFlash/AAAA_SSS_EEE_LL.flv, VideoDemographics.csv."""
    for actor in actors:
        for take, sentence in enumerate(sentences):
            for label, emotion in enumerate(CREMAD_EMOTIONS):
                wave, frames = clip(label, actor, take=take)
                stem = f"{actor}_{sentence}_{emotion}_{'XX' if emotion == 'NEU' else 'HI'}"
                if wav:
                    write_wav(root / "AudioWAV" / f"{stem}.wav", wave)
                if video_suffix:
                    write_video(root / "VideoFlash" / f"{stem}{video_suffix}", frames, wave)
    if demographics:
        rows = [f"{a},{30 + a % 7},{'Male' if a % 2 else 'Female'},Caucasian,Not Hispanic" for a in actors]
        (root / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n" + "\n".join(rows) + "\n")


def make_mosei(path: Path, *, layout: str = "mult", sizes=(12, 4, 5), steps: int = 6, dims=(5, 4, 7),
               seed: int = 0) -> dict:
    """A pickle in one of the toolkits' layouts; returns the dict it wrote.

    "mult": labels (N, 1, 1) and an id array; "all_labels": labels (N, 1, 7), sentiment
    then six emotions; "mmsa": regression_labels (N,), with extra keys the reader ignores.
    """
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        sentiment = rng.uniform(-3, 3, n).round(1)
        sentiment[0] = 0.0
        part = {"audio": rng.standard_normal((n, steps, dims[0])).astype(np.float32),
                "vision": rng.standard_normal((n, steps, dims[1])).astype(np.float32),
                "text": rng.standard_normal((n, steps, dims[2])).astype(np.float32)}
        part["audio"][0, 0, 0] = -np.inf  # COVAREP's log of silence
        if layout == "mult":
            part["labels"] = sentiment.reshape(n, 1, 1).astype(np.float32)
            part["id"] = np.array([[f"video{i}", str(i), "0"] for i in range(n)])
        elif layout == "all_labels":
            emotions = rng.uniform(0, 3, (n, 6))
            part["labels"] = np.concatenate([sentiment[:, None], emotions], 1).reshape(n, 1, 7).astype(np.float32)
        elif layout == "mmsa":
            part["regression_labels"] = sentiment.astype(np.float32)
            part["raw_text"] = np.array([f"segment {i}" for i in range(n)])
        else:
            raise ValueError(layout)
        data[split] = part
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle)
    return data


MOSEI_VIDEOS = ("-3g5yACwYnA", "81406", "_UNQDdiAbWI", "zx4W0Vuus-I", "2iD-tVS8NPw", "aMtFBGh2wKI")


def make_mosei_media(root: Path, *, videos=MOSEI_VIDEOS, segments: int = 3, segment_s: float = 0.5, gap_s: float = 0.25,
                     emotions: bool = True, wav: bool = True, seed: int = 0) -> dict:
    """The CMU-MOSEI raw release's layout: full-length Raw/Audio/Full/WAV_16000/<id>.wav and
    Raw/Videos/Full/Combined/<id>.mp4 (with an AAC track), and CMU_MOSEI_Labels.csd, an
    HDF5 computational sequence ("All Labels": per video, features (N, 7) and intervals
    (N, 2)) written with h5py as the SDK writes it. Returns {video id: (labels (N, 7 or 1),
    intervals (N, 2))}.

    Each video is a silent lead-in of ``gap_s``, then ``segments`` labelled segments of
    ``segment_s`` separated by silent, dark gaps; a segment's voice and moving blob come
    from :func:`clip` with its 7-class sentiment as the label, so reading the wrong span
    gives the wrong pitch. A pre-segmented clip (Videos/Segmented/Combined/<id>_0.mp4) and
    the COVAREP folder sit beside, as in the release; the reader must ignore both."""
    rng = np.random.default_rng(seed)
    written = {}
    for number, vid in enumerate(videos):
        sentiment = rng.uniform(-3, 3, segments).round(2)
        rows = np.concatenate([sentiment[:, None], rng.uniform(0, 3, (segments, 6)).round(2)], 1)
        rows = rows if emotions else rows[:, :1]
        waves, frame_runs, intervals = [], [], []
        gap_wave = np.zeros(round(gap_s * SAMPLE_RATE), np.float32)
        gap_frames = np.full((round(gap_s * FPS), 32, 48, 3), 10, np.uint8)
        t = gap_s
        for i, score in enumerate(sentiment):
            wave, frames = clip(int(np.round(score)) + 3, number, take=i, num_frames=round(segment_s * FPS),
                                duration=segment_s)
            waves += [gap_wave, wave]
            frame_runs += [gap_frames, frames]
            intervals.append((t, t + segment_s))
            t += segment_s + gap_s
        waves.append(gap_wave)
        frame_runs.append(gap_frames)
        wave, frames = np.concatenate(waves), np.concatenate(frame_runs)
        if wav:
            write_wav(root / "Raw" / "Audio" / "Full" / "WAV_16000" / f"{vid}.wav", wave)
        write_video(root / "Raw" / "Videos" / "Full" / "Combined" / f"{vid}.mp4", frames, wave)
        written[vid] = (rows, np.array(intervals))
    first = videos[0]
    segmented = root / "Raw" / "Videos" / "Segmented" / "Combined" / f"{first}_0.mp4"
    write_video(segmented, np.zeros((4, 16, 16, 3), np.uint8))
    (root / "Raw" / "Audio" / "Full" / "COVAREP").mkdir(parents=True, exist_ok=True)
    (root / "Raw" / "Audio" / "Full" / "COVAREP" / f"{first}.mat").write_bytes(b"not read")
    write_csd(root / "CMU_MOSEI_Labels.csd", "All Labels", written)
    return written


def write_csd(path: Path, name: str, sequences: dict) -> None:
    """A computational sequence: /name/data/<id>/{features, intervals} and /name/metadata
    of JSON strings, the CMU Multimodal SDK's .csd layout."""
    import json

    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        group = file.create_group(name)
        data = group.create_group("data")
        for vid, (features, intervals) in sequences.items():
            entry = data.create_group(vid)
            entry.create_dataset("features", data=features)
            entry.create_dataset("intervals", data=intervals)
        metadata = group.create_group("metadata")
        for key, value in {"root name": name, "dimension names": ["sentiment", "happy", "sad", "anger", "surprise",
                                                                   "disgust", "fear"]}.items():
            metadata.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
            metadata[key][0] = json.dumps(value)
