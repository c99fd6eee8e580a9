"""Front-ends (against librosa where it imports) and the synthetic dataset."""

import dataclasses

import numpy as np
import pytest
import torch

from models.datasets.data import (
    CLASS_NAMES,
    DIFFICULTIES,
    TINY,
    SyntheticAVEmotion,
    SyntheticConfig,
    at_difficulty,
    train_test_split,
)
from models.features.frontends import (
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


def test_default_latent_factors_are_unchanged():
    # Drawn by the dataset before the difficulty settings existed (commit 320ba51): the
    # default data, and the checkpoints trained on it, must stay as they were.
    ds = SyntheticAVEmotion(16, seed=0, config=TINY)
    assert ds.labels.tolist() == [0, 3, 1, 0, 3, 3, 3, 3, 1, 3, 1, 2, 0, 3, 2, 0]
    assert ds.glide_up.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0]
    assert ds.brows_up.tolist() == [1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    assert torch.equal(ds.labels, ds.true_labels)


def test_label_noise_replaces_labels_by_other_classes_and_keeps_the_clips():
    noisy_config = dataclasses.replace(SMALL, label_noise=0.3)
    clean, noisy = SyntheticAVEmotion(4000, seed=1, config=SMALL), SyntheticAVEmotion(4000, seed=1, config=noisy_config)
    # the clips are those of the noise-free set: same true labels and latent factors
    assert torch.equal(noisy.true_labels, clean.labels)
    for name in ("glide_up", "brows_up", "smile", "arousal", "intensity", "sentiment"):
        assert torch.equal(getattr(noisy, name), getattr(clean, name)), name
    torch.testing.assert_close(noisy[5]["video"], clean[5]["video"], rtol=0, atol=0)
    flipped = noisy.labels != noisy.true_labels
    assert flipped.float().mean() == pytest.approx(0.3, abs=0.025)
    # a replaced label is each of the three other classes about equally often
    shift = (noisy.labels[flipped] - noisy.true_labels[flipped]) % len(CLASS_NAMES)
    assert torch.bincount(shift, minlength=4)[0] == 0
    assert torch.bincount(shift, minlength=4)[1:].float().div(flipped.sum()).tolist() == pytest.approx([1 / 3] * 3, abs=0.04)
    assert noisy[5]["label"] == noisy.labels[5]
    # train_test_split keeps the test labels clean
    train, test = train_test_split(500, 500, seed=0, config=noisy_config)
    assert (train.labels != train.true_labels).any()
    assert torch.equal(test.labels, test.true_labels) and test.config.label_noise == 0.0


def test_difficulties():
    assert at_difficulty(TINY, "easy") == TINY  # the default data, unchanged
    hard = at_difficulty(TINY, "hard")
    assert {k: getattr(hard, k) for k in DIFFICULTIES["hard"]} == DIFFICULTIES["hard"]
    assert hard.audio_size == TINY.audio_size and hard.label_noise > 0
    with pytest.raises(ValueError, match="difficulty"):
        at_difficulty(TINY, "extreme")


def test_config_is_checked():
    with pytest.raises(ValueError, match="typical_positive"):
        SyntheticConfig(typical_positive=0.3)
    for bad in (-0.1, 0.75):
        with pytest.raises(ValueError, match="label_noise"):
            SyntheticConfig(label_noise=bad)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticAVEmotion(0)
