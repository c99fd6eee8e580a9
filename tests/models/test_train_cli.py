"""python -m models.train refuses bad input before any work, naming the flag or the file,
and skips damaged recordings, saying which and counting them in the run's output."""

import json
import random

import pytest
import torch

from models import build_model
from models.datasets import corpora
from models.datasets.media import read_audio
from models.experiments import train
from models.nets.backbones import AudioCNN, VideoCNN


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
    (["--model", "decision_fusion", "--fusion-weights", "audio=-1", "video=2"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "audio=nan", "video=1"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "audio=0", "video=0"], "--fusion-weights"),
    (["--model", "decision_fusion", "--fusion-weights", "audio=0", "video=1", "--learn-weights"], "--learn-weights"),
    (["--model", "cbgp", "--fusion-weights", "audio=0.5", "video=0.5"], "--fusion-weights"),  # would be ignored
    (["--model", "cbgp", "--learn-weights"], "--learn-weights"),
])
def test_bad_fusion_weights_are_usage_errors(argv, flag, capsys, no_work):
    assert flag in usage_error(argv, capsys)


@pytest.mark.parametrize("weights, problem", [
    (["0.55", "0.45"], "takes modality=weight"),                  # the old positional form
    (["vidoe=0.55", "audio=0.45"], "unknown modality 'vidoe'"),
    (["video=0.5", "video=0.2", "audio=0.3"], "video more than one weight"),
    (["video=1"], "audio has none"),
    (["video=x", "audio=1"], "the weight of video"),
    (["video=0.55", "audio=0.38", "text=0.07"], "names text"),     # the synthetic set has no text
])
def test_fusion_weights_are_named_once_for_every_modality(weights, problem, capsys, no_work):
    message = usage_error(["--model", "decision_fusion", "--fusion-weights", *weights], capsys)
    assert "--fusion-weights" in message and problem in message, message


def test_fusion_weights_go_to_the_modality_they_name(no_work):
    # Seed 004: video 55%, audio 38%, text 7%, given in any order.
    args = train.parse_args(["--data", "mosei", "--root", "x", "--model", "decision_fusion",
                             "--fusion-weights", "video=0.55", "text=0.07", "audio=0.38"])
    assert args.fusion_weights == {"audio": 0.38, "video": 0.55, "text": 0.07}
    # On the synthetic set the model's first classifier is the audio one: it gets audio's weight.
    args = train.parse_args(["--model", "decision_fusion", "--fusion-weights", "video=0.6", "audio=0.2"])
    data = train.Data(None, None, ("a", "b", "c", "d"), ("audio", "video"), "classification")
    model = train.make_model(args, data, "classification")
    assert isinstance(model.models[0][0], AudioCNN) and isinstance(model.models[1][0], VideoCNN)
    assert model.weights.tolist() == pytest.approx([0.25, 0.75])  # 0.2 : 0.6, normalised


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
    """tests/models/fake_corpora.py, whose writers and our readers need the corpora extra."""
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


# --- presets ------------------------------------------------------------------------------

# Typed from the papers (models/README.md, Presets, says where each comes from).
PAPER_VALUES = {
    "seed000": {"model": "cbgp", "lr": 0.00003, "epochs": 30, "batch_size": 32, "optimizer": "adam",
                "scheduler": "cosine", "sample_rate": 22500, "n_fft": 2048, "hop_length": 512},
    "seed001": {"model": "lmf_lstm"},
    "seed002": {"model": "mfa_cnn1d", "dropout": 0.2},
    "seed003": {"model": "avt_ca", "lr": 0.01, "epochs": 128, "batch_size": 8, "optimizer": "adam",
                "weight_decay": 0.001},
    "seed004": {"model": "ca_triplet"},
}
CLI_DEFAULTS = {"size": "tiny", "lr": 1e-3, "epochs": 15, "batch_size": 32, "optimizer": "adam", "scheduler": "none",
                "weight_decay": 0.0, "dropout": None, "sample_rate": None, "n_fft": None, "hop_length": None}


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_presets_set_the_papers_values_and_leave_the_rest_at_the_defaults(name, no_work):
    preset = train.PRESETS[name]
    assert set(preset.values) | set(preset.not_given) == set(train.PRESET_KEYS)  # every setting accounted for
    assert not set(preset.values) & set(preset.not_given)
    args = train.parse_args(["--preset", name, "--data", "cremad", "--root", "x"])
    expected = {**CLI_DEFAULTS, "size": "paper", **PAPER_VALUES[name]}
    assert {key: getattr(args, key) for key in train.PRESET_KEYS} == expected
    assert set(preset.not_given) == set(train.PRESET_KEYS) - set(PAPER_VALUES[name]) - {"size"}


def test_flags_given_explicitly_override_the_preset(no_work):
    args = train.parse_args(["--preset", "seed000", "--lr", "0.5", "--size", "tiny", "--scheduler", "none",
                             "--epochs", "30"])  # 30 given explicitly, equal to the preset's: still fine
    assert (args.lr, args.size, args.scheduler, args.epochs, args.batch_size) == (0.5, "tiny", "none", 30, 32)
    assert args.model == "cbgp" and args.n_fft == 2048
    # A flag equal to the CLI default still overrides: 1e-3 is the default lr, not seed003's 0.01.
    assert train.parse_args(["--preset", "seed003", "--lr", "0.001"]).lr == 0.001
    assert train.parse_args(["--lr", "0.5"]).lr == 0.5 and train.parse_args([]).lr == 1e-3  # no preset


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_every_preset_trains_an_epoch_on_the_synthetic_set(name):
    result = train.main(["--preset", name, "--data", "synthetic", "--epochs", "1", "--size", "tiny",
                         "--num-train", "8", "--num-test", "4", "--batch-size", "4", "--no-progress"])
    assert result["config"]["model"] == PAPER_VALUES[name]["model"]
    assert 0.0 <= result["test"]["accuracy"] <= 1.0


