"""The new seed systems: 1D-CNN, MFA + 1D-CNN, cross-modal attention with the
emotion-constrained triplet loss, weighted decision fusion; each trains on synthetic data."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from models.datasets.data import CLASS_NAMES, train_test_split
from models.nets.cnn1d import Conv1DClassifier
from models.nets.cross_attention_triplet import CrossAttentionTriplet, emotion_distance, emotion_triplet_loss
from models.nets.decision_fusion import WeightedDecisionFusion
from models.nets.mfa_cnn import MFACNN
from models.nets.onn import SelfONN2d, key_frame_indices, select_key_frames
from models.zoo import MOSEI_MODEL_NAMES, build_model, features_for


@pytest.fixture(scope="module")
def synthetic_batch():
    """32 clips of the synthetic audio-video emotion set (tiny size), as one batch."""
    train, _ = train_test_split(32, 1, seed=0)
    return default_collate([train[i] for i in range(len(train))])


def train_steps(model, inputs, target, steps=12, lr=3e-3, task_loss=F.cross_entropy):
    """Adam steps on one batch; the losses before each step. Models with their own
    training loss (``has_training_loss``) compute it from the target."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        if getattr(model, "has_training_loss", False):
            loss = model(*inputs, target=target)
        else:
            loss = task_loss(model(*inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_decreasing(losses):
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


# --- 1D-CNN ---------------------------------------------------------------------------


def test_conv1d_classifier_is_the_papers_table():
    """Seed 002's table, with its two misprinted rows read as derived in models/nets/cnn1d.py:
    (k c_in + 1) c_out per convolution, (n_in + 1) n_out per dense layer."""
    net = Conv1DClassifier().eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv1d)]
    assert [m.out_channels for m in convs] == [256, 128, 64, 64, 32]
    assert all(m.kernel_size == (3,) and m.padding == (0,) for m in convs)
    assert [m.kernel_size for m in net.modules() if isinstance(m, nn.MaxPool1d)] == [3, 3, 3]
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.2]
    dense = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(32, 256), (256, 6)]
    layers = convs + dense
    assert [sum(p.numel() for p in m.parameters()) for m in layers] == [
        (3 * 1 + 1) * 256, (3 * 256 + 1) * 128, (3 * 128 + 1) * 64, (3 * 64 + 1) * 64, (3 * 64 + 1) * 32,
        (32 + 1) * 256, (256 + 1) * 6]
    assert sum(p.numel() for p in net.parameters()) == 152_614  # the table's "Total params"
    # The shape column: lengths after each convolution and each pooling, for 162 steps in.
    lengths = []
    for m in net.features:
        if isinstance(m, (nn.Conv1d, nn.MaxPool1d)):
            m.register_forward_hook(lambda mod, inp, out: lengths.append(out.shape[-1]))
    assert net(torch.randn(2, 162)).shape == (2, 6)
    assert lengths == [160, 53, 51, 17, 15, 5, 3, 1]
    # The dropouts follow the 2nd and 3rd blocks' poolings; the 4th and 5th pool by 1.
    assert [type(m).__name__ for m in net.features] == [
        "Conv1d", "ReLU", "MaxPool1d", "Conv1d", "ReLU", "MaxPool1d", "Dropout",
        "Conv1d", "ReLU", "MaxPool1d", "Dropout", "Conv1d", "ReLU", "Conv1d", "ReLU"]


def test_conv1d_classifier_checks_its_sizes():
    net = Conv1DClassifier(4, input_length=20, in_channels=7, channels=(8, 8), pools=(2, 1), dropout_after=())
    assert net(torch.randn(2, 7, 20)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 20\) or \(B, 7, 20\)"):
        net(torch.randn(2, 3, 20))
    with pytest.raises(ValueError, match=r"expected"):
        net(torch.randn(2, 7, 21))
    with pytest.raises(ValueError, match="input_length 160 is too short"):
        Conv1DClassifier(input_length=160)  # 161 is the table's shortest input
    Conv1DClassifier(input_length=161)
    with pytest.raises(ValueError, match="pools needs one size per block"):
        Conv1DClassifier(pools=(3, 3))
    with pytest.raises(ValueError, match="dropout_after"):
        Conv1DClassifier(dropout_after=(5,))


