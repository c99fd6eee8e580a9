"""Readers of the emotion corpora on local disk (never downloaded), in the item format of
:class:`models.datasets.data.SyntheticAVEmotion`, so the training loop and models take them as
they are.

- :class:`RAVDESS`: 24 actors, 8 emotions, speech (default) and song;
- :class:`CremaD`: 91 actors, 6 emotions;
- CMU-MOSEI lives in :mod:`models.datasets.mosei` (feature pickles, or the raw release's media);
- :func:`build_corpus`: train / validation / test sets of any of them by name.

Splits are speaker-independent: every actor's clips fall in exactly one of train,
validation and test (:func:`speaker_split`), as the seed papers' protocols require;
random clip-level splits leak the speaker's voice and face into the test set.

What an item holds is the frontend's business: :class:`ImageFrontend` gives the synthetic
dataset's tensors (spectrogram image, normalised clip), :class:`~models.features.handcrafted.
HandcraftedFrontend` the seed system's hand-crafted vectors. Either way, features are
computed once per file and kept in a :class:`~models.datasets.feature_cache.FeatureCache`, so a
second epoch (or a second run) decodes nothing. The expected layouts are in
``models/DATASETS.md`` and in the error raised when no file is found.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import warnings
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..features.frontends import N_FFT, SpectrogramImage, normalize_clip, sample_frame_indices
from ..features.handcrafted import HandcraftedFrontend
from .data import TINY, SyntheticConfig
from .feature_cache import FeatureCache, default_cache_dir
from .media import VIDEO_SUFFIXES, WAVE_SUFFIXES, read_audio, read_frames, wave_problem

MODALITIES = ("audio", "video")
SPLITS = ("train", "val", "test")
# Both frontends frame audio in N_FFT-sample windows at their sample rate: a shorter
# recording is one frame of mostly padding, no utterance.
MIN_AUDIO_SAMPLES = N_FFT


class ImageFrontend:
    """Media to the synthetic dataset's tensors under ``config``: ``audio`` (1, H_a, W_a)
    spectrogram image of the whole utterance, ``video`` (3, T, H, W) clip of
    ``config.num_frames`` frames taken at the middles of equal segments (deterministic, so
    the result can be cached), standardised with the Kinetics statistics.

    Frontends work in two steps: ``__call__`` computes what the cache keeps, ``finish``
    turns that into the item. Here the cache keeps the sampled frames as uint8 and
    ``finish`` standardises them, a quarter of the float clip's size (at the paper's
    16 x 224 x 224, 2.4 MB instead of 9.6 MB a clip)."""

    def __init__(self, config: SyntheticConfig = TINY):
        self.sample_rate, self.frame_size, self.num_frames = config.sample_rate, config.frame_size, config.num_frames
        self.spectrogram = SpectrogramImage(
            config.audio_kind, sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
            n_mels=config.n_mels, size=config.audio_size,
        )
        self.config_key = (f"image(sr={config.sample_rate}, n_fft={config.n_fft}, hop={config.hop_length}, "
                           f"{config.audio_kind}, mels={config.n_mels}, audio={config.audio_size}, "
                           f"frame={config.frame_size}, frames={config.num_frames})")

    def __call__(self, wave: torch.Tensor | None, frames: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            if wave is not None:
                out["audio"] = self.spectrogram(wave)
            if frames is not None:
                out["video"] = frames[sample_frame_indices(len(frames), self.num_frames)]
        return out

    def finish(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "video" in features:
            features = {**features, "video": normalize_clip(features["video"])}
        return features


@dataclasses.dataclass(frozen=True)
class Recording:
    """One performance: its label, its speaker and the files its modalities come from."""

    name: str
    label: int
    speaker: int
    audio: Path | None
    video: Path | None


def speaker_split(
    speakers: Collection[int],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    groups: dict[int, str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Disjoint train / val / test speaker sets covering ``speakers``.

    Each group (e.g. gender) is shuffled with ``seed`` and the groups are interleaved, so
    taking test speakers first, then validation ones, balances the groups in each set.
    A non-zero fraction gives at least one speaker, and train keeps at least one.
    """
    speakers = sorted(set(speakers))
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(f"fractions must lie in [0, 1), got val={val_fraction}, test={test_fraction}")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for s in speakers:
        by_group.setdefault((groups or {}).get(s, ""), []).append(s)
    shuffled = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_group.items())]
    order = [group[rank] for rank in range(max(map(len, shuffled))) for group in shuffled if rank < len(group)]

    def count(fraction: float) -> int:
        return max(1, round(fraction * len(order))) if fraction > 0 else 0

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val >= len(order):
        raise ValueError(f"{len(order)} speakers are too few for test={n_test} and val={n_val} "
                         "with one left to train on")
    return {
        "test": tuple(sorted(order[:n_test])),
        "val": tuple(sorted(order[n_test:n_test + n_val])),
        "train": tuple(sorted(order[n_test + n_val:])),
    }