# --- learning-rate schedules --------------------------------------------------------------


def _lrs(name: str, epochs: int, **options) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = train.make_scheduler(name, optimizer, epochs=epochs, **options)
    used = []
    for _ in range(epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return used


def test_schedules_per_epoch():
    # cos(pi / 4) = 0.70711: (1 + cos(pi e / 4)) / 2 for e = 0..3
    assert _lrs("cosine", 4) == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert _lrs("step", 5, step=2, gamma=0.5) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])
    assert _lrs("none", 3) == [1.0, 1.0, 1.0]


def test_a_cosine_run_resumed_mid_way_equals_an_uninterrupted_one(tmp_path):
    from models.datasets.data import train_test_split

    data, _ = train_test_split(8, 1, seed=0)
    settings = {"epochs": 3, "batch_size": 4, "lr": 0.01, "scheduler": "cosine"}

    def fresh():
        torch.manual_seed(0)
        return build_model("lmf", size="tiny", dropout=0.0)

    straight = train.fit(fresh(), data, **settings).state_dict()

    def stop_after_first(epoch, loss):
        if epoch == 0:
            raise KeyboardInterrupt

    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        train.fit(fresh(), data, checkpoint=path, on_epoch_end=stop_after_first, **settings)
    saved = torch.load(path, weights_only=True)
    assert saved["scheduler"]["last_epoch"] == 1
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.75)  # (1 + cos(pi / 3)) / 2
    resumed = train.fit(fresh(), data, resume=path, **settings).state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resuming_a_cosine_run_for_more_epochs_is_refused(tmp_path, capsys):
    path = tmp_path / "ck.pt"
    train.main([*TINY_RUN, "--epochs", "1", "--scheduler", "cosine", "--checkpoint", str(path)])
    message = usage_error([*TINY_RUN, "--epochs", "2", "--scheduler", "cosine", "--resume", str(path)], capsys)
    assert "--epochs 2" in message and "spans 1" in message
    assert "--scheduler none" in usage_error([*TINY_RUN, "--epochs", "2", "--resume", str(path)], capsys)


# --- modalities ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, problem", [
    (["--modalities", "audio"], "--model cbgp needs audio,video"),
    (["--model", "unimodal"], "trains on one modality"),
    (["--model", "unimodal", "--modalities", "audio,video"], "trains on one modality"),
    (["--model", "unimodal", "--modalities", "text"], "has no text"),
    (["--modalities", "audio,audio"], "names a modality twice"),
    (["--modalities", "smell"], "unknown modality 'smell'"),
    (["--data", "mosei", "--root", "x", "--model", "lmf_lstm", "--modalities", "audio,video"], "needs audio,video,text"),
    (["--model", "mfa_cnn1d", "--n-fft", "1024"], "hand-crafted features"),
])
def test_modalities_that_the_data_or_model_cannot_take_are_refused(argv, problem, capsys, no_work):
    message = usage_error(argv, capsys)
    assert "--modalities" in message or "--n-fft" in message
    assert problem in message, message


@pytest.mark.parametrize("modality, encoder", [("audio", AudioCNN), ("video", VideoCNN)])
def test_unimodal_model_reads_only_its_modality(modality, encoder):
    args = train.parse_args(["--model", "unimodal", "--modalities", modality])
    assert args.modalities == (modality,)
    model = train.make_model(args, train.Data(None, None, ("a", "b", "c", "d"), args.modalities, "classification"),
                             "classification")
    assert isinstance(model[0], encoder) and model[1].out_features == 4
    result = train.main(["--model", "unimodal", "--modalities", modality, "--epochs", "1", "--num-train", "8",
                         "--num-test", "4", "--batch-size", "4", "--no-progress"])
    assert result["config"]["modalities"] == (modality,)


# --- batch-norm recalibration -------------------------------------------------------------


def test_recalibrated_batchnorm_holds_the_statistics_that_evaluation_sees():
    # Dropout before the batch norm: training-mode dropout would inflate the variance that
    # evaluation (dropout off) never shows; the statistics must be those of the eval pass.
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2, momentum=0.5)
    model = torch.nn.Sequential(linear, torch.nn.Dropout(0.5), norm)
    x = torch.randn(12, 3)
    batches = [{"audio": x[i:i + 4], "label": torch.zeros(4, dtype=torch.long)} for i in range(0, 12, 4)]
    train.recalibrate_batchnorm(model, batches, "classification", torch.device("cpu"), inputs=("audio",))
    with torch.no_grad():
        features = linear(x)
    # A cumulative average over 3 equal batches: each batch's mean / unbiased variance, averaged.
    chunks = features.split(4)
    assert torch.allclose(norm.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0), atol=1e-6)
    assert torch.allclose(norm.running_var, torch.stack([c.var(0) for c in chunks]).mean(0), atol=1e-6)
    assert norm.momentum == 0.5 and model.training


def test_main_leaves_the_callers_backend_as_it_was():
    # main() called from Python runs under --backend without changing the process-wide choice.
    import fastfusion

    before = fastfusion.selected_backend("low_rank_fusion")
    train.main([*TINY_RUN, "--epochs", "1", "--backend", "eager"])
    assert fastfusion.selected_backend("low_rank_fusion") == before != "eager"
