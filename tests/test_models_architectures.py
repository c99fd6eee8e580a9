"""Shapes and structure of the reference models (models.zoo, heads, sequence_fusion, avt_ca)."""

import math

import pytest
import torch
from torch import nn

import fastfusion
from models import MODEL_NAMES, build_model, data_config
from models.avt_ca import ABLATIONS, AVTCA, LocalFeatureExtractor, MultiHeadAttention
from models.backbones import AudioCNN, VideoCNN, torchvision_r3d_18
from models.heads import ADDITIVE_HEADS, HEAD_NAMES, HEAD_OPS, make_head
from models.sequence_fusion import AudioVideoSequences, LMFNet, TFNNet


def _batch(gen, size="tiny", batch=2):
    config = data_config(size)
    audio = torch.rand((batch, 1, *config.audio_size), generator=gen)
    video = torch.randn((batch, 3, config.num_frames, config.frame_size, config.frame_size), generator=gen)
    return audio, video


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_classifies_a_tiny_batch(name, gen):
    torch.manual_seed(0)
    model = build_model(name, size="tiny", num_classes=4)
    out = model(*_batch(gen, batch=3))
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lmf_lstm", "tfn_lstm"])
def test_sequence_models_regress_one_score_per_clip(name, gen):
    model = build_model(name, size="tiny", task="regression")
    out = model(*_batch(gen, batch=3))
    assert out.shape == (3,)


def test_paper_sizes_build_with_the_papers_widths():
    cbgp = build_model("cbgp", size="paper")
    assert [m.out_channels for m in cbgp.audio_encoder.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256]
    assert [m.out_channels for m in cbgp.video_encoder.modules() if isinstance(m, nn.Conv3d)] == [64, 128, 256, 512]
    convs3d = [m for m in cbgp.video_encoder.modules() if isinstance(m, nn.Conv3d)]
    assert all(m.kernel_size == (3, 3, 3) and m.stride == (1, 1, 1) for m in convs3d)
    assert cbgp.audio_encoder.dropout.p == 0.3 and cbgp.video_encoder.dropout.p == 0.2
    assert cbgp.head.fusion.out_dim == 16000 and cbgp.head.fusion.gate == "softmax"
    mfb = build_model("mfb", size="paper").head.fusion
    assert (mfb.out_dim, mfb.factor) == (1000, 5)
    avt = build_model("avt_ca", size="paper")
    assert avt.frame_encoder.head[0].out_channels == 1024


def test_paper_size_encoders_run_on_small_inputs(gen):
    # The encoders pool globally, so the paper's widths run on any input size.
    audio, video = _batch(gen)
    assert AudioCNN()(audio).shape == (2, 256)
    assert VideoCNN()(video).shape == (2, 512)


def test_video_pooling_keeps_a_single_frame():
    assert VideoCNN((4, 4, 4, 4))(torch.randn(2, 3, 1, 16, 16)).shape == (2, 4)


def test_build_model_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("concat")
    with pytest.raises(ValueError, match="classifier"):
        build_model("cbgp", task="regression")
    with pytest.raises(ValueError, match="size"):
        build_model("cbgp", size="huge")


def test_dropout_override_reaches_every_dropout():
    for name in ("mfb", "lmf_lstm", "avt_ca"):
        model = build_model(name, dropout=0.0)
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
        own_dropout = (fastfusion.FactorizedBilinearPooling, MultiHeadAttention)
        assert all(m.dropout == 0.0 for m in model.modules() if isinstance(m, own_dropout))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_heads_map_embeddings_to_class_scores(name, gen):
    head = make_head(name, (6, 10), 5, **({} if name in ADDITIVE_HEADS else {"out_dim": 12}))
    out = head(torch.randn(4, 6, generator=gen), torch.randn(4, 10, generator=gen))
    assert out.shape == (4, 5)
    if name in ("late", "hybrid"):  # averaged decisions come back as log-probabilities
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))


def test_late_fusion_averages_the_unimodal_probabilities(gen):
    head = make_head("late", (3, 4), 2)
    a, v = torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen)
    expected = (head.audio_classifier(a).softmax(-1) + head.video_classifier(v).softmax(-1)) / 2
    torch.testing.assert_close(head(a, v).exp(), expected)


def test_head_options_are_checked():
    with pytest.raises(TypeError, match="no options"):
        make_head("early", (2, 2), 2, out_dim=3)
    with pytest.raises(ValueError, match="unknown fusion head"):
        make_head("sum", (2, 2), 2)


