"""The seed systems that came with the real corpora, by name, at the zoo's two sizes
("tiny" for a CPU, "paper" for the papers' widths), plus the sequence models for
CMU-MOSEI's three pre-extracted modalities.

- ``mfa_cnn1d``: hand-crafted features, MFA fusion, 1D-CNN (:class:`~models.mfa_cnn.MFACNN`);
  reads the "handcrafted" corpus features (audio and video vectors);
- ``ca_triplet``: cross-modal attention trained with the emotion-constrained triplet loss
  (:mod:`models.cross_attention_triplet`); reads the "image" features, like the zoo;
- ``decision_fusion``: weighted decision fusion of an audio CNN and a video CNN
  (:mod:`models.decision_fusion`); "image" features;
- ``onn``: an operational neural network on each clip's key frame and its spectrogram
  (:mod:`models.onn`); "image" features.

On CMU-MOSEI (:func:`build_mosei_model`): ``lmf_lstm``, ``tfn_lstm`` and
``decision_fusion`` over the audio, video and text sequences, each modality through an
LSTM sub-network.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .backbones import AudioCNN, VideoCNN
from .cross_attention_triplet import CrossAttentionTriplet
from .decision_fusion import WeightedDecisionFusion, unimodal_classifier
from .handcrafted import HandcraftedFrontend
from .mfa_cnn import MFACNN
from .onn import OperationalAVNet
from .sequence_fusion import LMFNet, LSTMSubNet, TFNNet
from .zoo import SIZES, get_preset

SEED_MODEL_NAMES = ("mfa_cnn1d", "ca_triplet", "decision_fusion", "onn")
MOSEI_MODEL_NAMES = ("lmf_lstm", "tfn_lstm", "decision_fusion")
# Which corpus features (models.corpora.build_corpus's ``features``) each model reads.
_FEATURES = {"mfa_cnn1d": "handcrafted"}

# Per size: MFA components and 1D-CNN, attention width and heads, LSTM hidden sizes (audio,
# video, text). The LSTM sizes come from a paper (LMF's 32 / 32 / 128), the paper-size
# 1D-CNN is seed 002's table (models.cnn1d's defaults; the tiny one keeps its layers, kernel,
# pools and input length, at a quarter of its widths), the CNN encoders' widths come from the
# zoo's presets; the MFA components, attention and ONN sizes are our choices at both sizes.
_SIZES = {
    "tiny": {"mfa": {"n_components": 16, "cnn": {"channels": (64, 32, 16, 16, 8), "hidden": 64}},
             "attention": {"dim": 32, "num_heads": 2}, "lstm_hidden": (16, 16, 32),
             "onn": {"channels": (16, 32), "q": 3}},
    "paper": {"mfa": {"n_components": 32, "cnn": {}}, "attention": {"dim": 128, "num_heads": 4},
              "lstm_hidden": (32, 32, 128), "onn": {"channels": (32, 64, 128), "q": 3}},
}


def features_for(name: str) -> str:
    """The corpus features model ``name`` reads: "handcrafted" or "image"."""
    return _FEATURES.get(name, "image")


def _check_size(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return _SIZES[size]


def build_seed_model(
    name: str,
    *,
    size: str = "tiny",
    num_classes: int = 4,
    dropout: float | None = None,
    weights: Sequence[float] | None = None,
    learn_weights: bool = False,
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """The seed system ``name`` (one of :data:`SEED_MODEL_NAMES`), a classifier of
    ``num_classes``. ``dropout`` overrides every dropout probability; ``weights`` and
    ``learn_weights`` set decision fusion's (audio, video) weights; ``class_names`` (one
    per class) place the emotions for ca_triplet's loss, which needs them."""
    sizes = _check_size(size)
    drop = {} if dropout is None else {"dropout": dropout}
    if name == "mfa_cnn1d":
        options = sizes["mfa"]
        return MFACNN(HandcraftedFrontend().dims, num_classes, n_components=options["n_components"],
                      cnn={**options["cnn"], **drop})
    preset = get_preset(size)
    if name == "ca_triplet":
        if class_names is None or len(class_names) != num_classes:
            raise ValueError(f"ca_triplet needs class_names, one per class ({num_classes}), for its emotion "
                             f"constraint; got {class_names}")
        return CrossAttentionTriplet(class_names, audio_channels=preset.audio_channels,
                                     video_channels=preset.video_channels, **sizes["attention"], **drop)
    if name == "decision_fusion":
        audio = AudioCNN(preset.audio_channels, **drop)
        video = VideoCNN(preset.video_channels, **drop)
        classifiers = [unimodal_classifier(audio, audio.out_dim, num_classes),
                       unimodal_classifier(video, video.out_dim, num_classes)]
        return WeightedDecisionFusion(classifiers, weights, learn_weights=learn_weights)
    if name == "onn":
        return OperationalAVNet(num_classes, **sizes["onn"], **drop)
    raise ValueError(f"unknown seed model {name!r}; choose from {SEED_MODEL_NAMES}")


def build_mosei_model(
    name: str,
    input_dims: Sequence[int],
    *,
    size: str = "tiny",
    task: str = "regression",
    num_classes: int = 7,
    dropout: float | None = None,
    weights: Sequence[float] | None = None,
    learn_weights: bool = False,
) -> nn.Module:
    """A model over the (audio, video, text) sequences of widths ``input_dims`` (one of
    :data:`MOSEI_MODEL_NAMES`): forward(audio, video, text) -> (B,) sentiment for
    ``task="regression"``, else (B, num_classes)."""
    hidden = _check_size(size)["lstm_hidden"]
    if len(input_dims) != len(hidden):
        raise ValueError(f"input_dims needs one width per modality (audio, video, text), got {tuple(input_dims)}")
    drop = {} if dropout is None else {"dropout": dropout}
    if name == "lmf_lstm":
        return LMFNet(input_dims, hidden, task=task, num_classes=num_classes, **drop)
    if name == "tfn_lstm":
        return TFNNet(input_dims, hidden, task=task, num_classes=num_classes, **drop)
    if name == "decision_fusion":
        outputs = 1 if task == "regression" else num_classes
        return WeightedDecisionFusion([LSTMSubNet(n, h, outputs, **drop) for n, h in zip(input_dims, hidden)],
                                      weights, learn_weights=learn_weights, task=task)
    raise ValueError(f"unknown CMU-MOSEI model {name!r}; choose from {MOSEI_MODEL_NAMES}")
