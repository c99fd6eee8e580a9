"""python -m models.train refuses bad input before any work, naming the flag or the file,
and skips damaged recordings, saying which and counting them in the run's output."""

import json
import random

import pytest
import torch

from models import build_model, corpora, train
from models.media import read_audio


@pytest.fixture
def no_work(monkeypatch):
    """Makes loading data or training fail the test: the error must come before either."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started work before refusing its arguments")

    monkeypatch.setattr(train, "load_data", refuse)
    monkeypatch.setattr(train, "fit", refuse)


def usage_error(argv, capsys) -> str:
    """The usage error (exit code 2) that ``main(argv)`` stops with; its message."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


# --- numbers, devices and backends --------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--epochs", "-1"],
    ["--batch-size", "0"], ["--batch-size", "-8"],
    ["--lr", "0"], ["--lr", "-0.001"], ["--lr", "nan"], ["--lr", "inf"],
    ["--dropout", "-0.1"], ["--dropout", "1"], ["--dropout", "1.5"], ["--dropout", "nan"],
    ["--workers", "-1"],
    ["--num-train", "0"], ["--num-test", "-5"],
    ["--weight-decay", "-1"], ["--weight-decay", "nan"],
    ["--seed", "-1"], ["--seed", str(2**32)],
])
def test_bad_numbers_are_usage_errors_naming_the_flag(argv, capsys, no_work):
    assert f"argument {argv[0]}:" in usage_error(argv, capsys)


@pytest.mark.parametrize("argv, flag", [
    (["--model", "decision_fusion", "--fusion-weights", "-1", "2"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "nan", "1"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "0", "0"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "0.5", "0.3", "0.2"], "--fusion-weights"),  # 2 modalities
    (["--model", "decision_fusion", "--fusion-weights", "0", "1", "--learn-weights"], "--learn-weights"),
    (["--model", "cbgp", "--fusion-weights", "0.5", "0.5"], "--fusion-weights"),  # would be ignored
    (["--model", "cbgp", "--learn-weights"], "--learn-weights"),
])
def test_bad_fusion_weights_are_usage_errors(argv, flag, capsys, no_work):
    assert flag in usage_error(argv, capsys)


def test_mosei_fusion_weights_take_one_per_modality(capsys, no_work):
    base = ["--data", "mosei", "--root", "x", "--model", "decision_fusion", "--fusion-weights"]
    assert "3 values" in usage_error(base + ["0.5", "0.5"], capsys)
    assert train.parse_args(base + ["0.55", "0.38", "0.07"]).fusion_weights == [0.55, 0.38, 0.07]


def test_global_batch_must_split_across_the_processes(monkeypatch, capsys, no_work):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--batch-size" in usage_error(["--batch-size", "8"], capsys)


@pytest.mark.parametrize("device", ["banana", "meta", "cuda:x"])
def test_unknown_devices_are_usage_errors(device, capsys, no_work):
    assert "argument --device:" in usage_error(["--device", device], capsys)


def test_cuda_without_cuda_is_a_usage_error(monkeypatch, capsys, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "argument --device:" in usage_error(["--device", "cuda"], capsys)


def test_cuda_device_index_must_exist(monkeypatch, capsys, no_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "argument --device:" in usage_error(["--device", "cuda:1"], capsys)


def test_unavailable_backends_are_usage_errors(monkeypatch, capsys, no_work):
    # No "cuda" backend is registered anywhere yet: a real lookup that must fail.
    assert "--backend cuda" in usage_error(["--device", "cpu", "--backend", "cuda"], capsys)
    # Triton runs on CPU under its interpreter (conftest); without it, as on a plain CPU host:
    monkeypatch.setattr(train.fastfusion, "available_backends", lambda device_type=None: ("cpp", "torch"))
    message = usage_error(["--device", "cpu", "--backend", "triton"], capsys)
    assert "--backend triton" in message and "cpu" in message


def test_good_arguments_still_parse(no_work):
    args = train.parse_args(["--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--dropout", "0", "--workers", "0",
                             "--weight-decay", "0", "--device", "cpu", "--backend", "torch"])
    assert (args.epochs, args.batch_size, args.lr, args.dropout, args.device) == (1, 4, 0.01, 0.0, "cpu")


# --- output paths -------------------------------------------------------------------------


def test_out_dir_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_work):
    (tmp_path / "taken").write_text("x")
    assert "--out-dir" in usage_error(["--out-dir", str(tmp_path / "taken")], capsys)
    assert "--out-dir" in usage_error(["--out-dir", str(tmp_path / "taken" / "run")], capsys)


def test_checkpoint_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, no_work):
    (tmp_path / "taken").write_text("x")
    assert "--checkpoint" in usage_error(["--checkpoint", str(tmp_path / "taken" / "ck.pt")], capsys)
    assert "--checkpoint" in usage_error(["--checkpoint", str(tmp_path / "taken" / "deeper" / "ck.pt")], capsys)
    assert "--checkpoint" in usage_error(["--checkpoint", str(tmp_path)], capsys)  # a directory


