"""Every model by name, at two sizes: "paper" (the seed papers' hyperparameters, for a GPU)
and "tiny" (the same code, small enough to train in seconds on a 2-core CPU).

    model = build_model("cbgp", size="tiny")           # AudioVideoClassifier with a CBGP head
    data = data_config("tiny")                         # the matching synthetic-data sizes

All models take ``forward(audio, video)`` with the synthetic dataset's tensors: audio
(B, 1, H_a, W_a) spectrogram images and video (B, 3, T, H, W) clips.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .avt_ca import ABLATIONS, AVTCA, FULL
from .backbones import AudioCNN, VideoCNN
from .data import TINY, SyntheticConfig
from .heads import HEAD_NAMES, AudioVideoClassifier, make_head
from .sequence_fusion import AudioVideoSequences, LMFNet, TFNNet

# "avt_ca" is the full model (IT-4 + CT-4); avt_ca_it1 ... avt_ca_ct4 are the paper's ablations.
AVT_CA_VARIANTS = {"avt_ca": FULL, **{f"avt_ca_{v.replace('-', '')}": options for v, options in ABLATIONS.items()}}
MODEL_NAMES = HEAD_NAMES + ("lmf_lstm", "tfn_lstm") + tuple(AVT_CA_VARIANTS)
SIZES = ("tiny", "paper")


@dataclasses.dataclass(frozen=True)
class Preset:
    data: SyntheticConfig
    audio_channels: tuple[int, ...]
    video_channels: tuple[int, ...]
    heads: dict
    lstm_hidden: tuple[int, int]
    lstm_rank: int
    lstm_post_fusion_dim: int
    avt_ca: dict


_PRESETS = {
    "paper": Preset(
        data=SyntheticConfig(),
        audio_channels=(32, 64, 128, 256),
        video_channels=(64, 128, 256, 512),
        heads={},  # make_head's defaults are the papers'
        lstm_hidden=(32, 32),
        lstm_rank=4,
        lstm_post_fusion_dim=128,
        avt_ca={},
    ),
    "tiny": Preset(
        data=TINY,
        audio_channels=(8, 16, 32, 64),
        video_channels=(8, 16, 32, 64),
        heads={"mfb": {"out_dim": 64, "factor": 5}, "cbp": {"out_dim": 512}, "cbgp": {"out_dim": 512},
               "lmf": {"out_dim": 32, "rank": 4}, "tfn": {"out_dim": 32}},
        lstm_hidden=(16, 16),
        lstm_rank=4,
        lstm_post_fusion_dim=32,
        avt_ca={"audio_channels": (16, 32, 64, 32), "stage_channels": (8, 16, 32, 64), "stage_repeats": (1, 1, 1),
                "frame_dim": 64, "temporal_channels": (16, 16, 32, 32)},
    ),
}


def data_config(size: str = "tiny") -> SyntheticConfig:
    return get_preset(size).data


def get_preset(size: str) -> Preset:
    """The model and data widths of ``size`` (one of :data:`SIZES`)."""
    if size not in _PRESETS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return _PRESETS[size]


def build_model(
    name: str,
    *,
    size: str = "tiny",
    num_classes: int = 4,
    task: str = "classification",
    dropout: float | None = None,
) -> nn.Module:
    """The model ``name`` (one of :data:`MODEL_NAMES`) at ``size``.

    ``task="regression"`` (a sentiment score) is offered by the LSTM models only, as in
    their papers. ``dropout`` overrides every dropout probability of the model (0 makes
    training deterministic given the data order, which the distributed tests rely on).
    """
    preset = get_preset(size)
    audio_height = preset.data.audio_size[0]
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    if task != "classification" and name not in ("lmf_lstm", "tfn_lstm"):
        raise ValueError(f"model {name!r} is a classifier; task={task!r} needs lmf_lstm or tfn_lstm")
    drop = {} if dropout is None else {"dropout": dropout}

    if name in HEAD_NAMES:
        audio = AudioCNN(preset.audio_channels, **drop)
        video = VideoCNN(preset.video_channels, **drop)
        options = dict(preset.heads.get(name, {}))
        if name == "mfb" and dropout is not None:
            options["dropout"] = dropout
        head = make_head(name, (audio.out_dim, video.out_dim), num_classes, **options)
        return AudioVideoClassifier(audio, video, head)

    if name in ("lmf_lstm", "tfn_lstm"):
        frame = preset.data.frame_size
        in_dims = (audio_height, 3 * frame * frame)
        if name == "lmf_lstm":
            net = LMFNet(in_dims, preset.lstm_hidden, rank=preset.lstm_rank, task=task, num_classes=num_classes, **drop)
        else:
            net = TFNNet(in_dims, preset.lstm_hidden, post_fusion_dim=preset.lstm_post_fusion_dim, task=task,
                         num_classes=num_classes, **drop)
        return AudioVideoSequences(net)

    return AVTCA(num_classes, audio_in=audio_height, **preset.avt_ca, **AVT_CA_VARIANTS[name], **drop)