def test_conv1d_trains_on_synthetic_mel_sequences(synthetic_batch):
    torch.manual_seed(0)
    mels = synthetic_batch["audio"].squeeze(1)  # (B, 32 mel bands, 32 frames)
    # Standardised per band: the table has no normalisation layer, and these dB images sit
    # in a narrow band around 0.74.
    mels = (mels - mels.mean((0, 2), keepdim=True)) / mels.std((0, 2), keepdim=True)
    net = Conv1DClassifier(4, input_length=mels.shape[2], in_channels=mels.shape[1], channels=(16, 32),
                           pools=(2, 2), dropout_after=(), hidden=32, dropout=0.0)
    assert_decreasing(train_steps(net, (mels,), synthetic_batch["label"]))


# --- MFA + 1D-CNN ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def handcrafted_corpus(tmp_path_factory):
    """Hand-crafted vectors of a fake RAVDESS (raw media whose pitch and motion follow the class)."""
    pytest.importorskip("av")
    pytest.importorskip("soundfile")
    pytest.importorskip("librosa")
    from models.datasets.corpora import RAVDESS
    from models.features.handcrafted import HandcraftedFrontend

    from fake_corpora import make_ravdess

    root = tmp_path_factory.mktemp("ravdess")
    make_ravdess(root, actors=(1, 2, 3))
    return RAVDESS(root, frontend=HandcraftedFrontend(), cache_dir=root / "cache")


def test_mfa_cnn_prepares_then_trains(handcrafted_corpus):
    torch.manual_seed(0)
    model = build_model("mfa_cnn1d", num_classes=8, dropout=0.0)
    batch = default_collate([handcrafted_corpus[i] for i in range(len(handcrafted_corpus))])
    with pytest.raises(RuntimeError, match="not fitted"):
        model(batch["audio"], batch["video"])
    model.prepare(handcrafted_corpus)
    fused = model.fuse(batch["audio"], batch["video"])
    assert fused.shape == (24, 16)
    # Rescaled to unit variance per component over the fitting set.
    torch.testing.assert_close(fused.std(0, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)
    assert_decreasing(train_steps(model, (batch["audio"], batch["video"]), batch["label"], steps=15, lr=1e-2))
    # The fitted fusion travels in the state dict.
    clone = build_model("mfa_cnn1d", num_classes=8)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(batch["audio"], batch["video"]), model(batch["audio"], batch["video"]))


def test_mfa_cnn_checks_its_inputs():
    with pytest.raises(ValueError, match="n_components"):
        MFACNN({"audio": 3, "video": 2}, 2, n_components=6)
    with pytest.raises(ValueError, match=r"n_components \(5\) exceeds the 1D-CNN's input_length \(4\)"):
        MFACNN({"audio": 3, "video": 2}, 2, n_components=5,
               cnn={"input_length": 4, "channels": (2,), "pools": (1,), "dropout_after": ()})
    model = MFACNN({"audio": 3, "video": 2}, 2, n_components=2)
    model.fit_fusion([torch.randn(20, 3), torch.randn(20, 2)], torch.arange(20) % 2)
    # The fused vector reaches the table's 162 steps by zeros at its end.
    a, v = torch.randn(4, 3), torch.randn(4, 2)
    padded = torch.cat([model.fuse(a, v), torch.zeros(4, 160)], dim=1)
    model.eval()
    torch.testing.assert_close(model(a, v), model.classifier(padded))
    with pytest.raises(ValueError, match=r"widths \(3, 2\) for \('audio', 'video'\), got \(5,\)"):
        model(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"got \(3, 3\)"):
        model.fit_fusion([torch.randn(20, 3), torch.randn(20, 3)], torch.arange(20) % 2)


# --- triplet loss and cross-modal attention -------------------------------------------


def brute_force_triplet(anchor, other, labels, margin):
    a, o = F.normalize(anchor, dim=-1), F.normalize(other, dim=-1)
    terms = []
    for i in range(len(a)):
        positives = [torch.dist(a[i], o[j]) for j in range(len(o)) if labels[j] == labels[i]]
        negatives = [torch.dist(a[i], o[j]) for j in range(len(o)) if labels[j] != labels[i]]
        if negatives:
            terms.append(torch.relu(max(positives) - min(negatives) + margin))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(3))
def test_triplet_loss_is_batch_hard_and_cross_modal(seed):
    g = torch.Generator().manual_seed(seed)
    anchor, other = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    labels = torch.randint(3, (10,), generator=g)
    expected = brute_force_triplet(anchor, other, labels, 0.3)
    torch.testing.assert_close(emotion_triplet_loss(anchor, other, labels, margin=0.3), expected)


