"""Hand-crafted audio and video features, and Marginal Fisher Analysis against a direct
small-case solution."""

import math

import numpy as np
import pytest
import torch

from models.features import handcrafted as hc
from models.features.mfa import MarginalFisherAnalysis, MFAFusion, mfa_graphs

SR = 22050


def tone(f0: float, seconds: float = 0.5, harmonics: int = 1, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * SR), dtype=torch.float64) / SR
    return amplitude * sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, harmonics + 1))


# --- audio ----------------------------------------------------------------------------


def test_mfcc_matches_librosa():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    y = 0.3 * np.sin(2 * np.pi * 310 * np.arange(SR) / SR) + 0.05 * rng.standard_normal(SR)
    expected = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=13)
    got = hc.mfcc(torch.from_numpy(y), SR).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_zero_crossing_rate_and_rms_of_a_sinusoid():
    wave = tone(440.0, amplitude=0.3)
    zcr = hc.zero_crossing_rate(wave)[2:-2]  # frames away from the zero-padded ends
    assert zcr.mean().item() == pytest.approx(2 * 440 / SR, rel=0.01)
    assert hc.rms_energy(wave)[2:-2].mean().item() == pytest.approx(0.3 / math.sqrt(2), rel=1e-3)


@pytest.mark.parametrize("f0", [90.0, 220.0, 410.0])
def test_autocorrelation_pitch_of_a_harmonic_tone(f0):
    pitch, voicing = hc.autocorrelation_pitch(tone(f0, harmonics=4), SR)
    assert torch.all(pitch[2:-2] > 0)
    torch.testing.assert_close(pitch[2:-2], torch.full_like(pitch[2:-2], f0), rtol=0.01, atol=0)
    assert voicing[2:-2].min() > 0.8