def test_unwritable_output_directories_are_refused(tmp_path, monkeypatch, capsys, no_work):
    # Permissions do not bind root (as in many containers): make os.access say no instead.
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)
    message = usage_error(["--out-dir", str(tmp_path / "run")], capsys)
    assert "--out-dir" in message and f"{tmp_path} is not writable" in message
    assert "--checkpoint" in usage_error(["--checkpoint", str(tmp_path / "ck.pt")], capsys)


def test_cache_dir_that_is_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "taken").write_text("x")
    assert "--cache-dir" in usage_error(["--cache-dir", str(tmp_path / "taken")], capsys)


def test_new_output_directories_are_fine(tmp_path, no_work):
    args = train.parse_args(["--out-dir", str(tmp_path / "a" / "b"), "--checkpoint", str(tmp_path / "c" / "ck.pt")])
    assert args.out_dir == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing


# --- resuming -----------------------------------------------------------------------------

TINY_RUN = ["--model", "lmf", "--num-train", "8", "--num-test", "8", "--batch-size", "8", "--backend", "eager",
            "--no-progress"]


@pytest.fixture(scope="module")
def adam_checkpoint(tmp_path_factory):
    """What one epoch of a real tiny run saves (Adam, the default optimizer)."""
    path = tmp_path_factory.mktemp("resume") / "ck.pt"
    train.main([*TINY_RUN, "--epochs", "1", "--checkpoint", str(path)])
    return path


def test_resume_of_a_missing_file(tmp_path, capsys, no_work):
    message = usage_error(["--resume", str(tmp_path / "nothing.pt")], capsys)
    assert "--resume" in message and "nothing.pt" in message


@pytest.mark.parametrize("content, problem", [
    pytest.param(b"", "is empty", id="empty"),
    pytest.param(random.Random(0).randbytes(256), "not a readable checkpoint", id="random-bytes"),
])
def test_resume_of_a_file_that_is_no_checkpoint(tmp_path, capsys, no_work, content, problem):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    message = usage_error(["--resume", str(path)], capsys)
    assert "--resume" in message and str(path) in message and problem in message


def test_resume_of_a_bare_state_dict(tmp_path, capsys, no_work):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    message = usage_error(["--resume", str(path)], capsys)
    assert str(path) in message and "'optimizer'" in message


def test_resume_with_another_optimizer_names_both(adam_checkpoint, capsys, no_work):
    message = usage_error([*TINY_RUN, "--epochs", "2", "--resume", str(adam_checkpoint), "--optimizer", "sgd"], capsys)
    assert str(adam_checkpoint) in message and "--optimizer sgd" in message and "adam" in message


def test_resume_reports_every_mismatch(adam_checkpoint, capsys, no_work):
    argv = [*TINY_RUN, "--epochs", "2", "--resume", str(adam_checkpoint), "--model", "cbgp", "--size", "paper",
            "--lr", "0.01"]
    message = usage_error(argv, capsys)
    for flag, stored in [("--model cbgp", "lmf"), ("--size paper", "tiny"), ("--lr 0.01", "0.001")]:
        assert flag in message and stored in message, (flag, message)


def test_resume_past_the_requested_epochs(adam_checkpoint, tmp_path, capsys, no_work):
    state = torch.load(adam_checkpoint, weights_only=True)
    path = tmp_path / "later.pt"
    torch.save({**state, "epoch": 4}, path)
    message = usage_error([*TINY_RUN, "--epochs", "3", "--resume", str(path)], capsys)
    assert "--epochs 3" in message and "5 epochs" in message


def _without_config(checkpoint, path):
    """A copy of ``checkpoint`` without its config, as fit(config=None) or older code saves."""
    torch.save({k: v for k, v in torch.load(checkpoint, weights_only=True).items() if k != "config"}, path)
    return path


def test_resume_of_a_checkpoint_without_config_still_parses(adam_checkpoint, tmp_path, no_work):
    path = _without_config(adam_checkpoint, tmp_path / "old.pt")
    assert train.parse_args([*TINY_RUN, "--epochs", "2", "--resume", str(path)]).resume == path


