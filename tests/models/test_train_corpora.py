"""python -m models.train on fake corpora."""

import pytest

pytest.importorskip("av")
pytest.importorskip("soundfile")
pytest.importorskip("librosa")

from models.datasets import corpora  # noqa: E402
from models.experiments import train  # noqa: E402

from fake_corpora import make_mosei, make_ravdess  # noqa: E402


@pytest.fixture(scope="module")
def ravdess_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ravdess")
    make_ravdess(root, actors=(1, 2, 3, 4, 5))
    return root


@pytest.mark.parametrize("model", ["cbgp", "ca_triplet", "decision_fusion", "mfa_cnn1d"])
def test_train_on_a_fake_ravdess(ravdess_root, model):
    result = train.main(["--data", "ravdess", "--root", str(ravdess_root), "--model", model, "--epochs", "1",
                         "--batch-size", "8", "--no-progress", "--cache-dir", str(ravdess_root / "cache")])
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    assert len(result["test"]["confusion_matrix"]) == 8


@pytest.mark.parametrize("model", [["lmf_lstm"], ["decision_fusion", "--fusion-weights", "video=0.55", "audio=0.38", "text=0.07"],
                                   ["decision_fusion", "--learn-weights"]])
def test_train_on_a_fake_mosei(tmp_path, model):
    make_mosei(tmp_path / "mosei_senti_data.pkl", sizes=(16, 4, 8))
    result = train.main(["--data", "mosei", "--root", str(tmp_path), "--model", *model,
                         "--epochs", "1", "--batch-size", "4", "--no-progress"])
    assert set(result["test"]) == {"mae", "rmse", "pearson_r", "acc2", "acc7"}
    assert result["config"]["task"] == "regression"  # MOSEI's own task, recorded as run


@pytest.mark.parametrize("argv", [
    ["--data", "ravdess"],                                   # no --root
    ["--data", "mosei", "--root", "x", "--model", "mfa_cnn1d"],  # hand-crafted features need raw media
    ["--data", "mosei", "--root", "x", "--model", "cbgp"],   # not a MOSEI model
    ["--data", "cremad", "--root", "x", "--task", "regression"],
    ["--model", "ca_triplet", "--task", "regression"],
])
def test_bad_arguments_are_refused_before_any_work(argv):
    with pytest.raises(SystemExit):
        train.parse_args(argv)


@pytest.fixture(scope="module")
def audio_only_ravdess(tmp_path_factory):
    """The audio-only download alone: Audio_Speech_Actors_01-24/Actor_XX/03-*.wav, no video file."""
    root = tmp_path_factory.mktemp("ravdess_audio")
    make_ravdess(root, actors=(1, 2, 3, 4, 5), emotions=range(1, 5), av_mp4=False)
    assert not list(root.rglob("*.mp4")) and {p.parts[len(root.parts)] for p in root.rglob("*.wav")} == {
        "Audio_Speech_Actors_01-24"}
    return root


def test_audio_only_ravdess_reads_without_video(audio_only_ravdess):
    data = corpora.RAVDESS(audio_only_ravdess, modalities=("audio",), cache_dir=None)
    assert len(data) == 5 * 4 and all(r.video is None for r in data.recordings)
    item = data[0]
    assert set(item) == {"audio", "label", "speaker"} and item["audio"].dim() == 3
    with pytest.raises(FileNotFoundError, match=r"20 with audio, 0 with video.*--modalities audio"):
        corpora.RAVDESS(audio_only_ravdess, cache_dir=None)  # audio and video by default


def test_train_unimodal_on_an_audio_only_ravdess(audio_only_ravdess):
    result = train.main(["--data", "ravdess", "--root", str(audio_only_ravdess), "--model", "unimodal",
                         "--modalities", "audio", "--epochs", "1", "--batch-size", "4", "--no-progress",
                         "--cache-dir", "none"])
    assert result["config"]["modalities"] == ("audio",)
    assert len(result["test"]["confusion_matrix"]) == 8  # RAVDESS's 8 classes, whatever the files cover
