"""The corpus readers on fake corpora written in the real layouts with real codecs."""

import importlib.util
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from models.datasets import corpora, mosei
from models.datasets.data import TINY
from models.datasets.media import read_audio, read_frames
from models.experiments import train
from models.features.handcrafted import HandcraftedFrontend, autocorrelation_pitch

from fake_corpora import (
    FPS,
    MOSEI_VIDEOS,
    SAMPLE_RATE,
    clip,
    make_cremad,
    make_mosei,
    make_mosei_media,
    make_ravdess,
    write_csd,
    write_video,
    write_wav,
)

# PyAV decodes (and writes) video, librosa reads .wav, soundfile writes it: the corpora extra.
_MISSING = [name for name in ("av", "librosa", "soundfile") if importlib.util.find_spec(name) is None]
needs_media = pytest.mark.skipif(bool(_MISSING), reason=f"media tests need {_MISSING} (fastfusion[corpora])")
# The MOSEI raw release adds its labels' HDF5 file.
_MISSING_MOSEI = _MISSING + [name for name in ("h5py",) if importlib.util.find_spec(name) is None]
needs_mosei_media = pytest.mark.skipif(bool(_MISSING_MOSEI),
                                       reason=f"MOSEI media tests need {_MISSING_MOSEI} (fastfusion[corpora])")


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



# --- spans of a recording -------------------------------------------------------------


@pytest.fixture(scope="module")
def three_sections(tmp_path_factory):
    """A 3 s video and .wav of three 1 s sections: grey levels 50 / 130 / 210 and tones of
    200 / 300 / 450 Hz. MPEG-4 part 2 puts a keyframe every 12 frames, so the sections
    start mid-GOP (frames 16 and 32 at 16 fps) and reading them needs seek-then-skip."""
    root = tmp_path_factory.mktemp("sections")
    levels, tones = (50, 130, 210), (200.0, 300.0, 450.0)
    frames = np.concatenate([np.full((FPS, 32, 48, 3), level, np.uint8) for level in levels])
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    frequency = np.choose(np.minimum(t.astype(int), 2), tones)
    wave = (0.4 * np.sin(2 * math.pi * np.cumsum(frequency) / SAMPLE_RATE)).astype(np.float32)
    write_video(root / "v.mp4", frames, wave)
    write_wav(root / "v.wav", wave)
    return root, levels, tones


@needs_media
def test_read_frames_of_a_span(three_sections):
    root, levels, _ = three_sections
    for section, level in enumerate(levels):
        frames, _ = read_frames(root / "v.mp4", 16, start=float(section), end=section + 1.0)
        assert len(frames) == FPS  # the frames with timestamps in [start, end)
        assert frames.float().mean((1, 2, 3)).sub(level).abs().max() < 5
    frames, _ = read_frames(root / "v.mp4", 16, start=2.5)  # to the end
    assert len(frames) == FPS // 2
    with pytest.raises(ValueError, match=r"v\.mp4 holds no video frames in \[5, 6\) s"):
        read_frames(root / "v.mp4", 16, start=5.0, end=6.0)
    with pytest.raises(ValueError, match="end must be a time after start"):
        read_frames(root / "v.mp4", 16, start=1.0, end=1.0)


@needs_media
@pytest.mark.parametrize("name", ["v.wav", "v.mp4"])
def test_read_audio_of_a_span(three_sections, name):
    root, _, tones = three_sections
    for section, tone in enumerate(tones):
        wave = read_audio(root / name, 22050, start=section + 0.1, end=section + 0.9)
        assert abs(len(wave) - 0.8 * 22050) <= 1
        f0, _ = autocorrelation_pitch(wave.double(), 22050)
        assert f0[f0 > 0].median().item() == pytest.approx(tone, rel=0.01)
    with pytest.raises(ValueError, match=r"v\.(wav|mp4) \[4, 5\) s holds no audio samples"):
        read_audio(root / name, 22050, start=4.0, end=5.0)


# --- CMU-MOSEI raw release ------------------------------------------------------------


