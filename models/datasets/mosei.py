"""CMU-MOSEI (Zadeh et al. 2018), read in one of two forms (nothing is downloaded):

- the aligned-feature pickles that multimodal-sentiment toolkits distribute
  (:func:`load_mosei`, :class:`CMUMOSEI`): audio, video and text feature sequences, for
  the sequence models;
- the raw release (:func:`load_mosei_media`, :class:`MOSEIMedia`): full-length videos
  and WAVs, cut into the labelled segments by the intervals of the CMU Multimodal SDK's
  "All Labels" computational sequence (:func:`read_csd`), and turned into the tensors of
  every audio-video model by the RAVDESS / CREMA-D frontends.

:func:`source_kind` tells which of the two a ``--root`` holds.

Feature pickles
---------------

The file is a pickled dict ``{"train": ..., "valid": ..., "test": ...}``; each split is a
dict of numpy arrays with N segments of T aligned steps:

==========================  ================  ==========================================
key                         shape             content
==========================  ================  ==========================================
``audio``                   (N, T, 74)        COVAREP acoustic features
``vision``                  (N, T, 35)        FACET facial features
``text``                    (N, T, 300)       GloVe word vectors
``labels``                  (N, 1, 1)         sentiment in [-3, 3] (MulT's
                                              ``mosei_senti_data.pkl``), or (N, 1, 7) /
                                              (N, 7): sentiment then the six emotion
                                              intensities in [0, 3], in the CMU
                                              MultimodalSDK's "All Labels" order
``regression_labels``       (N,)              sentiment, instead of ``labels`` (MMSA's
                                              ``aligned_50.pkl``)
==========================  ================  ==========================================

Other keys (``id``, ``raw_text``, lengths, BERT tokens) are ignored. The feature widths
are read from the file, not assumed. Non-finite values (COVAREP writes -inf for
log-features of silence) become 0, as the toolkits do before training.

Pickles can run code when loaded: open only files from a source you trust.

The raw release
---------------

A computational sequence (``.csd``) is an HDF5 file with one root group, named after the
sequence ("All Labels"), holding a ``data`` group of one group per video id, each with a
``features`` (N, k) and an ``intervals`` (N, 2) dataset (start and end of each row, in
seconds), and a ``metadata`` group (JSON strings, not read here). In the labels sequence
a row is one segment: k = 7 values, sentiment in [-3, 3] then the six emotion intensities
in [0, 3] (:data:`EMOTIONS` order), or k = 1, sentiment alone. Segment ``vid[i]`` is row
``i`` of video ``vid``, the SDK's naming. The media are found by file name anywhere under
the root (``<video id>.wav``, ``<video id>.mp4``), as the release unpacks them:
``Raw/Audio/Full/WAV_16000`` and ``Raw/Videos/Full/Combined``. The release's
pre-segmented clips (``Videos/Segmented/Combined/<video id>_<n>.mp4``) are not read:
their numbering follows the transcript's sentences, not the label rows, and the full
files cut by the label intervals give every labelled segment.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpora import MIN_AUDIO_SAMPLES, ImageFrontend, _add_source, speaker_split
from .feature_cache import FeatureCache, default_cache_dir
from .media import VIDEO_SUFFIXES, WAVE_SUFFIXES, read_audio, read_frames, wave_problem

FILE_NAMES = ("mosei_senti_data.pkl", "aligned_50.pkl")
SPLIT_NAMES = ("train", "valid", "test")
MODALITIES = ("audio", "video", "text")
# Item key -> the pickle's key for that modality.
_SOURCE_KEYS = {"audio": "audio", "video": "vision", "text": "text"}
EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
# The 7-class sentiment of Acc-7: round(clip(score, -3, 3)), class index = value + 3.
CLASS_NAMES = ("-3", "-2", "-1", "0", "1", "2", "3")
LAYOUT = """\
  ROOT/mosei_senti_data.pkl   (MulT's aligned file) or ROOT/aligned_50.pkl (MMSA's), or --root naming the file:
  a pickled dict {'train', 'valid', 'test'} of dicts with 'audio' (N, T, 74), 'vision' (N, T, 35),
  'text' (N, T, 300) float arrays and 'labels' (N, 1, 1) sentiment, (N, 1, 7) sentiment + 6 emotions,
  or 'regression_labels' (N,)"""


def resolve(path: str | Path) -> Path:
    """The pickle itself, or the first of :data:`FILE_NAMES` inside a directory."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in FILE_NAMES:
            if (path / name).is_file():
                return path / name
    raise FileNotFoundError(f"no CMU-MOSEI pickle at {path}.\nExpected layout (see models/DATASETS.md):\n{LAYOUT}")


