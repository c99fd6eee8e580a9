"""The corpus readers on fake corpora written in the real layouts with real codecs."""

import importlib.util
import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fake_corpora import SAMPLE_RATE, make_cremad, make_mosei, make_ravdess, write_video
from models import corpora, mosei
from models.data import TINY
from models.handcrafted import HandcraftedFrontend, autocorrelation_pitch
from models.media import read_audio, read_frames

# PyAV decodes (and writes) video, librosa reads .wav, soundfile writes it: the corpora extra.
_MISSING = [name for name in ("av", "librosa", "soundfile") if importlib.util.find_spec(name) is None]
needs_media = pytest.mark.skipif(bool(_MISSING), reason=f"media tests need {_MISSING} (fastfusion[corpora])")


@pytest.fixture(scope="module")
def ravdess_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ravdess")
    make_ravdess(root, song=True)
    return root


@pytest.fixture(scope="module")
def cremad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad")
    make_cremad(root)
    return root


@pytest.fixture
def counted_decoding(monkeypatch):
    """Counts every decode the readers do."""
    calls = {"audio": 0, "video": 0}

    def audio(*args, **kwargs):
        calls["audio"] += 1
        return read_audio(*args, **kwargs)

    def frames(*args, **kwargs):
        calls["video"] += 1
        return read_frames(*args, **kwargs)

    monkeypatch.setattr(corpora, "read_audio", audio)
    monkeypatch.setattr(corpora, "read_frames", frames)
    return calls


# --- decoding -------------------------------------------------------------------------


@needs_media
def test_read_frames_scales_the_short_side_and_centre_crops(tmp_path):
    frames = np.zeros((5, 32, 64, 3), np.uint8)
    frames[:, :, 16:48] = 200  # a bright centre half, dark sides that the crop removes
    path = tmp_path / "wide.mp4"
    write_video(path, frames)
    clip_, fps = read_frames(path, 16)
    assert clip_.shape == (5, 16, 16, 3) and clip_.dtype == torch.uint8
    assert fps == pytest.approx(16.0)
    assert clip_.float().mean() > 180


@needs_media
def test_audio_track_of_a_video_decodes_at_the_requested_rate(tmp_path):
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    path = tmp_path / "tone.mp4"
    write_video(path, np.zeros((4, 16, 16, 3), np.uint8), (0.4 * np.sin(2 * math.pi * 440 * t)).astype(np.float32))
    wave = read_audio(path, 22050)
    # AAC adds about a frame of priming and padding, quiet and noisy; the tone's pitch survives.
    assert abs(len(wave) - 0.5 * 22050) < 3000
    f0, _ = autocorrelation_pitch(wave.double(), 22050)
    assert f0[f0 > 0].median().item() == pytest.approx(440, rel=0.01)


@needs_media
def test_decoding_errors_name_the_file(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="silent.mp4 has no audio track"):
        read_audio(path, 22050)


# --- RAVDESS --------------------------------------------------------------------------


@needs_media
def test_ravdess_items_match_the_synthetic_format(ravdess_root, tmp_path):
    data = corpora.RAVDESS(ravdess_root, cache_dir=tmp_path)
    assert len(data) == 4 * 8  # speech only by default: the song files are left out
    item = data[5]
    assert item["audio"].shape == (1, *TINY.audio_size) and item["audio"].dtype == torch.float32
    assert item["video"].shape == (3, TINY.num_frames, TINY.frame_size, TINY.frame_size)
    assert item["label"].dtype == torch.int64 and item["speaker"].dtype == torch.int64
    # File 03-01-06-01-01-01-01: emotion 06 is "fearful", class index 5; actor 1.
    recording = data.recordings[5]
    assert recording.name == "01-06-01-01-01-01"
    assert (item["label"].item(), item["speaker"].item()) == (5, 1)
    assert data.CLASS_NAMES[5] == "fearful"
    assert recording.audio.suffix == ".wav" and recording.video.name.startswith("01-")
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["audio"].shape[0] == 4 and batch["label"].shape == (4,)


