"""Front-ends (against librosa where it imports) and the synthetic dataset."""

import dataclasses

import numpy as np
import pytest
import torch

from models.data import CLASS_NAMES, TINY, SyntheticAVEmotion, SyntheticConfig, train_test_split
from models.frontends import (
    KINETICS_MEAN,
    KINETICS_STD,
    SpectrogramImage,
    mel_filterbank,
    normalize_clip,
    power_spectrogram,
    sample_frame_indices,
)

SMALL = dataclasses.replace(TINY, num_frames=3, frame_size=16, audio_size=(16, 16), n_mels=16, duration_s=0.5)


def _wave(gen, seconds=1.0, sr=22050):
    return torch.randn(int(seconds * sr), generator=gen, dtype=torch.float64)


def test_power_spectrogram_matches_librosa(gen):
    librosa = pytest.importorskip("librosa")
    y = _wave(gen)
    expected = np.abs(librosa.stft(y.numpy(), n_fft=2048, hop_length=512)) ** 2
    actual = power_spectrogram(y).numpy()
    assert actual.shape == expected.shape == (1025, 44)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9 * expected.max())


@pytest.mark.parametrize(
    "sr, n_fft, n_mels, fmin, fmax",
    [(22050, 2048, 128, 0.0, None), (8000, 256, 20, 60.0, 3500.0)],
    ids=["librosa-defaults", "band-limited"],
)
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    np.testing.assert_allclose(mel_filterbank(sr, n_fft, n_mels, fmin, fmax).numpy(), expected, rtol=1e-5, atol=1e-8)


def test_logmel_image_matches_librosa_db(gen):
    librosa = pytest.importorskip("librosa")
    y = _wave(gen)
    mel = librosa.feature.melspectrogram(y=y.numpy(), sr=22050, n_fft=2048, hop_length=512, n_mels=64)
    expected_db = librosa.power_to_db(mel, ref=np.max, top_db=80.0)
    image = SpectrogramImage("logmel", n_mels=64, size=None)(y)
    np.testing.assert_allclose(image[0].numpy() * 80.0 - 80.0, expected_db, atol=1e-4)


def test_spectrogram_images_are_batched_resized_and_in_unit_range(gen):
    waves = torch.randn(2, 3, 11025, generator=gen)
    for kind in ("stft", "logmel"):
        image = SpectrogramImage(kind, n_mels=32, size=(24, 20))(waves)
        assert image.shape == (2, 3, 1, 24, 20)
        assert image.min() >= 0 and image.max() <= 1
    with pytest.raises(ValueError, match="kind"):
        SpectrogramImage("mfcc")


def test_frame_sampling():
    assert sample_frame_indices(100, 4).tolist() == [12, 37, 62, 87]  # segment middles
    assert sample_frame_indices(2, 5).tolist() == [0, 0, 1, 1, 1]  # short clips repeat frames
    g = torch.Generator().manual_seed(0)
    random = sample_frame_indices(100, 4, mode="random", generator=g)
    assert all(25 * i <= j < 25 * (i + 1) for i, j in enumerate(random.tolist()))  # one frame per segment
    with pytest.raises(ValueError, match="mode"):
        sample_frame_indices(10, 2, mode="dense")


def test_clip_normalisation(gen):
    frames = torch.randint(0, 256, (5, 20, 30, 3), generator=gen, dtype=torch.uint8)
    clip = normalize_clip(frames, size=(8, 12))
    assert clip.shape == (3, 5, 8, 12) and clip.dtype == torch.float32
    flat = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)  # white frame: (1 - mean) / std per channel
    expected = [(1 - m) / s for m, s in zip(KINETICS_MEAN, KINETICS_STD)]
    torch.testing.assert_close(normalize_clip(flat)[:, 0, 0, 0], torch.tensor(expected))


def test_dataset_items_have_the_documented_shapes():
    ds = SyntheticAVEmotion(3, config=SMALL)
    item = ds[1]
    assert item["audio"].shape == (1, 16, 16) and item["video"].shape == (3, 3, 16, 16)
    assert 0 <= item["audio"].min() and item["audio"].max() <= 1
    assert item["label"].dtype == torch.int64 and 0 <= item["label"] < len(CLASS_NAMES)
    assert item["sentiment"].dtype == torch.float32


def test_dataset_is_deterministic_per_seed_and_index():
    a = SyntheticAVEmotion(4, seed=3, config=SMALL)
    b = SyntheticAVEmotion(4, seed=3, config=SMALL, cache=False)
    for i in (2, 0, -1):  # any access order, cached or not
        for key in ("audio", "video", "label", "sentiment"):
            torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
    c = SyntheticAVEmotion(4, seed=4, config=SMALL)
    assert not torch.equal(a[0]["video"], c[0]["video"])
    train, test = train_test_split(4, 4, seed=0, config=SMALL)
    assert not torch.equal(train[0]["video"], test[0]["video"])


def test_latent_factors_follow_the_documented_design():
    ds = SyntheticAVEmotion(4000, seed=0, config=SMALL)
    valence = torch.tensor([1, 1, 0, 0])[ds.labels]
    arousal = torch.tensor([1, 0, 1, 0])[ds.labels]
    assert torch.equal(ds.arousal, arousal)
    # valence is exactly the agreement of the glide and the brows
    assert torch.equal(valence, (ds.glide_up == ds.brows_up).long())
    # positive clips are mostly typical (rising with raised brows); negative ones are split
    positive = valence == 1
    assert ds.glide_up[positive].float().mean() == pytest.approx(SMALL.typical_positive, abs=0.03)
    assert ds.glide_up[~positive].float().mean() == pytest.approx(0.5, abs=0.03)
    assert torch.bincount(ds.labels, minlength=4).min() > 900  # balanced classes
    assert torch.equal(ds.sentiment > 0, positive) and ds.sentiment.abs().max() <= 3
    assert SMALL.additive_ceiling == pytest.approx(0.875)


def test_config_is_checked():
    with pytest.raises(ValueError, match="typical_positive"):
        SyntheticConfig(typical_positive=0.3)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticAVEmotion(0)