class MediaCorpus(Dataset):
    """A corpus of audio-video recordings with one emotion label each (base class).

    ``split``: "train", "val", "test" (a :func:`speaker_split` of the speakers present,
    with ``val_fraction``, ``test_fraction`` and ``seed``) or "all"; ``speakers`` picks
    speakers explicitly instead. ``modalities``: the item keys wanted; recordings lacking
    a file for one of them are left out (so ``modalities=("audio",)`` reads an audio-only
    download, with no video file at all), and so are those whose ``.wav`` is damaged or
    shorter than :data:`MIN_AUDIO_SAMPLES` (each with a warning; :attr:`skipped` lists
    them with the reason). ``frontend``: :class:`ImageFrontend` (default),
    :class:`~models.features.handcrafted.HandcraftedFrontend`, or any object with their
    ``sample_rate``, ``frame_size``, ``config_key``, ``__call__(wave, frames)`` and
    ``finish(features)``. ``cache_dir``: "auto" for
    :func:`~models.datasets.feature_cache.default_cache_dir`, a path, or None for no cache.

    Item: the frontend's tensors plus ``label`` (int64, index into ``CLASS_NAMES``) and
    ``speaker`` (int64, the corpus's actor id).
    """

    CORPUS = ""
    CLASS_NAMES: tuple[str, ...] = ()
    LAYOUT = ""

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "all",
        speakers: Collection[int] | None = None,
        modalities: Sequence[str] = MODALITIES,
        frontend=None,
        cache_dir: str | Path | None = "auto",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        self.root = Path(root)
        self.modalities = tuple(modalities)
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        if speakers is not None and split != "all":
            raise ValueError("give either split or speakers, not both")
        if not self.root.is_dir():
            raise FileNotFoundError(self._missing(f"{self.root} is not a directory"))
        found = self._scan()
        if not found:
            raise FileNotFoundError(self._missing(f"no {self.CORPUS} file names found under {self.root}"))
        usable = [r for r in found if all(getattr(r, m) is not None for m in self.modalities)]
        if not usable:
            # An audio-only download (RAVDESS's Audio_Speech_Actors_01-24) is the usual case:
            # say which modalities the files do have, so the fix is to select them.
            have = {m: sum(getattr(r, m) is not None for r in found) for m in MODALITIES}
            counts = ", ".join(f"{n} with {m}" for m, n in have.items())
            present = [m for m, n in have.items() if n]
            hint = (f"; select modalities=('{present[0]}',) (python -m models.train --modalities {present[0]} "
                    f"--model unimodal)" if len(present) == 1 else "")
            raise FileNotFoundError(self._missing(
                f"{len(found)} {self.CORPUS} recordings under {self.root} ({counts}), none with files for "
                f"{self.modalities}{hint}"))
        if speakers is None and split != "all":
            partition = speaker_split({r.speaker for r in usable}, val_fraction=val_fraction,
                                      test_fraction=test_fraction, seed=seed, groups=self._speaker_groups())
            speakers = partition[split]
        self.speakers = tuple(sorted({r.speaker for r in usable} if speakers is None else set(speakers)))
        self.frontend = ImageFrontend() if frontend is None else frontend
        # Skipped after the split, so that damaged files never move a speaker between splits.
        wanted = [r for r in usable if r.speaker in self.speakers]
        self.recordings, self.skipped = self._skip_damaged_audio(wanted)
        if wanted and not self.recordings:
            raise ValueError(f"all {len(wanted)} {self.CORPUS} recordings of speakers {self.speakers} under "
                             f"{self.root} were skipped: their audio files are damaged (see the warnings)")
        self.cache = FeatureCache(default_cache_dir() if cache_dir == "auto" else cache_dir)

    def _skip_damaged_audio(self, recordings: list[Recording]) -> tuple[list[Recording], tuple[tuple[Path, str], ...]]:
        """The recordings whose ``.wav`` is usable, and (file, problem) of the others.

        A truncated ``.wav`` would train silently as its first few samples and an empty one
        fail mid-epoch; reading the headers now costs a few ms a file. Audio tracks of video
        containers are checked when decoded (:meth:`_extract`)."""
        if "audio" not in self.modalities:
            return recordings, ()
        kept, skipped = [], []
        for recording in recordings:
            problem = None
            if recording.audio.suffix.lower() in WAVE_SUFFIXES:
                problem = wave_problem(recording.audio, self.frontend.sample_rate, MIN_AUDIO_SAMPLES)
            if problem is None:
                kept.append(recording)
            else:
                warnings.warn(f"skipping {self.CORPUS} recording {recording.name}: {recording.audio} {problem}", stacklevel=2)
                skipped.append((recording.audio, problem))
        return kept, tuple(skipped)

    def _scan(self) -> list[Recording]:
        raise NotImplementedError

    def _speaker_groups(self) -> dict[int, str] | None:
        """Speaker -> group (e.g. gender) to balance the splits by, when known."""
        return None

    def _missing(self, what: str) -> str:
        return f"{what}.\nExpected {self.CORPUS} layout (see models/DATASETS.md):\n{self.LAYOUT}"

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r.label for r in self.recordings])

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        recording = self.recordings[index]
        sources = [getattr(recording, m) for m in self.modalities]
        config = f"{self.frontend.config_key}|{'+'.join(self.modalities)}"
        features = self.frontend.finish(self.cache.get(sources, config, lambda: self._extract(recording)))
        return {**features, "label": torch.tensor(recording.label), "speaker": torch.tensor(recording.speaker)}

    def _extract(self, recording: Recording) -> dict[str, torch.Tensor]:
        wave = (read_audio(recording.audio, self.frontend.sample_rate, MIN_AUDIO_SAMPLES)
                if "audio" in self.modalities else None)
        frames = read_frames(recording.video, self.frontend.frame_size)[0] if "video" in self.modalities else None
        return self.frontend(wave, frames)