def test_noise_and_silence_are_unvoiced():
    noise = torch.randn(SR, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pitch, _ = hc.autocorrelation_pitch(noise, SR)
    assert (pitch > 0).double().mean() < 0.1
    pitch, voicing = hc.autocorrelation_pitch(torch.zeros(SR, dtype=torch.float64), SR)
    assert torch.all(pitch == 0) and torch.all(voicing == 0)


def test_audio_clip_features():
    features = hc.audio_clip_features(tone(200.0, harmonics=3).float(), SR)
    assert features.shape == (2 * 13 + 7,) and features.dtype == torch.float32
    assert features[-3].item() == pytest.approx(200.0, rel=0.01)  # mean f0 over voiced frames
    assert features[-1].item() > 0.8  # voiced fraction
    silent = hc.audio_clip_features(torch.zeros(SR // 2), SR)
    assert torch.isfinite(silent).all() and silent[-3:].abs().sum() == 0


# --- video ----------------------------------------------------------------------------


def turning_blob(frames: int = 24, size: int = 48, turn: int = 12) -> torch.Tensor:
    """A Gaussian blob moving right at 2 px / frame, turning back at frame ``turn``."""
    y, x = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    clip = []
    for t in range(frames):
        cx = 10 + 2.0 * (t if t < turn else 2 * turn - t)
        clip.append(0.3 + 0.6 * torch.exp(-((x - cx) ** 2 + (y - size / 2) ** 2) / (2 * 3.0**2)))
    return torch.stack(clip)


def test_gaussian_smoothing_keeps_constants_and_mass():
    constant = np.full((5, 9, 9), 0.7)
    np.testing.assert_allclose(hc.gaussian_smooth(constant, (1.0, 2.0, 2.0)), constant)
    impulse = np.zeros((21, 21, 21))
    impulse[10, 10, 10] = 1.0
    assert hc.gaussian_smooth(impulse, (1.5, 2.0, 2.0)).sum() == pytest.approx(1.0)


def test_static_video_has_no_interest_points():
    background = torch.rand(48, 48, generator=torch.Generator().manual_seed(0))
    static = background.expand(16, 48, 48).clone()
    points, _ = hc.interest_points(static)
    assert len(points) == 0
    assert torch.all(hc.harris3d_response(static) <= 1e-12)
    assert torch.equal(hc.stip_features(static), torch.zeros(29))


def test_harris3d_fires_where_the_motion_turns():
    clip = turning_blob()
    points, strength = hc.interest_points(clip)
    t, y, x = points[0].tolist()
    assert abs(t - 12) <= 1 and abs(y - 24) <= 2 and abs(x - 34) <= 3  # the blob at the turn
    assert torch.all(strength[:-1] >= strength[1:])
    rgb = (clip[..., None].expand(-1, -1, -1, 3) * 255).round().to(torch.uint8)
    features = hc.stip_features(rgb)
    assert features.shape == (29,) and torch.isfinite(features).all()
    layout = features[-9:].view(3, 3)  # the fraction of points in each grid cell
    assert layout[1].sum().item() == pytest.approx(1.0)  # the blob moves along the middle row


def test_handcrafted_frontend_dims():
    frontend = hc.HandcraftedFrontend()
    frames = (turning_blob(8, 32)[..., None].expand(-1, -1, -1, 3) * 255).to(torch.uint8)
    out = frontend(tone(180.0, harmonics=2).float(), frames)
    assert {k: v.shape[0] for k, v in out.items()} == frontend.dims
    assert set(frontend(None, frames)) == {"video"}


# --- MFA ------------------------------------------------------------------------------


def brute_force_graphs(x, y, k1, k2):
    """MFA's graphs from their definitions, one pair at a time."""
    n = len(x)
    d = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    intrinsic = np.zeros((n, n))
    for i in range(n):
        same = sorted((d[i, j], j) for j in range(n) if j != i and y[j] == y[i])
        for _, j in same[:k1]:
            intrinsic[i, j] = intrinsic[j, i] = 1
    penalty = np.zeros((n, n))
    for c in set(y.tolist()):
        pairs = sorted((d[i, j], i, j) for i in range(n) if y[i] == c for j in range(n) if y[j] != c)
        for _, i, j in pairs[:k2]:
            penalty[i, j] = penalty[j, i] = 1
    return intrinsic, penalty


def pairwise_scatter(x, w):
    """X^T (D - W) X written as 1/2 sum_ij W_ij (x_i - x_j)(x_i - x_j)^T."""
    d = x.shape[1]
    s = np.zeros((d, d))
    for i in range(len(x)):
        for j in range(len(x)):
            diff = (x[i] - x[j])[:, None]
            s += 0.5 * w[i, j] * diff @ diff.T
    return s


def small_problem(seed=0, n=24, d=5, classes=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.standard_normal((n, d)) + 1.5 * np.eye(classes, d)[y]
    return x, y


@pytest.mark.parametrize("seed", range(3))
def test_mfa_graphs_match_their_definition(seed):
    x, y = small_problem(seed)
    intrinsic, penalty = mfa_graphs(x, y, 3, 6)
    expected_intrinsic, expected_penalty = brute_force_graphs(x, y, 3, 6)
    np.testing.assert_array_equal(intrinsic.toarray(), expected_intrinsic)
    np.testing.assert_array_equal(penalty.toarray(), expected_penalty)


@pytest.mark.parametrize("seed", range(3))
def test_mfa_matches_a_direct_solution(seed):
    x, y = small_problem(seed)
    mfa = MarginalFisherAnalysis(3, k_intrinsic=3, k_penalty=6, regularization=1e-2).fit(x, y)
    intrinsic, penalty = brute_force_graphs(x, y, 3, 6)
    s_p, s_c = pairwise_scatter(x, penalty), pairwise_scatter(x, intrinsic)
    s_c += 1e-2 * np.trace(s_c) / x.shape[1] * np.eye(x.shape[1])
    values, vectors = np.linalg.eig(np.linalg.solve(s_c, s_p))  # S_c^-1 S_p w = lambda w
    order = np.argsort(-values.real)[:3]
    np.testing.assert_allclose(mfa.eigenvalues_, values.real[order], rtol=1e-8)
    for k, i in enumerate(order):
        got, want = mfa.components_[:, k], vectors[:, i].real
        cosine = abs(got @ want) / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine == pytest.approx(1.0, abs=1e-8)
    # Components are S_c-orthonormal, and each attains its eigenvalue as penalty / intrinsic ratio.
    w = mfa.components_
    np.testing.assert_allclose(w.T @ s_c @ w, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(np.diag(w.T @ s_p @ w), mfa.eigenvalues_, rtol=1e-8)


def test_first_mfa_direction_maximises_the_ratio_in_2d():
    x, y = small_problem(1, d=2, classes=2)
    mfa = MarginalFisherAnalysis(1, k_intrinsic=3, k_penalty=6).fit(x, y)
    s_p, s_c = mfa.scatter_matrices(x - x.mean(0), y)
    angles = np.linspace(0, np.pi, 20001)
    directions = np.stack([np.cos(angles), np.sin(angles)])
    def quadratic(s):
        return np.einsum("ia,ij,ja->a", directions, s, directions)

    ratio = quadratic(s_p) / quadratic(s_c)
    best = directions[:, ratio.argmax()]
    w = mfa.components_[:, 0] / np.linalg.norm(mfa.components_[:, 0])
    assert abs(best @ w) == pytest.approx(1.0, abs=1e-6)
    assert ratio.max() == pytest.approx(mfa.eigenvalues_[0], rel=1e-6)


def test_mfa_finds_the_discriminative_direction_among_noisy_ones():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    x = rng.standard_normal((120, 6)) * [0.3, 3, 3, 3, 3, 3]
    x[:, 0] += 2.0 * y  # classes differ along axis 0 only, the quietest axis
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    mfa = MarginalFisherAnalysis(1, k_intrinsic=5, k_penalty=20).fit(x @ rotation, y)
    w = rotation @ mfa.components_[:, 0]
    assert abs(w[0]) / np.linalg.norm(w) > 0.99
    z = mfa.transform(x @ rotation)[:, 0]
    means = [z[y == c].mean() for c in range(3)]
    assert min(abs(np.diff(sorted(means)))) > 3 * max(z[y == c].std() for c in range(3))


def test_mfa_fusion_standardises_and_folds_into_one_affine_map():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    audio = rng.standard_normal((60, 4)) * 1000 + y[:, None] * 800  # pitch-like scale
    video = rng.standard_normal((60, 3)) * 0.01 + y[:, None] * 0.005
    video[:, 2] = 0.5  # a constant feature must not divide by zero
    fusion = MFAFusion(2, k_intrinsic=4, k_penalty=10).fit([audio, video], y)
    z = fusion.transform([audio, video])
    standardised = (np.concatenate([audio, video], 1) - fusion.mean_) / fusion.scale_
    np.testing.assert_allclose(z, fusion.mfa.transform(standardised), atol=1e-10)
    assert np.isfinite(z).all() and fusion.scale_[-1] == 1.0


def test_mfa_rejects_bad_inputs():
    x, y = small_problem()
    with pytest.raises(ValueError, match="two classes"):
        MarginalFisherAnalysis(1).fit(x, np.zeros(len(x)))
    with pytest.raises(ValueError, match="exceeds the dimension"):
        MarginalFisherAnalysis(9).fit(x, y)
    with pytest.raises(ValueError, match="regularization must be positive"):
        MarginalFisherAnalysis(1, regularization=0.0)
