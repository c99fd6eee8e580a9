"""CMU-MOSEI (Zadeh et al. 2018) from the aligned-feature pickles that multimodal-sentiment
toolkits distribute: no media, no downloads.

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
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

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
        self.label = (torch.round(self.sentiment.clamp(-3, 3)) + 3).long()
        self.dims = {m: array.shape[-1] for m, array in self.features.items()}

    def __len__(self) -> int:
        return len(self.sentiment)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {m: array[index] for m, array in self.features.items()}
        item.update(sentiment=self.sentiment[index], label=self.label[index])
        if self.emotions is not None:
            item["emotions"] = self.emotions[index]
        return item


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