@pytest.fixture(scope="module")
def mosei_media(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosei_media")
    return root, make_mosei_media(root)


@needs_mosei_media
def test_csd_is_read_as_written(mosei_media):
    root, written = mosei_media
    name, videos = mosei.read_csd(root / mosei.LABELS_FILE)
    assert name == "All Labels" and sorted(videos) == sorted(MOSEI_VIDEOS)
    for vid, (labels, intervals) in written.items():
        np.testing.assert_array_equal(videos[vid][0], labels)
        np.testing.assert_array_equal(videos[vid][1], intervals)


@needs_mosei_media
def test_broken_csd_is_one_error_naming_the_file(mosei_media, tmp_path):
    root, written = mosei_media
    good = (root / mosei.LABELS_FILE).read_bytes()
    truncated = tmp_path / "truncated" / mosei.LABELS_FILE
    truncated.parent.mkdir()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable HDF5 computational sequence: .*truncated"):
        mosei.read_csd(truncated)
    # Through the corpus loader and build_corpus: the same one error, before any media is scanned.
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable HDF5"):
        corpora.build_corpus("mosei", truncated.parent, cache_dir=None)
    text = tmp_path / "text.csd"
    text.write_text("sentiment,happy\n")
    with pytest.raises(ValueError, match=rf"{text} is not a readable HDF5"):
        mosei.read_csd(text)
    vid = MOSEI_VIDEOS[0]
    no_intervals = tmp_path / "no_intervals.csd"
    write_csd(no_intervals, "All Labels", {vid: (written[vid][0], written[vid][1])})
    import h5py

    with h5py.File(no_intervals, "a") as file:
        del file["All Labels"]["data"][vid]["intervals"]
    with pytest.raises(ValueError, match=rf"{no_intervals}: video '{vid}' lacks the dataset\(s\) \['intervals'\]"):
        mosei.read_csd(no_intervals)
    bad_shape = tmp_path / "bad_shape.csd"
    write_csd(bad_shape, "All Labels", {vid: (written[vid][0], written[vid][1][:, :1])})
    with pytest.raises(ValueError, match=rf"{bad_shape}: video '{vid}' needs features \(N, k\) and intervals \(N, 2\)"):
        mosei.read_csd(bad_shape)


@needs_mosei_media
def test_mosei_media_segments_labels_and_splits(mosei_media, tmp_path, monkeypatch):
    root, written = mosei_media
    spans = []

    def audio(path, sample_rate, min_samples=1, **span):
        spans.append((path.stem, span["start"], span["end"]))
        return read_audio(path, sample_rate, min_samples, **span)

    monkeypatch.setattr(mosei, "read_audio", audio)
    sets = mosei.load_mosei_media(root, cache_dir=tmp_path, val_fraction=1 / 6, test_fraction=1 / 6)
    assert "seeded split" in sets["train"].folds
    videos = {split: {s.video_id for s in data.segments} for split, data in sets.items()}
    assert [len(videos[s]) for s in mosei.SPLIT_NAMES] == [4, 1, 1]
    assert set().union(*videos.values()) == set(MOSEI_VIDEOS)  # the segmented clip and COVAREP file are ignored
    for split, data in sets.items():
        assert len(data) == 3 * len(videos[split]) and not data.skipped
        for i, segment in enumerate(data.segments):
            labels, intervals = written[segment.video_id]
            assert segment.audio.suffix == ".wav" and segment.video.parent.name == "Combined"
            assert (segment.start, segment.end) == tuple(intervals[segment.index])
            item = data[i]
            assert item["sentiment"].item() == pytest.approx(labels[segment.index, 0])
            np.testing.assert_allclose(item["emotions"].numpy(), labels[segment.index, 1:], rtol=1e-6)
            assert item["label"].item() == round(labels[segment.index, 0]) + 3  # halves to even, as torch.round
            assert item["audio"].shape == (1, *TINY.audio_size)
            assert item["video"].shape == (3, TINY.num_frames, TINY.frame_size, TINY.frame_size)
    # Each segment was decoded once, over its own interval (the cache key holds the span).
    assert sorted(spans) == sorted((vid, s, e) for vid, (_, iv) in written.items() for s, e in iv)
    [sets["test"][i] for i in range(len(sets["test"]))]
    assert len(spans) == 3 * len(MOSEI_VIDEOS)


@needs_mosei_media
def test_mosei_media_cuts_the_right_span(mosei_media):
    """A segment's audio is the voice that fake_corpora.clip rendered for it (pitch of
    the rendered wave, not of the reader), and its frames are the segment's, not the dark gaps."""
    root, written = mosei_media
    vid, number = MOSEI_VIDEOS[1], 1
    labels, intervals = written[vid]
    for index in range(len(labels)):
        start, end = intervals[index]
        rendered, _ = clip(int(np.round(labels[index, 0])) + 3, number, take=index, num_frames=8, duration=end - start)
        expected, _ = autocorrelation_pitch(torch.from_numpy(rendered).double(), SAMPLE_RATE)
        wav = next(root.rglob(f"{vid}.wav"))
        wave = read_audio(wav, SAMPLE_RATE, start=start, end=end)
        got, _ = autocorrelation_pitch(wave.double(), SAMPLE_RATE)
        assert got[got > 0].median().item() == pytest.approx(expected[expected > 0].median().item(), rel=0.01)
        frames, _ = read_frames(next(root.rglob(f"{vid}.mp4")), 16, start=start, end=end)
        assert len(frames) == round((end - start) * FPS)
        assert frames.float().mean((1, 2, 3)).min() > 30  # the gaps are level 10


@needs_mosei_media
def test_mosei_media_folds(mosei_media, monkeypatch):
    root, _ = mosei_media
    given = {"train": MOSEI_VIDEOS[:3], "valid": MOSEI_VIDEOS[3:4], "test": MOSEI_VIDEOS[4:5]}
    sets = mosei.load_mosei_media(root, folds=given, cache_dir=None)
    for split, ids in given.items():
        assert {s.video_id for s in sets[split].segments} == set(ids)  # MOSEI_VIDEOS[5] is in no fold
    assert sets["test"].folds == "given folds"
    # The SDK's module, as a clone on PYTHONPATH provides it (it is not on PyPI).
    sdk = types.SimpleNamespace(standard_train_fold=list(MOSEI_VIDEOS[1:]), standard_valid_fold=[MOSEI_VIDEOS[0]],
                                standard_test_fold=["not-in-this-corpus"])
    monkeypatch.setitem(sys.modules, mosei.SDK_FOLDS_MODULE, sdk)
    sets = mosei.load_mosei_media(root, cache_dir=None)
    assert sets["train"].folds == "the CMU Multimodal SDK's standard folds"
    assert [len(sets[s]) for s in mosei.SPLIT_NAMES] == [15, 3, 0]
    with pytest.raises(ValueError, match=r"folds lack the split\(s\) \['test'\]"):
        mosei.load_mosei_media(root, folds={"train": MOSEI_VIDEOS, "valid": ()}, cache_dir=None)


@needs_mosei_media
def test_mosei_media_skips_damaged_audio_and_late_segments(tmp_path):
    root = tmp_path / "m"
    written = make_mosei_media(root, videos=MOSEI_VIDEOS[:3], emotions=False)
    late_vid, broken_vid = MOSEI_VIDEOS[0], MOSEI_VIDEOS[1]
    labels, intervals = written[late_vid]
    written[late_vid] = (np.concatenate([labels, [[1.0], [np.nan], [2.0]]]),
                         np.concatenate([intervals, [[99.0, 100.0], [0.25, 0.75], [0.5, 0.5]]]))
    write_csd(root / mosei.LABELS_FILE, "All Labels", written)
    wav = next(root.rglob(f"{broken_vid}.wav"))
    wav.write_bytes(wav.read_bytes()[:2000])
    with pytest.warns(UserWarning, match="skipping CMU-MOSEI"):
        sets = mosei.load_mosei_media(root, folds={"train": MOSEI_VIDEOS[:3], "valid": (), "test": ()},
                                      cache_dir=None)
    train_set = sets["train"]
    assert len(train_set) == 3 + 3  # the late segment and the broken video's three are out
    problems = {str(path): problem for path, problem in train_set.skipped}
    assert "is truncated" in problems[str(wav)]
    messages = [problem for _, problem in train_set.skipped]
    assert any(f"segment {late_vid}[3] starts at 99.0 s" in p for p in messages)
    assert any(f"segment {late_vid}[4] has non-finite labels" in p for p in messages)
    assert any(f"segment {late_vid}[5] has the empty span [0.5, 0.5] s" in p for p in messages)
    assert "emotions" not in train_set[0] and train_set.emotions is None  # sentiment-only labels


@needs_mosei_media
def test_mosei_source_kind_and_missing_layout(mosei_media, tmp_path):
    root, _ = mosei_media
    assert mosei.source_kind(root) == "media"
    assert mosei.source_kind(root / mosei.LABELS_FILE) == "media"
    named = mosei.load_mosei_media(root / mosei.LABELS_FILE, cache_dir=None)  # the labels file, media beside it
    assert sum(map(len, named.values())) == 18
    make_mosei(tmp_path / "pickle" / "mosei_senti_data.pkl")
    assert mosei.source_kind(tmp_path / "pickle") == "features"
    assert mosei.source_kind(tmp_path / "nowhere") == "features"  # its loader says what is missing
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)no CMU_MOSEI_Labels\.csd.*WAV_16000.*mosei_senti_data\.pkl"):
        mosei.load_mosei_media(tmp_path / "empty")
    splits = corpora.build_corpus("mosei", root, cache_dir=None)
    assert splits.task == "classification" and splits.modalities == ("audio", "video")
    assert splits.class_names == mosei.CLASS_NAMES and sum(map(len, (splits.train, splits.val, splits.test))) == 18
    audio_only = corpora.build_corpus("mosei", root, cache_dir=None, modalities=("audio",), features="handcrafted")
    assert set(audio_only.train[0]) == {"audio", "sentiment", "label", "emotions"}
    assert audio_only.train[0]["audio"].dim() == 1