def _codes(path: Path, pattern: re.Pattern) -> tuple[str, ...] | None:
    match = pattern.fullmatch(path.stem)
    return match.groups() if match else None


def _add_source(table: dict, key, slot, path: Path) -> None:
    entry = table.setdefault(key, {})
    if slot in entry:
        raise ValueError(f"two files for the same recording: {entry[slot]} and {path}")
    entry[slot] = path


class RAVDESS(MediaCorpus):
    """The Ryerson Audio-Visual Database of Emotional Speech and Song (Livingstone & Russo 2018).

    File names are seven two-digit codes, modality-channel-emotion-intensity-statement-
    repetition-actor (``02-01-06-01-02-01-12.mp4``): modality 01 audio-video, 02 video
    only, 03 audio only; vocal channel 01 speech, 02 song; emotion 01-08 in
    :attr:`CLASS_NAMES` order; actors 01-24, odd male, even female (the splits balance
    the two). The three modality files of a performance are cuts of one take, so a
    recording's audio comes from its ``03`` ``.wav`` when present, else from the audio
    track of its ``01`` ``.mp4``; its video from the ``01`` ``.mp4``, else the ``02`` one.
    ``vocal_channels``: "speech", "song" or both.
    """

    CORPUS = "RAVDESS"
    CLASS_NAMES = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    LAYOUT = """\
  ROOT/**/MM-VV-EE-II-SS-RR-AA.{wav,mp4}   any folder depth, e.g. the official zips unpacked side by side:
    ROOT/Audio_Speech_Actors_01-24/Actor_01/03-01-01-01-01-01-01.wav   (MM=03 audio-only .wav)
    ROOT/Video_Speech_Actor_01/Actor_01/01-01-01-01-01-01-01.mp4       (MM=01 audio-video .mp4)
    ROOT/Video_Speech_Actor_01/Actor_01/02-01-01-01-01-01-01.mp4       (MM=02 video-only .mp4)
  MM modality 01-03, VV vocal channel 01 speech / 02 song, EE emotion 01-08, II intensity 01-02,
  SS statement 01-02, RR repetition 01-02, AA actor 01-24"""
    _NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
    _RANGES = {"modality": (1, 3), "vocal channel": (1, 2), "emotion": (1, 8), "intensity": (1, 2),
               "statement": (1, 2), "repetition": (1, 2), "actor": (1, 24)}
    _CHANNELS = {"speech": 1, "song": 2}

    def __init__(self, root: str | Path, *, vocal_channels: Sequence[str] = ("speech",), **options):
        unknown = set(vocal_channels) - set(self._CHANNELS)
        if unknown or not vocal_channels:
            raise ValueError(f"vocal_channels must be a non-empty subset of {tuple(self._CHANNELS)}, "
                             f"got {vocal_channels}")
        self.vocal_channels = tuple(vocal_channels)
        super().__init__(root, **options)

    def _scan(self) -> list[Recording]:
        channels = {self._CHANNELS[c] for c in self.vocal_channels}
        table: dict[tuple[int, ...], dict[int, Path]] = {}
        for path in sorted(self.root.rglob("*")):
            codes = _codes(path, self._NAME)
            if codes is None or path.suffix.lower() not in (".wav", ".mp4"):
                continue
            values = tuple(map(int, codes))
            for (field, (low, high)), value in zip(self._RANGES.items(), values):
                if not low <= value <= high:
                    raise ValueError(f"{path}: {field} code {value:02d} is outside {low:02d}-{high:02d}")
            modality = values[0]
            if (path.suffix.lower() == ".wav") != (modality == 3):
                raise ValueError(f"{path}: modality {modality:02d} files are {'.wav' if modality == 3 else '.mp4'}")
            if values[1] in channels:
                _add_source(table, values[1:], modality, path)
        return [
            Recording(
                name="-".join(f"{v:02d}" for v in key), label=key[1] - 1, speaker=key[-1],
                audio=sources.get(3) or sources.get(1), video=sources.get(1) or sources.get(2),
            )
            for key, sources in sorted(table.items(), key=lambda entry: (entry[0][-1], entry[0]))  # actor first
        ]

    def _speaker_groups(self) -> dict[int, str]:
        return {actor: "male" if actor % 2 else "female" for actor in range(1, 25)}


