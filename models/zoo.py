"""Every model by name, at two sizes: "paper" (the seed papers' hyperparameters, for a GPU)
and "tiny" (the same code, small enough to train in seconds on a 2-core CPU).

    model = build_model("cbgp", size="tiny")           # AudioVideoClassifier with a CBGP head
    data = data_config("tiny")                         # the matching synthetic-data sizes

:data:`MODEL_NAMES` lists them all:

- the fusion heads of :data:`~models.nets.heads.HEAD_NAMES` on the CBGP paper's CNN encoders,
  ``lmf_lstm`` and ``tfn_lstm`` (LSTM sub-networks), ``avt_ca`` and its ablations;
- the seed systems that came with the real corpora: ``mfa_cnn1d`` (hand-crafted features,
  MFA fusion, 1D-CNN), ``ca_triplet`` (cross-modal attention with the emotion-constrained
  triplet loss), ``decision_fusion`` (weighted decisions of an audio and a video CNN) and
  ``onn`` (an operational neural network on a key frame and the spectrogram).

They take ``forward(audio, video)`` with the synthetic dataset's tensors, audio
(B, 1, H_a, W_a) spectrogram images and video (B, 3, T, H, W) clips, except ``mfa_cnn1d``,
which reads the hand-crafted (audio, video) feature vectors (:func:`features_for`).
With ``input_dims`` (one width per modality), :data:`MOSEI_MODEL_NAMES` are built over
CMU-MOSEI's three pre-extracted sequences instead: forward(audio, video, text), each
modality through an LSTM sub-network.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import nn

from .datasets.data import TINY, SyntheticConfig
from .features.handcrafted import HandcraftedFrontend
from .nets.avt_ca import ABLATIONS, AVTCA, FULL
from .nets.backbones import AudioCNN, VideoCNN
from .nets.cross_attention_triplet import CrossAttentionTriplet
from .nets.decision_fusion import WeightedDecisionFusion, unimodal_classifier
from .nets.heads import HEAD_NAMES, AudioVideoClassifier, make_head
from .nets.mfa_cnn import MFACNN
from .nets.onn import OperationalAVNet
from .nets.sequence_fusion import AudioVideoSequences, LMFNet, LSTMSubNet, TFNNet

# "avt_ca" is the full model (IT-4 + CT-4); avt_ca_it1 ... avt_ca_ct4 are the paper's ablations.
AVT_CA_VARIANTS = {"avt_ca": FULL, **{f"avt_ca_{v.replace('-', '')}": options for v, options in ABLATIONS.items()}}
SEQUENCE_MODELS = ("lmf_lstm", "tfn_lstm")
MODEL_NAMES = (HEAD_NAMES + SEQUENCE_MODELS + tuple(AVT_CA_VARIANTS)
               + ("mfa_cnn1d", "ca_triplet", "decision_fusion", "onn"))
# The models build_model makes over CMU-MOSEI's (audio, video, text) sequences, given input_dims.
MOSEI_MODEL_NAMES = SEQUENCE_MODELS + ("decision_fusion",)
SIZES = ("tiny", "paper")
# Which corpus features (models.datasets.corpora.build_corpus's ``features``) a model reads;
# "image" for every model not named here.
_FEATURES = {"mfa_cnn1d": "handcrafted"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """The widths of every model at one size. The CNN encoders, heads, LSTM and AVT-CA
    widths are the papers' at "paper" size; the paper-size 1D-CNN is seed 002's table
    (models.nets.cnn1d's defaults; the tiny one keeps its layers, kernel, pools and input
    length at a quarter of its widths); the MOSEI LSTM sizes are LMF's (32 / 32 / 128); the
    MFA components, attention and ONN sizes are our choices at both sizes."""

    data: SyntheticConfig
    audio_channels: tuple[int, ...]
    video_channels: tuple[int, ...]
    heads: dict
    lstm_hidden: tuple[int, int]
    lstm_rank: int
    lstm_post_fusion_dim: int
    avt_ca: dict
    mfa_components: int
    cnn1d: dict
    attention: dict
    mosei_lstm_hidden: tuple[int, int, int]
    onn: dict


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
        mfa_components=32,
        cnn1d={},
        attention={"dim": 128, "num_heads": 4},
        mosei_lstm_hidden=(32, 32, 128),
        onn={"channels": (32, 64, 128), "q": 3},
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
        mfa_components=16,
        cnn1d={"channels": (64, 32, 16, 16, 8), "hidden": 64},
        attention={"dim": 32, "num_heads": 2},
        mosei_lstm_hidden=(16, 16, 32),
        onn={"channels": (16, 32), "q": 3},
    ),
}


def data_config(size: str = "tiny") -> SyntheticConfig:
    return get_preset(size).data


def get_preset(size: str) -> Preset:
    """The model and data widths of ``size`` (one of :data:`SIZES`)."""
    if size not in _PRESETS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return _PRESETS[size]


def features_for(name: str) -> str:
    """The corpus features model ``name`` reads: "handcrafted" or "image"."""
    return _FEATURES.get(name, "image")


def build_model(
    name: str,
    *,
    size: str = "tiny",
    num_classes: int = 4,
    task: str = "classification",
    dropout: float | None = None,
    input_dims: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    learn_weights: bool = False,
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """The model ``name`` (one of :data:`MODEL_NAMES`) at ``size``: a classifier of
    ``num_classes``, or for ``task="regression"`` one sentiment score per example.

    ``input_dims`` (audio, video, text widths) builds the CMU-MOSEI sequence model instead
    (one of :data:`MOSEI_MODEL_NAMES`). Regression is offered by the LSTM models, and by
    decision fusion on MOSEI sequences, as in their papers. ``dropout`` overrides every
    dropout probability of the model (0 makes training deterministic given the data
    order, which the distributed tests rely on). ``weights`` and ``learn_weights`` set
    decision fusion's per-modality weights (in forward's order); ``class_names`` (one per
    class) place the emotions for ca_triplet's loss, which needs them; other models
    ignore these three.
    """
    preset = get_preset(size)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    drop = {} if dropout is None else {"dropout": dropout}
    if input_dims is not None:
        return _mosei_model(name, input_dims, preset, task, num_classes, drop, weights, learn_weights)
    if task != "classification" and name not in SEQUENCE_MODELS:
        raise ValueError(f"model {name!r} is a classifier; task={task!r} needs lmf_lstm or tfn_lstm")
    audio_height = preset.data.audio_size[0]

    if name in HEAD_NAMES:
        audio = AudioCNN(preset.audio_channels, **drop)
        video = VideoCNN(preset.video_channels, **drop)
        options = dict(preset.heads.get(name, {}))
        if name == "mfb" and dropout is not None:
            options["dropout"] = dropout
        head = make_head(name, (audio.out_dim, video.out_dim), num_classes, **options)
        return AudioVideoClassifier(audio, video, head)
    if name in SEQUENCE_MODELS:
        frame = preset.data.frame_size
        in_dims = (audio_height, 3 * frame * frame)
        if name == "lmf_lstm":
            net = LMFNet(in_dims, preset.lstm_hidden, rank=preset.lstm_rank, task=task, num_classes=num_classes, **drop)
        else:
            net = TFNNet(in_dims, preset.lstm_hidden, post_fusion_dim=preset.lstm_post_fusion_dim, task=task,
                         num_classes=num_classes, **drop)
        return AudioVideoSequences(net)
    if name in AVT_CA_VARIANTS:
        return AVTCA(num_classes, audio_in=audio_height, **preset.avt_ca, **AVT_CA_VARIANTS[name], **drop)
    if name == "mfa_cnn1d":
        return MFACNN(HandcraftedFrontend().dims, num_classes, n_components=preset.mfa_components,
                      cnn={**preset.cnn1d, **drop})
    if name == "ca_triplet":
        if class_names is None or len(class_names) != num_classes:
            raise ValueError(f"ca_triplet needs class_names, one per class ({num_classes}), for its emotion "
                             f"constraint; got {class_names}")
        return CrossAttentionTriplet(class_names, audio_channels=preset.audio_channels,
                                     video_channels=preset.video_channels, **preset.attention, **drop)
    if name == "decision_fusion":
        audio = AudioCNN(preset.audio_channels, **drop)
        video = VideoCNN(preset.video_channels, **drop)
        classifiers = [unimodal_classifier(audio, audio.out_dim, num_classes),
                       unimodal_classifier(video, video.out_dim, num_classes)]
        return WeightedDecisionFusion(classifiers, weights, learn_weights=learn_weights)
    assert name == "onn", name  # MODEL_NAMES has no other entry
    return OperationalAVNet(num_classes, **preset.onn, **drop)


def _mosei_model(name: str, input_dims: Sequence[int], preset: Preset, task: str, num_classes: int, drop: dict,
                 weights: Sequence[float] | None, learn_weights: bool) -> nn.Module:
    """forward(audio, video, text) over sequences of widths ``input_dims`` -> (B,) sentiment
    for ``task="regression"``, else (B, num_classes) logits."""
    if name not in MOSEI_MODEL_NAMES:
        raise ValueError(f"model {name!r} takes audio and video; input_dims (CMU-MOSEI's sequences) needs one of "
                         f"{MOSEI_MODEL_NAMES}")
    hidden = preset.mosei_lstm_hidden
    if len(input_dims) != len(hidden):
        raise ValueError(f"input_dims needs one width per modality (audio, video, text), got {tuple(input_dims)}")
    if name == "lmf_lstm":
        return LMFNet(input_dims, hidden, task=task, num_classes=num_classes, **drop)
    if name == "tfn_lstm":
        return TFNNet(input_dims, hidden, task=task, num_classes=num_classes, **drop)
    outputs = 1 if task == "regression" else num_classes
    return WeightedDecisionFusion([LSTMSubNet(n, h, outputs, **drop) for n, h in zip(input_dims, hidden)],
                                  weights, learn_weights=learn_weights, task=task)