@pytest.mark.parametrize("name", sorted(HEAD_OPS))
def test_fused_and_reference_backends_agree_on_a_head(name, gen):
    torch.manual_seed(0)
    head = make_head(name, (6, 10), 3, out_dim=15, **({"dropout": 0.0} if name == "mfb" else {}))
    a, v = torch.randn(4, 6, generator=gen), torch.randn(4, 10, generator=gen)
    results = {}
    for backend in ("eager", "auto"):
        head.zero_grad()
        with fastfusion.backend(backend):
            out = head(a, v)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in head.parameters()])
    torch.testing.assert_close(results["auto"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for fused, reference in zip(results["auto"][1], results["eager"][1]):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_lmf_and_tfn_take_any_number_of_modalities(gen):
    xs = [torch.randn(3, 7, n, generator=gen) for n in (5, 4, 9)]
    lmf = LMFNet((5, 4, 9), (6, 6, 8), rank=2, task="classification", num_classes=3)
    assert lmf(*xs).shape == (3, 3)
    assert lmf.fusion.rank == 2 and [p.shape for p in lmf.fusion.factors] == [(2, 7, 3), (2, 7, 3), (2, 9, 3)]
    tfn = TFNNet((5, 4, 9), (6, 6, 8), post_fusion_dim=10)
    out = tfn(*xs)
    assert out.shape == (3,) and (out.abs() <= 3).all()  # TFN's scaled sigmoid keeps [-3, 3]
    assert tfn.fusion.weight.shape == (10, 7 * 7 * 9)
    with pytest.raises(ValueError, match="one entry per modality"):
        LMFNet((5, 4), (6,))


def test_sequence_adapter_reads_spectrogram_columns_and_frames():
    seen = {}

    class Spy(nn.Module):
        def forward(self, audio, video):
            seen["audio"], seen["video"] = audio, video
            return audio.sum()

    audio = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 1, 3, 5)  # (B, 1, F, W)
    video = torch.randn(2, 3, 4, 6, 6)
    AudioVideoSequences(Spy())(audio, video)
    assert seen["audio"].shape == (2, 5, 3)
    torch.testing.assert_close(seen["audio"][1, 2], audio[1, 0, :, 2])  # step 2 = column 2
    assert seen["video"].shape == (2, 4, 3 * 6 * 6)
    torch.testing.assert_close(seen["video"][0, 1], video[0, :, 1].flatten())


def test_attention_is_scaled_dot_product_attention(gen):
    attention = MultiHeadAttention(8, 6, num_heads=2)
    q, c = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 3, 6, generator=gen)
    query = attention.to_query(q).view(2, 5, 2, 4).transpose(1, 2)
    key, value = (t.view(2, 3, 2, 4).transpose(1, 2) for t in attention.to_key_value(c).chunk(2, dim=-1))
    weights = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attention.out((weights @ value).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attention(q, c), expected)


def test_avt_ca_ablations_switch_cross_attention_and_heads():
    assert set(ABLATIONS) == {"it-1", "it-4", "ct-1", "ct-4"}
    for variant, expected in ABLATIONS.items():
        model = build_model(f"avt_ca_{variant.replace('-', '')}")
        assert (model.cross_audio is not None) == expected["cross_attention"]
        assert model.self_attention.num_heads == expected["num_heads"]
    full = build_model("avt_ca")
    assert full.cross_audio is not None and full.self_attention.num_heads == 4


def test_avt_ca_accepts_audio_with_or_without_channel_dim(gen):
    torch.manual_seed(0)
    model = AVTCA(3, audio_in=8, audio_channels=(8, 8, 8, 8), stage_channels=(4, 8, 8, 8), stage_repeats=(1, 1, 1),
                  frame_dim=8, temporal_channels=(8, 8, 8, 8), num_heads=2).eval()
    audio, frames = torch.randn(2, 8, 10, generator=gen), torch.randn(2, 3, 3, 16, 16, generator=gen)
    torch.testing.assert_close(model(audio, frames), model(audio[:, None], frames))


def test_avt_ca_checks_its_sizes():
    with pytest.raises(ValueError, match="same width"):
        AVTCA(2, audio_channels=(8, 8, 8, 16), temporal_channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        LocalFeatureExtractor(2, 2)(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="must divide"):
        MultiHeadAttention(6, 6, num_heads=4)


def test_torchvision_backbone_is_optional(gen):
    try:
        backbone = torchvision_r3d_18()
    except ImportError:
        pytest.skip("torchvision does not import here")
    assert backbone(torch.randn(1, 3, 4, 32, 32, generator=gen)).shape == (1, 512)