class CremaD(MediaCorpus):
    """CREMA-D, the Crowd-sourced Emotional Multimodal Actors Dataset (Cao et al. 2014).

    File names are ``ActorID_Sentence_Emotion_Level`` (``1001_DFA_ANG_XX``): actors
    1001-1091, 12 sentences, emotions ANG DIS FEA HAP NEU SAD (:attr:`CLASS_NAMES` order),
    levels LO MD HI and XX (unspecified). Audio comes from ``AudioWAV/*.wav``, else from
    the video file's track; video from ``VideoFlash/*.flv`` (or ``.mp4`` and the other
    :data:`~models.datasets.media.VIDEO_SUFFIXES`). With ``VideoDemographics.csv`` anywhere under the
    root, the splits balance the actors' sexes.
    """

    CORPUS = "CREMA-D"
    CLASS_NAMES = ("anger", "disgust", "fear", "happy", "neutral", "sad")
    EMOTION_CODES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
    LEVELS = ("LO", "MD", "HI", "XX")
    LAYOUT = """\
  ROOT/**/AAAA_SSS_EEE_LL.wav   audio, e.g. ROOT/AudioWAV/1001_DFA_ANG_XX.wav
  ROOT/**/AAAA_SSS_EEE_LL.flv   video (or .mp4), e.g. ROOT/VideoFlash/1001_DFA_ANG_XX.flv
  ROOT/**/VideoDemographics.csv optional (ActorID, Sex columns): sex-balanced splits
  AAAA actor 1001-1091, SSS sentence (IEO TIE IOM IWW TAI MTI IWL ITH DFA ITS TSI WSI),
  EEE emotion (ANG DIS FEA HAP NEU SAD), LL level (LO MD HI XX)"""
    _NAME = re.compile(r"(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})")

    def _scan(self) -> list[Recording]:
        table: dict[tuple[int, str, str, str], dict[str, Path]] = {}
        for path in sorted(self.root.rglob("*")):
            codes = _codes(path, self._NAME)
            suffix = path.suffix.lower()
            if codes is None or suffix not in (*WAVE_SUFFIXES, *VIDEO_SUFFIXES):
                continue
            actor, sentence, emotion, level = int(codes[0]), *codes[1:]
            problems = [f"actor {actor} is outside 1001-1091"] if not 1001 <= actor <= 1091 else []
            fields = (("sentence", sentence, self.SENTENCES), ("emotion", emotion, self.EMOTION_CODES),
                      ("level", level, self.LEVELS))
            problems += [f"unknown {field} {code!r}" for field, code, known in fields if code not in known]
            if problems:
                raise ValueError(f"{path}: {'; '.join(problems)}")
            _add_source(table, (actor, sentence, emotion, level), "audio" if suffix in WAVE_SUFFIXES else "video", path)
        return [
            Recording(
                name=f"{key[0]}_{'_'.join(key[1:])}", label=self.EMOTION_CODES.index(key[2]), speaker=key[0],
                audio=sources.get("audio") or sources.get("video"), video=sources.get("video"),
            )
            for key, sources in sorted(table.items())
        ]

    def _speaker_groups(self) -> dict[int, str] | None:
        tables = sorted(self.root.rglob("VideoDemographics.csv"))
        if not tables:
            return None
        with open(tables[0], newline="") as file:
            return {int(row["ActorID"]): row["Sex"] for row in csv.DictReader(file)}


