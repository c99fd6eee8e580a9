"""python -m models.train on fake corpora."""

import pytest

pytest.importorskip("av")
pytest.importorskip("soundfile")
pytest.importorskip("librosa")

from fake_corpora import make_mosei, make_ravdess  # noqa: E402

from models import train  # noqa: E402


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


@pytest.mark.parametrize("model", [["lmf_lstm"], ["decision_fusion", "--fusion-weights", "0.55", "0.38", "0.07"],
                                   ["decision_fusion", "--learn-weights"]])
def test_train_on_a_fake_mosei(tmp_path, model):
    make_mosei(tmp_path / "mosei_senti_data.pkl", sizes=(16, 4, 8))
    result = train.main(["--data", "mosei", "--root", str(tmp_path), "--model", *model,
                         "--epochs", "1", "--batch-size", "4", "--no-progress"])
    assert set(result["test"]) == {"mae", "rmse", "pearson_r", "acc2", "acc7"}
    assert result["config"]["task"] == "regression"  # MOSEI's own task, recorded as run


@pytest.mark.parametrize("argv", [
    ["--data", "ravdess"],                                   # no --root
    ["--model", "mfa_cnn1d"],                                # hand-crafted features need raw media
    ["--data", "mosei", "--root", "x", "--model", "cbgp"],   # not a MOSEI model
    ["--data", "cremad", "--root", "x", "--task", "regression"],
    ["--model", "ca_triplet", "--task", "regression"],
])
def test_bad_arguments_are_refused_before_any_work(argv):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