@needs_media
def test_ravdess_vocal_channels_and_audio_fallback(ravdess_root, tmp_path):
    both = corpora.RAVDESS(ravdess_root, vocal_channels=("speech", "song"), cache_dir=None)
    assert len(both) == 2 * 4 * 8
    root = tmp_path / "mp4_only"
    make_ravdess(root, actors=(1, 2), emotions=(3,), wav=False)
    data = corpora.RAVDESS(root, cache_dir=None)
    assert [r.audio.name for r in data.recordings] == ["01-01-03-01-01-01-01.mp4", "01-01-03-01-01-01-02.mp4"]
    assert data[0]["audio"].shape == (1, *TINY.audio_size)  # from the mp4's audio track


@needs_media
def test_ravdess_modalities(tmp_path):
    root = tmp_path / "r"
    make_ravdess(root, actors=(1, 2), emotions=(1, 2), av_mp4=False, video_only=True)
    audio_only = corpora.RAVDESS(root, modalities=("audio",), cache_dir=None)
    assert set(audio_only[0]) == {"audio", "label", "speaker"}
    video = corpora.RAVDESS(root, modalities=("video",), cache_dir=None)
    assert video.recordings[0].video.name.startswith("02-") and set(video[0]) == {"video", "label", "speaker"}
    # Audio and video: the .wav and the video-only .mp4 of one take pair up.
    assert len(corpora.RAVDESS(root, cache_dir=None)) == 4
    wav_only = tmp_path / "w"
    make_ravdess(wav_only, actors=(1,), emotions=(1,), av_mp4=False)
    with pytest.raises(FileNotFoundError, match=r"none with files for \('audio', 'video'\)"):
        corpora.RAVDESS(wav_only, cache_dir=None)


@needs_media
def test_ravdess_splits_are_speaker_independent_and_gender_balanced(ravdess_root):
    sets = {s: corpora.RAVDESS(ravdess_root, split=s, cache_dir=None, val_fraction=0.25, test_fraction=0.25)
            for s in corpora.SPLITS}
    speakers = {s: set(d.speakers) for s, d in sets.items()}
    assert speakers["train"] | speakers["val"] | speakers["test"] == {1, 2, 3, 4}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not speakers[a] & speakers[b]
    for s, d in sets.items():
        assert {r.speaker for r in d.recordings} == speakers[s]
    assert {a % 2 for a in speakers["train"]} == {0, 1}  # one male, one female actor
    again = corpora.RAVDESS(ravdess_root, split="test", cache_dir=None, val_fraction=0.25, test_fraction=0.25)
    assert again.speakers == sets["test"].speakers
    chosen = corpora.RAVDESS(ravdess_root, speakers=[2, 3], cache_dir=None)
    assert chosen.speakers == (2, 3) and len(chosen) == 16