def test_a_checkpoint_of_another_model_names_the_file(adam_checkpoint, tmp_path):
    # Without a config nothing is compared up front; loading still names the file.
    path = _without_config(adam_checkpoint, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"{path} does not fit this model"):
        train.load_checkpoint(path, build_model("cbgp", size="tiny"))


def test_resuming_a_matching_checkpoint_trains_on(adam_checkpoint, tmp_path, capsys):
    path = tmp_path / "ck.pt"
    path.write_bytes(adam_checkpoint.read_bytes())
    train.main([*TINY_RUN, "--epochs", "2", "--resume", str(path), "--checkpoint", str(path)])
    assert torch.load(path, weights_only=True)["epoch"] == 1
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out


# --- damaged recordings -------------------------------------------------------------------


@pytest.fixture
def fake_corpora():
    """tests/fake_corpora.py, whose writers and our readers need the corpora extra."""
    for name in ("av", "soundfile", "librosa"):
        pytest.importorskip(name)
    import fake_corpora

    return fake_corpora


def _wav(fake_corpora, path, samples: int | None = None):
    wave, _ = fake_corpora.clip(0, 1)
    fake_corpora.write_wav(path, wave if samples is None else wave[:samples])
    return path


def test_read_audio_names_a_damaged_wav(fake_corpora, tmp_path):
    truncated = _wav(fake_corpora, tmp_path / "truncated.wav")
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.wav is truncated"):
        read_audio(truncated, 22050)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.wav is empty"):
        read_audio(empty, 22050)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(random.Random(0).randbytes(200))
    with pytest.raises(ValueError, match=r"junk\.wav is not a RIFF/WAVE file"):
        read_audio(junk, 22050)
    short = _wav(fake_corpora, tmp_path / "short.wav", samples=100)
    with pytest.raises(ValueError, match=r"short\.wav holds 100 samples"):
        read_audio(short, 22050, min_samples=2048)
    assert read_audio(short, 22050).shape == (138,)  # usable where nothing asks for a minimum


def _damage(root, fake_corpora):
    """Breaks three of actor 1's .wav files in a RAVDESS root (emotions 2, 4 and 5):
    truncated, empty, too short. Returns them."""
    wavs = {int(p.name[6:8]): p for p in root.rglob("03-*-01.wav")}
    truncated, empty, short = wavs[2], wavs[4], wavs[5]
    truncated.write_bytes(truncated.read_bytes()[:100])
    empty.write_bytes(b"")
    _wav(fake_corpora, short, samples=1000)  # 62 ms at 16 kHz: less than one 2048-sample frame at 22050 Hz
    return [truncated, empty, short]


def test_corpus_skips_damaged_wavs_and_keeps_labels_aligned(fake_corpora, tmp_path):
    root = tmp_path / "ravdess"
    fake_corpora.make_ravdess(root, actors=(1,), emotions=range(1, 7))
    damaged = _damage(root, fake_corpora)
    with pytest.warns(UserWarning) as caught:
        data = corpora.RAVDESS(root, cache_dir=None)
    for path in damaged:
        assert any(str(path) in str(w.message) for w in caught), path
    assert sorted(str(p) for p, _ in data.skipped) == sorted(map(str, damaged))
    # emotions 1, 3 and 6 are left, as labels 0, 2 and 5, each with its own file and item
    assert data.labels.tolist() == [0, 2, 5]
    assert [r.audio.name[6:8] for r in data.recordings] == ["01", "03", "06"]
    assert [data[i]["label"].item() for i in range(len(data))] == [0, 2, 5]


def test_corpus_with_every_wav_damaged_is_an_error(fake_corpora, tmp_path):
    root = tmp_path / "ravdess"
    fake_corpora.make_ravdess(root, actors=(1,), emotions=(2,), av_mp4=False)
    next(root.rglob("03-*.wav")).write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="were skipped"):
        corpora.RAVDESS(root, modalities=("audio",), cache_dir=None)


def test_cli_counts_skipped_files(fake_corpora, tmp_path, capsys):
    root = tmp_path / "ravdess"
    fake_corpora.make_ravdess(root, actors=(1, 2, 3), emotions=range(1, 7))
    damaged = _damage(root, fake_corpora)
    with pytest.warns(UserWarning):
        results = train.main(["--data", "ravdess", "--root", str(root), "--model", "early", "--epochs", "1",
                              "--batch-size", "4", "--no-progress", "--cache-dir", "none",
                              "--out-dir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results["skipped_files"] == saved["skipped_files"] == 3
    assert sorted(s["file"] for s in saved["skipped"]) == sorted(map(str, damaged))
    assert '"skipped_files": 3' in capsys.readouterr().out