def load_mosei(path: str | Path) -> dict[str, "CMUMOSEI"]:
    """The three official splits, read from one load of the pickle (the file is several GB)."""
    file = resolve(path)
    data = _read_pickle(file)
    missing = [s for s in SPLIT_NAMES if s not in data]
    if missing:
        raise ValueError(f"{file} lacks the split(s) {missing}; found keys {sorted(data)}.\nExpected:\n{LAYOUT}")
    return {split: CMUMOSEI(data[split], source=f"{file}[{split}]") for split in SPLIT_NAMES}


def _read_pickle(file: Path) -> dict:
    with open(file, "rb") as handle:
        try:
            data = pickle.load(handle)
        except UnicodeDecodeError:
            # Python 2 pickles of numpy arrays need latin1 to read their byte strings back.
            handle.seek(0)
            data = pickle.load(handle, encoding="latin1")
    return _str_keys(data)


def _str_keys(value):
    if isinstance(value, dict):
        return {k.decode() if isinstance(k, bytes) else k: _str_keys(v) for k, v in value.items()}
    return value


class CMUMOSEI(Dataset):
    """One split. Item: ``audio``, ``video``, ``text`` float32 (T, n_m); ``sentiment``
    float32 in [-3, 3]; ``label`` int64, the 7-class sentiment (index into
    :data:`CLASS_NAMES`); and ``emotions`` float32 (6,) when the file has them
    (:data:`EMOTIONS` order). ``dims`` maps each modality to its feature width."""

    def __init__(self, split: dict, *, source: str = "CMU-MOSEI split"):
        missing = [key for key in _SOURCE_KEYS.values() if key not in split]
        if missing:
            raise ValueError(f"{source} lacks {missing}; found keys {sorted(split)}.\nExpected:\n{LAYOUT}")
        self.features = {m: _finite_float(split[key]) for m, key in _SOURCE_KEYS.items()}
        n = len(self.features["audio"])
        for m, array in self.features.items():
            if array.dim() != 3 or len(array) != n:
                raise ValueError(f"{source}: {_SOURCE_KEYS[m]} must be (N, T, n) with N = {n}, "
                                 f"got {tuple(array.shape)}")
        self.sentiment, self.emotions = _labels(split, n, source)
        self.label = sentiment_class(self.sentiment)
        self.dims = {m: array.shape[-1] for m, array in self.features.items()}

    def __len__(self) -> int:
        return len(self.sentiment)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {m: array[index] for m, array in self.features.items()}
        item.update(sentiment=self.sentiment[index], label=self.label[index])
        if self.emotions is not None:
            item["emotions"] = self.emotions[index]
        return item


def sentiment_class(sentiment: torch.Tensor) -> torch.Tensor:
    """The 7-class sentiment of Acc-7 (int64, index into :data:`CLASS_NAMES`):
    round(clip(s, -3, 3)) + 3."""
    return (torch.round(sentiment.clamp(-3, 3)) + 3).long()


def _finite_float(array) -> torch.Tensor:
    array = np.asarray(array, dtype=np.float32)
    return torch.from_numpy(np.where(np.isfinite(array), array, np.float32(0.0)))