CORPORA = {"ravdess": RAVDESS, "cremad": CremaD}
CORPUS_NAMES = ("ravdess", "cremad", "mosei")
FEATURES = ("image", "handcrafted")


@dataclasses.dataclass
class CorpusSplits:
    """A corpus's three speaker-independent (MOSEI: the official) splits, and what the
    training loop needs to know about them: class names, the item keys that are model
    inputs (in forward's order), the corpus's own task, and the (file, problem) of every
    recording left out of the three for a damaged file."""

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: tuple[str, ...]
    modalities: tuple[str, ...]
    task: str
    skipped: tuple[tuple[Path, str], ...] = ()


def build_corpus(
    name: str,
    root: str | Path,
    *,
    features: str = "image",
    config: SyntheticConfig = TINY,
    seed: int = 0,
    cache_dir: str | Path | None = "auto",
    **options,
) -> CorpusSplits:
    """The splits of corpus ``name`` (one of :data:`CORPUS_NAMES`) under ``root``.

    ``features``: "image" (the synthetic dataset's tensors at ``config``'s sizes, for the
    CNN models) or "handcrafted" (the seed system's vectors); MOSEI's feature pickles
    take neither, its raw media either. ``options`` go to the corpus class (e.g. RAVDESS's
    ``vocal_channels``, ``val_fraction``; MOSEI media's ``folds``).

    MOSEI's task is sentiment regression on its feature pickles; on its raw media it is
    the 7-class sentiment, which every audio-video model (all classifiers) can learn.
    """
    if name not in CORPORA and name != "mosei":
        raise ValueError(f"unknown corpus {name!r}; choose from {CORPUS_NAMES}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    frontend = ImageFrontend(config) if features == "image" else HandcraftedFrontend()
    if name == "mosei":
        from . import mosei

        if mosei.source_kind(root) == "features":
            splits = mosei.load_mosei(root)
            return CorpusSplits(splits["train"], splits["valid"], splits["test"], mosei.CLASS_NAMES,
                                mosei.MODALITIES, "regression")
        splits = mosei.load_mosei_media(root, frontend=frontend, seed=seed, cache_dir=cache_dir, **options)
        return CorpusSplits(splits["train"], splits["valid"], splits["test"], mosei.CLASS_NAMES,
                            splits["train"].modalities, "classification",
                            sum((splits[split].skipped for split in mosei.SPLIT_NAMES), ()))
    corpus = CORPORA[name]
    sets = {split: corpus(root, split=split, frontend=frontend, seed=seed, cache_dir=cache_dir, **options)
            for split in SPLITS}
    return CorpusSplits(sets["train"], sets["val"], sets["test"], corpus.CLASS_NAMES, sets["train"].modalities,
                        "classification", sum((sets[split].skipped for split in SPLITS), ()))
