"""Training: loss goes down, 2-process DDP equals one process, checkpoints round-trip, the CLI."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

from models import build_model
from models.datasets.data import TINY, SyntheticAVEmotion
from models.experiments.train import (
    Distributed,
    fit,
    init_distributed,
    load_checkpoint,
    loss_function,
    main,
    make_optimizer,
    save_checkpoint,
    split_batch,
    train_step,
)

# 16 x 16 frames and spectrograms: the tiny models at their smallest.
SMALL = dataclasses.replace(TINY, frame_size=16, audio_size=(16, 16), n_mels=16, num_frames=2, duration_s=0.5)


def _batch(num, task="classification", config=SMALL):
    ds = SyntheticAVEmotion(num, seed=0, config=config)
    items = [ds[i] for i in range(num)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return split_batch(batch, task, torch.device("cpu"))


@pytest.mark.parametrize("name, task", [("cbgp", "classification"), ("tfn", "classification"),
                                        ("lmf_lstm", "regression"), ("avt_ca", "classification")])
def test_a_few_steps_reduce_the_loss(name, task):
    torch.manual_seed(0)
    model = build_model(name, size="tiny", task=task, dropout=0.0)
    inputs, target = _batch(8, task, config=TINY)  # the LSTM models' input sizes are the tiny preset's
    optimizer = make_optimizer("adam", model.parameters(), 3e-3)
    loss_fn = loss_function(task)
    losses = [train_step(model, inputs, target, optimizer, loss_fn) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_model():
    torch.manual_seed(0)
    # No batch norm (its statistics are per process) and no dropout (its masks differ per
    # process): the two runs must then agree to rounding.
    return build_model("lmf_lstm", size="tiny", task="regression", dropout=0.0)


def _ddp_data():
    return SyntheticAVEmotion(16, seed=0, config=dataclasses.replace(TINY, num_frames=2))


FIT = {"task": "regression", "epochs": 2, "batch_size": 8, "lr": 0.05, "seed": 0, "optimizer": "sgd"}


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        assert dist.world_size == world_size and torch.distributed.get_backend() == "gloo"
        model = fit(_ddp_model(), _ddp_data(), dist=dist, **FIT)
        if dist.is_main:
            torch.save(model.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_training_equals_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    single = fit(_ddp_model(), _ddp_data(), **FIT).state_dict()
    assert distributed.keys() == single.keys()
    initial = _ddp_model().state_dict()
    assert all(not torch.equal(value, initial[key]) for key, value in single.items())  # every parameter trained
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_global_batch_must_split_evenly_across_processes():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        fit(_ddp_model(), _ddp_data(), dist=Distributed(rank=0, world_size=3), **FIT)


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model("cbgp", size="tiny")
    optimizer = make_optimizer("adam", model.parameters(), 1e-3)
    inputs, target = _batch(4)
    train_step(model, inputs, target, optimizer, loss_function("classification"))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, epoch=3, config={"model": "cbgp", "lr": 1e-3, "checkpoint": None})
    torch.load(path, weights_only=True)  # plain tensors and containers only

    torch.manual_seed(1)
    restored = build_model("cbgp", size="tiny")
    restored_optimizer = make_optimizer("adam", restored.parameters(), 1e-3)
    state = load_checkpoint(path, restored, restored_optimizer)
    assert state["epoch"] == 3 and state["config"]["model"] == "cbgp"
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)  # hash/sign buffers included
    assert restored_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_resuming_continues_exactly(tmp_path):
    # dropout, batch norm and Adam all active: resuming must restore every piece of state
    data = SyntheticAVEmotion(12, seed=0, config=SMALL)
    settings = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "seed": 0}

    def fresh():
        torch.manual_seed(0)
        return build_model("mfb", size="tiny")

    straight = fit(fresh(), data, **settings)
    path = tmp_path / "ckpt.pt"
    fit(fresh(), data, **{**settings, "epochs": 1}, checkpoint=path)
    resumed = fit(fresh(), data, **settings, resume=path)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_cli_trains_evaluates_and_writes_its_outputs(tmp_path, capsys):
    results = main(["--model", "lmf", "--epochs", "1", "--num-train", "16", "--num-test", "8", "--batch-size", "8",
                    "--backend", "eager", "--no-progress", "--checkpoint", str(tmp_path / "last.pt"),
                    "--out-dir", str(tmp_path / "run")])
    assert set(results["test"]) >= {"accuracy", "weighted_f1", "specificity", "cohen_kappa", "confusion_matrix"}
    assert results["backend"] == "eager"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == results["test"]["accuracy"]
    assert (tmp_path / "run" / "confusion.png").stat().st_size > 1000
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    assert '"model": "lmf"' in capsys.readouterr().out


def test_cli_regression_reports_the_sentiment_metrics(tmp_path):
    results = main(["--model", "tfn_lstm", "--task", "regression", "--epochs", "1", "--num-train", "8",
                    "--num-test", "8", "--batch-size", "4", "--no-progress"])
    assert set(results["test"]) == {"mae", "rmse", "pearson_r", "acc2", "acc7"}