def _labels(split: dict, n: int, source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "regression_labels" in split:
        values = np.asarray(split["regression_labels"], dtype=np.float32).reshape(n, -1)
    elif "labels" in split:
        values = np.asarray(split["labels"], dtype=np.float32).reshape(n, -1)
    else:
        raise ValueError(f"{source} has neither 'labels' nor 'regression_labels'; found keys {sorted(split)}")
    if values.shape[1] == 1:
        return torch.from_numpy(values[:, 0].copy()), None
    if values.shape[1] == 1 + len(EMOTIONS):
        return torch.from_numpy(values[:, 0].copy()), torch.from_numpy(values[:, 1:].copy())
    raise ValueError(f"{source}: labels must hold 1 (sentiment) or 7 (sentiment + emotions) values per segment, "
                     f"got {values.shape[1]}")


# --- the raw release ------------------------------------------------------------------

LABELS_FILE = "CMU_MOSEI_Labels.csd"
MEDIA_MODALITIES = ("audio", "video")
# The CMU Multimodal SDK's standard folds (lists of video ids), used when the SDK is importable.
SDK_FOLDS_MODULE = "mmsdk.mmdatasdk.dataset.standard_datasets.CMU_MOSEI.cmu_mosei_std_folds"
MEDIA_LAYOUT = f"""\
  ROOT/**/{LABELS_FILE}                   the SDK's "All Labels" computational sequence (HDF5):
      /<root group>/data/<video id>/features (N, 7) sentiment + 6 emotions, /intervals (N, 2) seconds
  ROOT/**/<video id>.wav                  full-length audio, e.g. ROOT/Raw/Audio/Full/WAV_16000/-3g5yACwYnA.wav
  ROOT/**/<video id>.mp4                  full-length video, e.g. ROOT/Raw/Videos/Full/Combined/-3g5yACwYnA.mp4"""


def source_kind(root: str | Path) -> str:
    """"media" when ``root`` is a ``.csd`` file or a directory holding :data:`LABELS_FILE`
    (and no feature pickle), else "features". Cheap (file names only), so that the command
    line can pick the models a root suits before loading it; a root holding neither is
    reported by the loader of its kind."""
    root = Path(root)
    if root.suffix == ".csd" and root.is_file():
        return "media"
    try:
        resolve(root)
        return "features"
    except FileNotFoundError:
        pass
    return "media" if root.is_dir() and next(root.rglob(LABELS_FILE), None) is not None else "features"


def read_csd(path: str | Path) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A computational sequence: its root group's name, and per video id the
    (features (N, k) float64, intervals (N, 2) float64) arrays.

    A file that HDF5 cannot read (truncated, not HDF5) or that lacks the layout raises one
    ValueError naming the file and what is wrong."""
    try:
        import h5py
    except ImportError as error:
        raise ImportError("reading .csd files needs h5py: pip install h5py (part of fastfusion[corpora])") from error
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:  # h5py's message says "truncated file", "file signature not found", ...
        raise ValueError(f"{path} is not a readable HDF5 computational sequence: {error}") from None
    with handle:
        roots = list(handle)
        if len(roots) != 1 or not isinstance(handle[roots[0]], h5py.Group) or "data" not in handle[roots[0]]:
            raise ValueError(f"{path} is not a computational sequence: it needs one root group holding a 'data' "
                             f"group, found top-level entries {roots}")
        data = handle[roots[0]]["data"]
        videos = {}
        for video_id in data:
            entry = data[video_id]
            missing = [key for key in ("features", "intervals")
                       if not isinstance(entry, h5py.Group) or key not in entry]
            if missing:
                raise ValueError(f"{path}: video {video_id!r} lacks the dataset(s) {missing}")
            try:
                features = np.asarray(entry["features"], dtype=np.float64)
                intervals = np.asarray(entry["intervals"], dtype=np.float64)
            except (OSError, TypeError, ValueError) as error:  # damaged chunks, non-numeric data
                raise ValueError(f"{path}: video {video_id!r} cannot be read: {error}") from None
            if features.ndim != 2 or intervals.shape != (len(features), 2):
                raise ValueError(f"{path}: video {video_id!r} needs features (N, k) and intervals (N, 2), "
                                 f"got {features.shape} and {intervals.shape}")
            videos[video_id] = (features, intervals)
    return roots[0], videos


@dataclasses.dataclass(frozen=True)
class Segment:
    """One labelled segment: row ``index`` of video ``video_id`` in the labels sequence,
    its span in seconds, its label row, and the files its modalities come from."""

    video_id: str
    index: int
    start: float
    end: float
    labels: tuple[float, ...]
    audio: Path | None
    video: Path | None

    @property
    def name(self) -> str:
        return f"{self.video_id}[{self.index}]"  # the SDK's segment naming


def standard_folds() -> dict[str, tuple[str, ...]] | None:
    """The CMU Multimodal SDK's standard train / valid / test video ids, or None when the
    SDK (which is not on PyPI: a clone on ``PYTHONPATH``) cannot be imported."""
    try:
        folds = importlib.import_module(SDK_FOLDS_MODULE)
    except ImportError as error:
        if importlib.util.find_spec("mmsdk") is not None:  # installed but broken: say so rather than fall back quietly
            warnings.warn(f"the CMU Multimodal SDK is installed but its standard folds do not import ({error}); "
                          "using a seeded split of the videos instead", stacklevel=2)
        return None
    return {"train": tuple(folds.standard_train_fold), "valid": tuple(folds.standard_valid_fold),
            "test": tuple(folds.standard_test_fold)}


def load_mosei_media(
    root: str | Path,
    *,
    folds: Mapping[str, Sequence[str]] | None = None,
    modalities: Sequence[str] = MEDIA_MODALITIES,
    frontend=None,
    cache_dir: str | Path | None = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, MOSEIMedia]:
    """The train / valid / test :class:`MOSEIMedia` sets of the raw release under ``root``
    (layout: :data:`MEDIA_LAYOUT`), from one read of the labels and one scan of the files.
    ``root`` may also name the labels file; the media are then searched beside it.

    Splits are by video, so no video has segments in two of them: ``folds`` (split ->
    video ids), else the SDK's :func:`standard_folds` when importable, else
    :func:`~models.datasets.corpora.speaker_split` of the video ids with ``val_fraction``,
    ``test_fraction`` and ``seed``. The release names no speakers, and some of its ~1000
    speakers have several videos: no split is known to be speaker-independent. Each set's
    :attr:`~MOSEIMedia.folds` says which. Labelled videos with no file for one of
    ``modalities`` are left out; segments whose ``.wav`` is damaged, whose span is empty or
    starts past the end of their ``.wav``, or whose labels are not finite, are skipped
    with a warning and listed in ``skipped``.
    """
    root = Path(root)
    modalities = tuple(modalities)
    if not modalities or set(modalities) - set(MEDIA_MODALITIES):
        raise ValueError(f"modalities must be a non-empty subset of {MEDIA_MODALITIES}, got {modalities}")
    labels_files = [root] if root.suffix == ".csd" and root.is_file() else None
    root = root.parent if labels_files else root
    if not root.is_dir():
        raise FileNotFoundError(_missing_media(f"{root} is not a directory"))
    labels_files = labels_files or sorted(root.rglob(LABELS_FILE))
    if not labels_files:
        raise FileNotFoundError(_missing_media(f"no {LABELS_FILE} under {root}"))
    if len(labels_files) > 1:
        raise ValueError(f"{len(labels_files)} label files under {root}, keep one: {[str(f) for f in labels_files]}")
    labels_file = labels_files[0]
    _, labels = read_csd(labels_file)
    widths = {features.shape[1] for features, _ in labels.values()}
    if not widths <= {1, 1 + len(EMOTIONS)} or len(widths) > 1:
        raise ValueError(f"{labels_file}: label rows must all hold 1 (sentiment) or 7 (sentiment + emotions) "
                         f"values, found widths {sorted(widths)}")
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(root.rglob("*")):
        suffix = path.suffix.lower()
        if path.stem in labels and suffix in (*WAVE_SUFFIXES, *VIDEO_SUFFIXES):
            _add_source(files, path.stem, "audio" if suffix in WAVE_SUFFIXES else "video", path)
    sources = {vid: {"audio": found.get("audio") or found.get("video"), "video": found.get("video")}
               for vid, found in files.items()}
    usable = sorted(vid for vid, found in sources.items() if all(found[m] is not None for m in modalities))
    if not usable:
        raise FileNotFoundError(_missing_media(
            f"{len(labels)} videos labelled in {labels_file}, none with files for {modalities} under {root}"))

    chosen = folds if folds is not None else standard_folds()
    if chosen is not None:
        fold_source = "given folds" if folds is not None else "the CMU Multimodal SDK's standard folds"
        missing = [split for split in SPLIT_NAMES if split not in chosen]
        if missing:
            raise ValueError(f"folds lack the split(s) {missing}; give video ids for each of {SPLIT_NAMES}")
        split_of = {vid: split for split in SPLIT_NAMES for vid in chosen[split]}
    else:
        fold_source = f"a seeded split of the videos (seed {seed}, valid {val_fraction}, test {test_fraction})"
        parts = speaker_split(usable, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        split_of = {vid: split for split, part in zip(SPLIT_NAMES, (parts["train"], parts["val"], parts["test"]))
                    for vid in part}

    frontend = ImageFrontend() if frontend is None else frontend
    segments = {split: [] for split in SPLIT_NAMES}
    skipped = {split: [] for split in SPLIT_NAMES}
    for vid in usable:
        split = split_of.get(vid)
        if split is None:
            continue  # a video outside the given folds
        audio, video = sources[vid]["audio"], sources[vid]["video"]
        rows = [Segment(vid, i, float(s), float(e), tuple(map(float, values)), audio, video)
                for i, ((s, e), values) in enumerate(zip(labels[vid][1], labels[vid][0]))]
        kept, problems = _usable_segments(rows, modalities, frontend.sample_rate)
        segments[split] += kept
        skipped[split] += problems
    return {split: MOSEIMedia(segments[split], modalities=modalities, frontend=frontend, cache_dir=cache_dir,
                              skipped=tuple(skipped[split]), folds=fold_source)
            for split in SPLIT_NAMES}


def _usable_segments(
    rows: list[Segment], modalities: tuple[str, ...], sample_rate: int
) -> tuple[list[Segment], list[tuple[Path, str]]]:
    """The segments of one video that can be read, and (file, problem) of the others.

    Checked now, from the ``.wav`` header, rather than mid-epoch: a damaged ``.wav`` drops
    its video; an empty span (NaN included), one past the end of the audio, or labels that
    are not finite drop its segment. Video containers are checked when decoded."""
    problems = []
    for row in rows:
        if not row.end > row.start >= 0:
            problems.append((row.audio or row.video,
                             f"segment {row.name} has the empty span [{row.start}, {row.end}] s"))
        elif not np.isfinite(row.labels).all():
            problems.append((row.audio or row.video, f"segment {row.name} has non-finite labels {row.labels}"))
    rows = [row for row in rows if row.end > row.start >= 0 and np.isfinite(row.labels).all()]
    audio = rows[0].audio if rows else None
    if "audio" in modalities and audio is not None and audio.suffix.lower() in WAVE_SUFFIXES:
        problem = wave_problem(audio, sample_rate)
        if problem is not None:
            problems.append((audio, f"{problem}: its {len(rows)} segments are skipped"))
            rows = []
        else:
            import soundfile

            info = soundfile.info(str(audio))
            duration = info.frames / info.samplerate
            late = [row for row in rows if row.start >= duration]
            problems += [(audio, f"segment {row.name} starts at {row.start} s, after the audio's end ({duration:g} s)")
                         for row in late]
            rows = [row for row in rows if row.start < duration]
    for path, problem in problems:
        warnings.warn(f"skipping CMU-MOSEI: {path} {problem}", stacklevel=2)
    return rows, problems


def _missing_media(what: str) -> str:
    return (f"{what}.\nExpected the CMU-MOSEI raw release (see models/DATASETS.md):\n{MEDIA_LAYOUT}\n"
            f"or the feature pickles:\n{LAYOUT}")


class MOSEIMedia(Dataset):
    """Labelled segments of the CMU-MOSEI raw release (see :func:`load_mosei_media`).

    Item: the frontend's tensors of the segment's span (:class:`~models.datasets.corpora.
    ImageFrontend` by default: ``audio`` (1, H, W) spectrogram image, ``video`` (3, T, H, W)
    clip; or :class:`~models.features.handcrafted.HandcraftedFrontend` vectors), ``sentiment``
    float32 in [-3, 3], ``label`` int64 (the 7-class sentiment, index into
    :data:`CLASS_NAMES`), and ``emotions`` float32 (6,) when the labels have them. Features
    are cached per (files, span, frontend), as the other corpora's are per file.
    """

    CLASS_NAMES = CLASS_NAMES

    def __init__(
        self,
        segments: Sequence[Segment],
        *,
        modalities: Sequence[str] = MEDIA_MODALITIES,
        frontend=None,
        cache_dir: str | Path | None = "auto",
        skipped: tuple[tuple[Path, str], ...] = (),
        folds: str = "",
    ):
        self.segments = tuple(segments)
        self.modalities = tuple(modalities)
        self.frontend = ImageFrontend() if frontend is None else frontend
        self.cache = FeatureCache(default_cache_dir() if cache_dir == "auto" else cache_dir)
        self.skipped = skipped
        self.folds = folds
        width = len(self.segments[0].labels) if self.segments else 1
        values = torch.tensor([s.labels for s in self.segments], dtype=torch.float32).reshape(len(self.segments), width)
        self.sentiment = values[:, 0].contiguous()
        self.emotions = values[:, 1:].contiguous() if values.shape[1] > 1 else None
        self.label = sentiment_class(self.sentiment)

    @property
    def labels(self) -> torch.Tensor:
        return self.label

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        segment = self.segments[index]
        sources = [getattr(segment, m) for m in self.modalities]
        # The span is part of the key: every segment of a video shares its files.
        config = f"{self.frontend.config_key}|{'+'.join(self.modalities)}|span={segment.start!r}-{segment.end!r}"
        features = self.frontend.finish(self.cache.get(sources, config, lambda: self._extract(segment)))
        item = {**features, "sentiment": self.sentiment[index], "label": self.label[index]}
        if self.emotions is not None:
            item["emotions"] = self.emotions[index]
        return item

    def _extract(self, segment: Segment) -> dict[str, torch.Tensor]:
        span = {"start": segment.start, "end": segment.end}
        wave = (read_audio(segment.audio, self.frontend.sample_rate, MIN_AUDIO_SAMPLES, **span)
                if "audio" in self.modalities else None)
        frames = read_frames(segment.video, self.frontend.frame_size, **span)[0] if "video" in self.modalities else None
        return self.frontend(wave, frames)