# --- CMU-MOSEI media through models.train ---------------------------------------------


@needs_mosei_media
@pytest.mark.parametrize("model", [["cbgp"], ["avt_ca"], ["ca_triplet"], ["decision_fusion"], ["mfa_cnn1d"],
                                   ["lmf_lstm", "--task", "regression"]])
def test_train_on_fake_mosei_media(mosei_media, model):
    root, _ = mosei_media
    result = train.main(["--data", "mosei", "--root", str(root), "--model", *model, "--epochs", "1",
                         "--batch-size", "6", "--no-progress", "--cache-dir", str(root / "cache")])
    if "regression" in model:
        assert set(result["test"]) == {"mae", "rmse", "pearson_r", "acc2", "acc7"}
    else:
        assert result["config"]["task"] == "classification"  # MOSEI media's own task: the 7-class sentiment
        assert len(result["test"]["confusion_matrix"]) == 7


@needs_mosei_media
def test_mosei_model_choice_follows_the_root(mosei_media, tmp_path):
    root, _ = mosei_media
    make_mosei(tmp_path / "mosei_senti_data.pkl")
    with pytest.raises(SystemExit):  # the audio-video models need media
        train.parse_args(["--data", "mosei", "--root", str(tmp_path), "--model", "cbgp"])
    with pytest.raises(SystemExit):  # a classifier cannot regress
        train.parse_args(["--data", "mosei", "--root", str(root), "--model", "cbgp", "--task", "regression"])
    with pytest.raises(SystemExit):  # two modalities on media, not three
        train.parse_args(["--data", "mosei", "--root", str(root), "--model", "decision_fusion",
                          "--fusion-weights", "video=0.55", "audio=0.38", "text=0.07"])
    assert train.parse_args(["--data", "mosei", "--root", str(root), "--model", "decision_fusion",
                             "--fusion-weights", "video=0.6", "audio=0.4"]).fusion_weights == {"audio": 0.4, "video": 0.6}
