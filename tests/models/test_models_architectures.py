"""Shapes and structure of the reference models (models.zoo, models.nets: heads, sequence_fusion, avt_ca)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfusion
from models import MODEL_NAMES, build_model, data_config
from models.datasets.data import CLASS_NAMES
from models.nets.avt_ca import AVTCA, LocalFeatureExtractor, MultiHeadAttention, TransformerFusionBlock
from models.nets.backbones import AudioCNN, VideoCNN, torchvision_r3d_18
from models.nets.heads import ADDITIVE_HEADS, HEAD_NAMES, HEAD_OPS, make_head
from models.nets.sequence_fusion import AudioVideoSequences, LMFNet, TFNNet
from models.zoo import AVT_CA_VARIANTS, features_for


def _batch(gen, size="tiny", batch=2):
    config = data_config(size)
    audio = torch.rand((batch, 1, *config.audio_size), generator=gen)
    video = torch.randn((batch, 3, config.num_frames, config.frame_size, config.frame_size), generator=gen)
    return audio, video


# Every model but mfa_cnn1d, which reads hand-crafted vectors (tests/models/test_seed_systems.py).
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if features_for(n) == "image"])
def test_every_model_classifies_a_tiny_batch(name, gen):
    torch.manual_seed(0)
    model = build_model(name, size="tiny", num_classes=4, class_names=CLASS_NAMES)
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


def _avt_blocks(model):
    """Which fusion blocks a model has, and every attention's head count."""
    blocks = {name for name in ("fuse_audio", "fuse_video", "exchange_audio", "exchange_video",
                                "late_audio", "late_video") if getattr(model, name) is not None}
    heads = {m.num_heads for m in model.modules() if isinstance(m, MultiHeadAttention)}
    return blocks, heads


def test_avt_ca_ablations_keep_one_fusion_stage():
    it = {"fuse_audio", "fuse_video"}
    ct = {"exchange_audio", "exchange_video", "late_audio", "late_video"}
    expected = {"avt_ca_it1": (it, {1}), "avt_ca_it4": (it, {4}), "avt_ca_ct1": (ct, {1}), "avt_ca_ct4": (ct, {4}),
                "avt_ca": (it | ct, {4})}  # the full model is IT-4 + CT-4
    assert set(AVT_CA_VARIANTS) == set(expected)
    for name, want in expected.items():
        assert _avt_blocks(build_model(name)) == want, name
    with pytest.raises(ValueError, match="transformer_fusion, cross_attention or both"):
        AVTCA(2, transformer_fusion=False, cross_attention=False)


def test_avt_ca_follows_the_paper(gen):
    """Batch norm in the transformer fusion, max pooling on the audio convolutions only,
    queries from the stream that receives the attention, max pooling over time at the end."""
    torch.manual_seed(0)
    model = build_model("avt_ca").eval()
    block = model.fuse_audio
    assert all(isinstance(m, nn.BatchNorm1d) for m in (block.norm_query, block.norm_context, block.norm_attention,
                                                       block.norm_mlp))
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, nn.MaxPool1d) for m in model.audio_stage1.modules()) == 2
    assert sum(isinstance(m, nn.MaxPool1d) for m in model.audio_stage2.modules()) == 2
    assert not any(isinstance(m, nn.MaxPool1d) for m in (*model.video_stage1.modules(), *model.video_stage2.modules()))
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = (args[0].shape[1], args[1].shape[1], output)
        return hook

    for name in ("fuse_audio", "fuse_video", "exchange_audio", "exchange_video", "late_audio", "late_video"):
        getattr(model, name).register_forward_hook(keep(name))
    audio, video = _batch(gen)  # 32 audio frames pool to 8 after stage 1, 2 after stage 2; 4 video frames
    logits = model(audio, video)
    assert seen["fuse_audio"][:2] == (8, 4) and seen["fuse_video"][:2] == (4, 8)
    assert seen["exchange_audio"][:2] == (2, 4) and seen["exchange_video"][:2] == (4, 2)
    assert seen["late_audio"][:2] == (2, 2) and seen["late_video"][:2] == (4, 4)
    pooled = seen["late_audio"][2].amax(1) + seen["late_video"][2].amax(1)
    torch.testing.assert_close(logits, model.classifier(pooled))


def test_transformer_fusion_block_is_the_papers_algorithm(gen):
    block = TransformerFusionBlock(8, 6, num_heads=2).eval()
    for m in block.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)

    def bn(m, t):
        return (t - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    x, c = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 4, 6, generator=gen)
    attended = block.attention(bn(block.norm_query, x), bn(block.norm_context, c))
    fc1, fc2 = block.mlp[0], block.mlp[3]
    mlp = fc2(F.gelu(fc1(bn(block.norm_attention, attended))))
    torch.testing.assert_close(block(x, c), attended + bn(block.norm_mlp, mlp))


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