def test_speaker_split_sizes_and_balance():
    actors = range(1, 25)
    gender = {a: "m" if a % 2 else "f" for a in actors}
    split = corpora.speaker_split(actors, val_fraction=1 / 6, test_fraction=1 / 6, seed=3, groups=gender)
    assert [len(split[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    for s in ("val", "test"):
        assert sum(a % 2 for a in split[s]) == 2
    assert sorted(split["train"] + split["val"] + split["test"]) == list(actors)
    assert corpora.speaker_split(actors, seed=4) != corpora.speaker_split(actors, seed=5)
    with pytest.raises(ValueError, match="too few"):
        corpora.speaker_split([1, 2], val_fraction=0.5, test_fraction=0.5)


def test_missing_corpus_errors_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        corpora.RAVDESS(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"(?s)no RAVDESS file names.*Actor_01/03-01-01-01-01-01-01\.wav"):
        corpora.RAVDESS(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)CREMA-D layout.*AudioWAV/1001_DFA_ANG_XX\.wav"):
        corpora.CremaD(tmp_path)
    with pytest.raises(FileNotFoundError, match="mosei_senti_data.pkl"):
        mosei.load_mosei(tmp_path)


def test_malformed_names_are_rejected(tmp_path):
    (tmp_path / "03-01-09-01-01-01-01.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="emotion code 09 is outside 01-08"):
        corpora.RAVDESS(tmp_path)
    (tmp_path / "03-01-09-01-01-01-01.wav").unlink()
    (tmp_path / "01-01-01-01-01-01-01.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="modality 01 files are .mp4"):
        corpora.RAVDESS(tmp_path)
    cremad = tmp_path / "c"
    cremad.mkdir()
    (cremad / "1001_DFA_JOY_XX.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown emotion 'JOY'"):
        corpora.CremaD(cremad)


# --- the feature cache ----------------------------------------------------------------


@needs_media
def test_second_epoch_decodes_nothing(ravdess_root, tmp_path, counted_decoding):
    data = corpora.RAVDESS(ravdess_root, speakers=[1], cache_dir=tmp_path)
    first = [data[i] for i in range(len(data))]
    assert counted_decoding == {"audio": 8, "video": 8}
    second = [data[i] for i in range(len(data))]
    assert counted_decoding == {"audio": 8, "video": 8}
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The cache keeps the sampled frames as uint8; items carry them standardised.
    entry = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)
    assert entry["video"].dtype == torch.uint8 and first[0]["video"].dtype == torch.float32
    # A new reader (another run, a DataLoader worker) finds the cache too.
    [corpora.RAVDESS(ravdess_root, speakers=[1], cache_dir=tmp_path)[i] for i in range(len(data))]
    assert counted_decoding == {"audio": 8, "video": 8}


@needs_media
def test_cache_entries_follow_the_files_and_the_frontend(tmp_path, counted_decoding):
    root = tmp_path / "r"
    make_ravdess(root, actors=(1,), emotions=(1, 2))
    cache = tmp_path / "cache"
    data = corpora.RAVDESS(root, cache_dir=cache)
    data[0], data[1]
    assert counted_decoding["audio"] == 2
    stat = data.recordings[0].audio.stat()
    os.utime(data.recordings[0].audio, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data[0], data[1]
    assert counted_decoding["audio"] == 3  # only the touched file is decoded again
    handcrafted = corpora.RAVDESS(root, cache_dir=cache, frontend=HandcraftedFrontend())
    item = handcrafted[0]
    assert counted_decoding["audio"] == 4
    assert item["audio"].shape == (HandcraftedFrontend().dims["audio"],)
    # Two first entries, one for the touched file (the stale one stays), one handcrafted.
    assert len(list(cache.glob("*.pt"))) == 4 and not list(cache.glob("*.partial"))


# --- CREMA-D --------------------------------------------------------------------------


@needs_media
def test_cremad_items_labels_and_splits(cremad_root, tmp_path):
    data = corpora.CremaD(cremad_root, cache_dir=tmp_path)
    assert len(data) == 4 * 2 * 6
    names = [r.name for r in data.recordings]
    assert names[0] == "1001_DFA_ANG_HI" and "1001_IEO_NEU_XX" in names
    labels = {r.name.split("_")[2]: r.label for r in data.recordings}
    assert labels == {code: i for i, code in enumerate(("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"))}
    assert all(r.audio.suffix == ".wav" and r.video.suffix == ".flv" for r in data.recordings)
    item = data[0]
    assert item["video"].shape == (3, TINY.num_frames, TINY.frame_size, TINY.frame_size)
    assert item["speaker"].item() == 1001
    # Demographics say 1001 and 1003 are male: a one-actor test set of each split draws
    # from both sexes across the train / val / test sets.
    split = {s: corpora.CremaD(cremad_root, split=s, cache_dir=None, val_fraction=0.25, test_fraction=0.25).speakers
             for s in corpora.SPLITS}
    assert sorted(sum(split.values(), ())) == [1001, 1002, 1003, 1004]
    assert {a % 2 for a in split["train"]} == {0, 1}


@needs_media
def test_cremad_audio_from_the_video_track_and_mp4(tmp_path):
    root = tmp_path / "c"
    make_cremad(root, actors=(1010,), sentences=("WSI",), wav=False, video_suffix=".mp4", demographics=False)
    data = corpora.CremaD(root, cache_dir=None)
    assert all(r.audio == r.video and r.video.suffix == ".mp4" for r in data.recordings)
    assert data[0]["audio"].shape == (1, *TINY.audio_size)
    audio_only = tmp_path / "a"
    make_cremad(audio_only, actors=(1010,), sentences=("WSI",), video_suffix=None, demographics=False)
    assert len(corpora.CremaD(audio_only, modalities=("audio",), cache_dir=None)) == 6


# --- CMU-MOSEI ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["mult", "all_labels", "mmsa"])
def test_mosei_layouts(tmp_path, layout):
    name = "aligned_50.pkl" if layout == "mmsa" else "mosei_senti_data.pkl"
    written = make_mosei(tmp_path / name, layout=layout)
    splits = mosei.load_mosei(tmp_path)  # the directory; the file name is found
    assert [len(splits[s]) for s in mosei.SPLIT_NAMES] == [12, 4, 5]
    train = splits["train"]
    assert train.dims == {"audio": 5, "video": 4, "text": 7}
    item = train[0]
    assert item["audio"].shape == (6, 5) and item["video"].shape == (6, 4) and item["text"].shape == (6, 7)
    assert item["audio"][0, 0] == 0 and torch.isfinite(train.features["audio"]).all()  # -inf -> 0
    labels = written["train"]["regression_labels" if layout == "mmsa" else "labels"].reshape(12, -1)
    np.testing.assert_allclose(train.sentiment.numpy(), labels[:, 0])
    # The 7-class label is Acc-7's: round(clip(s)) + 3.
    assert torch.equal(train.label, torch.from_numpy(np.round(np.clip(labels[:, 0], -3, 3)).astype(np.int64) + 3))
    if layout == "all_labels":
        np.testing.assert_allclose(item["emotions"].numpy(), labels[0, 1:])
    else:
        assert "emotions" not in item
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["text"].shape == (4, 6, 7) and batch["sentiment"].dtype == torch.float32


def test_mosei_python2_pickle_bytes_keys_and_errors(tmp_path):
    data = make_mosei(tmp_path / "m.pkl")
    with open(tmp_path / "bytes.pkl", "wb") as handle:
        pickle.dump({k.encode(): {kk.encode(): vv for kk, vv in v.items()} for k, v in data.items()}, handle)
    assert len(mosei.load_mosei(tmp_path / "bytes.pkl")["valid"]) == 4
    del data["test"]["vision"]
    with open(tmp_path / "broken.pkl", "wb") as handle:
        pickle.dump(data, handle)
    with pytest.raises(ValueError, match=r"lacks \['vision'\]"):
        mosei.load_mosei(tmp_path / "broken.pkl")


# --- build_corpus ---------------------------------------------------------------------


@needs_media
def test_build_corpus(ravdess_root, cremad_root, tmp_path):
    splits = corpora.build_corpus("ravdess", ravdess_root, cache_dir=None)
    assert splits.class_names == corpora.RAVDESS.CLASS_NAMES and splits.task == "classification"
    assert splits.modalities == ("audio", "video")
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 32
    handcrafted = corpora.build_corpus("cremad", cremad_root, features="handcrafted", cache_dir=None,
                                       modalities=("audio",), val_fraction=0.25, test_fraction=0.25)
    assert handcrafted.modalities == ("audio",) and handcrafted.train[0]["audio"].dim() == 1
    make_mosei(tmp_path / "mosei_senti_data.pkl")
    mosei_splits = corpora.build_corpus("mosei", tmp_path)
    assert mosei_splits.modalities == ("audio", "video", "text") and mosei_splits.task == "regression"
    assert len(mosei_splits.val) == 4
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.build_corpus("iemocap", tmp_path)