def test_triplet_loss_edge_cases():
    # Separated emotions: each anchor is at distance 0 from its positives and sqrt(2) from
    # its negatives, beyond any margin below sqrt(2).
    anchor = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    other = torch.tensor([[5.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    assert emotion_triplet_loss(anchor, other, labels, margin=1.0).item() == 0.0
    # One emotion only: no negative, no loss, but a graph to backpropagate through.
    loss = emotion_triplet_loss(anchor, other, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(anchor.grad, torch.zeros_like(anchor))
    # Coinciding anchor and positive: finite gradients.
    same = torch.randn(4, 5, requires_grad=True)
    emotion_triplet_loss(same, same.detach(), torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(same.grad).all()


def test_emotion_constraint_on_a_hand_made_case():
    # Happy (0), surprised (1), sad (2); D by hand: happy-surprised near, happy-sad farthest.
    gap = torch.tensor([[0.0, 0.25, 1.0], [0.25, 0.0, 0.75], [1.0, 0.75, 0.0]])
    labels = torch.tensor([0, 1, 2])
    east, west, north = [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]
    # Each anchor sits on its own clip of the other modality. Distances: 0 to itself, 2
    # across (east-west), sqrt(2) at right angles; with margin 0.5 every plain triplet holds.
    wrong = torch.tensor([east, west, north])  # surprised opposite happy, sad at right angles
    plain = emotion_triplet_loss(wrong, wrong, labels, margin=0.5)
    assert plain.item() == 0.0
    # Ranked triples (i, j nearer emotion, k farther):
    #   (happy; surprised, sad):  2 - sqrt(2) + 0.5 (1 - 0.25)    = 0.9608
    #   (surprised; happy, sad):  2 - sqrt(2) + 0.5 (0.75 - 0.25) = 0.8358
    #   (sad; surprised, happy):  sqrt(2) - sqrt(2) + 0.5 (1 - 0.75) = 0.125
    expected = (2 - math.sqrt(2) + 0.375 + 2 - math.sqrt(2) + 0.25 + 0.125) / 3
    got = emotion_triplet_loss(wrong, wrong, labels, margin=0.5, emotion_distance=gap)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Surprised at right angles to happy, sad opposite: only (surprised; happy, sad) still
    # falls short, by its margin: sqrt(2) - sqrt(2) + 0.5 (0.75 - 0.25) = 0.25.
    right = torch.tensor([east, north, west])
    got = emotion_triplet_loss(right, right, labels, margin=0.5, emotion_distance=gap)
    assert got.item() == pytest.approx(0.25 / 3, abs=1e-6)
    # Emotions all equally far apart: nothing to rank, the plain loss.
    flat = 1.0 - torch.eye(3)
    assert emotion_triplet_loss(wrong, wrong, labels, margin=0.5, emotion_distance=flat).item() == 0.0


def test_emotion_distance_places_the_emotions():
    d = emotion_distance(("Happiness", "surprise", "sad", "calm", "anger", "fear", "disgust", "neutral"))
    torch.testing.assert_close(d, d.T)
    assert torch.equal(d.diagonal(), torch.zeros(8)) and d.max() == 1.0
    happy, surprise, sad = 0, 1, 2
    assert d[happy, surprise] < d[happy, sad]  # the review's two examples
    assert d[happy].argmax() == sad
    with pytest.raises(ValueError, match="class_names: no valence / arousal place for 'bored'"):
        emotion_distance(("happy", "bored"))
    with pytest.raises(ValueError, match="at least two distinct emotions"):
        emotion_distance(("happy", "happiness"))



def test_sentiment_classes_lie_on_the_valence_axis():
    # CMU-MOSEI's 7 sentiment classes: distance |a - b| over the range 6.
    d = emotion_distance(tuple(str(v) for v in range(-3, 4)))
    assert d[0, 6] == 1 and abs(float(d[2, 3]) - 1 / 6) < 1e-7 and abs(float(d[1, 5]) - 4 / 6) < 1e-7

def test_cross_attention_triplet_trains_on_synthetic(synthetic_batch):
    torch.manual_seed(0)
    model = build_model("ca_triplet", dropout=0.0, class_names=CLASS_NAMES)
    inputs, target = (synthetic_batch["audio"], synthetic_batch["video"]), synthetic_batch["label"]
    assert model(*inputs).shape == (32, 4)
    assert_decreasing(train_steps(model, inputs, target))
    # The training loss is cross-entropy plus the weighted triplet terms.
    model.eval()
    total = model(*inputs, target=target)
    model.triplet_weight = 0.0
    torch.testing.assert_close(model(*inputs, target=target), F.cross_entropy(model(*inputs), target))
    assert total > model(*inputs, target=target)


# --- weighted decision fusion ---------------------------------------------------------


def linear_models(dims, classes, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(d, classes) for d in dims]


def test_decision_fusion_with_given_weights():
    models = linear_models((3, 4, 5), 6)
    fusion = WeightedDecisionFusion(models, (0.55, 0.38, 0.07))
    inputs = [torch.randn(8, d) for d in (3, 4, 5)]
    expected = sum(w * torch.softmax(m(x), -1) for w, m, x in zip((0.55, 0.38, 0.07), models, inputs))
    torch.testing.assert_close(fusion(*inputs).exp(), expected)
    target = torch.randint(6, (8,))
    per_model = sum(F.cross_entropy(m(x), target) for m, x in zip(models, inputs))
    torch.testing.assert_close(fusion(*inputs, target=target), per_model)
    torch.testing.assert_close(WeightedDecisionFusion(models, (2, 1, 1)).weights, torch.tensor([0.5, 0.25, 0.25]))
    zero = WeightedDecisionFusion(models, (1, 0, 0))
    torch.testing.assert_close(zero(*inputs).exp(), torch.softmax(models[0](inputs[0]), -1))
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError, match="one non-negative value per model"):
            WeightedDecisionFusion(models, bad)
    with pytest.raises(ValueError, match="start from positive"):
        WeightedDecisionFusion(models, (1, 0, 0), learn_weights=True)


def test_learned_weights_favour_the_informative_modality_without_steering_the_models():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(3, (256,), generator=g)
    informative = F.one_hot(target, 3).float() + 0.3 * torch.randn(256, 3, generator=g)
    noise = [torch.randn(256, 3, generator=g) for _ in range(2)]
    inputs = (noise[0], informative, noise[1])
    fusion = WeightedDecisionFusion(linear_models((3, 3, 3), 3), learn_weights=True)
    # The weights' term sees detached decisions: the models get exactly their own losses' gradients.
    fusion(*inputs, target=target).backward()
    grads = [p.grad.clone() for p in fusion.models.parameters()]
    fusion.zero_grad()
    sum(F.cross_entropy(m(x), target) for m, x in zip(fusion.models, inputs)).backward()
    for got, want in zip(grads, (p.grad for p in fusion.models.parameters())):
        torch.testing.assert_close(got, want)
    assert fusion.weight_logits.grad is None
    train_steps(fusion, inputs, target, steps=150, lr=0.05)
    weights = fusion.weights.detach()
    assert weights.argmax() == 1 and weights[1] > 0.6, weights


def test_decision_fusion_regression():
    models = linear_models((2, 2), 1)
    fusion = WeightedDecisionFusion(models, (0.7, 0.3), task="regression")
    inputs = [torch.randn(5, 2), torch.randn(5, 2)]
    expected = 0.7 * models[0](inputs[0])[:, 0] + 0.3 * models[1](inputs[1])[:, 0]
    torch.testing.assert_close(fusion(*inputs), expected)
    target = torch.randn(5)
    torch.testing.assert_close(fusion(*inputs, target=target),
                               sum(F.l1_loss(m(x)[:, 0], target) for m, x in zip(models, inputs)))


def test_decision_fusion_trains_on_synthetic(synthetic_batch):
    torch.manual_seed(0)
    model = build_model("decision_fusion", dropout=0.0, weights=(0.55, 0.45), learn_weights=True)
    inputs = (synthetic_batch["audio"], synthetic_batch["video"])
    assert model(*inputs).shape == (32, 4)
    assert_decreasing(train_steps(model, inputs, synthetic_batch["label"]))


# --- operational neural network ----------------------------------------------------------


@pytest.mark.parametrize("q", [1, 2, 4])
def test_self_onn_layer_is_a_sum_of_convolutions_of_powers(q):
    g = torch.Generator().manual_seed(q)
    layer = SelfONN2d(3, 5, 3, q=q, padding=1, stride=2)
    x = torch.rand(2, 3, 9, 9, generator=g) * 2 - 1
    expected = sum(F.conv2d(x**p, layer.kernel(p), stride=2, padding=1) for p in range(1, q + 1))
    torch.testing.assert_close(layer(x), expected + layer.conv.bias[:, None, None])
    assert [layer.kernel(p).shape for p in range(1, q + 1)] == [(5, 3, 3, 3)] * q


def test_self_onn_layer_with_q_one_is_a_plain_convolution():
    layer = SelfONN2d(2, 4, 3, q=1)
    conv = nn.Conv2d(2, 4, 3)
    conv.load_state_dict(layer.conv.state_dict())
    x = torch.randn(3, 2, 7, 6)
    torch.testing.assert_close(layer(x), conv(x))
    with pytest.raises(ValueError, match="q .* at least 1"):
        SelfONN2d(2, 4, 3, q=0)
    with pytest.raises(ValueError, match=r"power must lie in \[1, 1\]"):
        layer.kernel(2)
    with pytest.raises(ValueError, match=r"expected \(B, 2, H, W\)"):
        layer(torch.randn(3, 3, 7, 6))


def test_key_frame_is_the_sharpest_of_the_changing_frames():
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 1.0  # checkerboard of 0 and 1
    # Frames: sharp and static, the same again, flat (a big change), a fainter board.
    frames = torch.stack([2 * board, 2 * board, torch.zeros(8, 8), board])  # (T, H, W)
    video = frames[None, None].expand(1, 3, 4, 8, 8)
    # Changes 0 (as frame 1's), 0, 1, 0.5: median 0.25 keeps frames 2 and 3; 3 is sharper.
    assert key_frame_indices(video).tolist() == [3]
    # Reversed (faint, flat, sharp, sharp): changes 0.5, 0.5, 1, 0; median 0.5 keeps frames
    # 0 to 2, and the sharp board that follows the flat frame (2) wins over the static one (3).
    clips = torch.cat([video, video.flip(2)])
    assert key_frame_indices(clips).tolist() == [3, 2]
    torch.testing.assert_close(select_key_frames(clips), torch.stack([board, 2 * board])[:, None].expand(2, 3, 8, 8))
    assert key_frame_indices(video[:, :, :1]).tolist() == [0]
    with pytest.raises(ValueError, match=r"expected video \(B, C, T, H, W\)"):
        key_frame_indices(frames)


def test_onn_trains_on_synthetic(synthetic_batch):
    torch.manual_seed(0)
    model = build_model("onn", dropout=0.0)
    inputs = (synthetic_batch["audio"], synthetic_batch["video"])
    assert model(*inputs).shape == (32, 4)
    assert sum(isinstance(m, SelfONN2d) for m in model.audio_branch) == 2
    assert sum(isinstance(m, SelfONN2d) for m in model.video_branch) == 2
    assert_decreasing(train_steps(model, inputs, synthetic_batch["label"], lr=1e-2))
    paper = build_model("onn", size="paper", num_classes=8)
    assert [m.conv.out_channels for m in paper.video_branch if isinstance(m, SelfONN2d)] == [32, 64, 128]


# --- the zoo --------------------------------------------------------------------------


def test_seed_system_names_and_features():
    assert features_for("mfa_cnn1d") == "handcrafted"
    assert features_for("ca_triplet") == features_for("cbgp") == "image"
    with pytest.raises(ValueError, match="input_dims .* needs one of"):
        build_model("cbgp", input_dims=(5, 4, 7))
    with pytest.raises(ValueError, match="size must be one of"):
        build_model("ca_triplet", size="huge", class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="ca_triplet needs class_names"):
        build_model("ca_triplet")
    with pytest.raises(ValueError, match="ca_triplet needs class_names, one per class"):
        build_model("ca_triplet", num_classes=3, class_names=CLASS_NAMES)
    ravdess = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    assert isinstance(build_model("ca_triplet", size="paper", num_classes=8, class_names=ravdess),
                      CrossAttentionTriplet)
    paper = build_model("mfa_cnn1d", size="paper", num_classes=6)
    assert sum(p.numel() for p in paper.classifier.parameters()) == 152_614


@pytest.mark.parametrize("name", MOSEI_MODEL_NAMES)
def test_mosei_models_train_on_three_sequences(name):
    g = torch.Generator().manual_seed(0)
    audio, video, text = (torch.randn(16, 6, d, generator=g) for d in (5, 4, 7))
    sentiment = (text[:, :, 0].mean(1) * 3).clamp(-3, 3)
    model = build_model(name, input_dims=(5, 4, 7), task="regression", dropout=0.0)
    assert model(audio, video, text).shape == (16,)
    assert_decreasing(train_steps(model, (audio, video, text), sentiment, steps=15, lr=1e-2, task_loss=F.l1_loss))
    classifier = build_model(name, input_dims=(5, 4, 7), num_classes=7)
    assert classifier(audio, video, text).shape == (16, 7)

