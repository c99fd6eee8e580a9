"""Train and evaluate a model on the synthetic audio-video emotion data or a real corpus.

    python -m models.train --model cbgp --data synthetic --epochs 15 --out-dir runs/cbgp
    python -m models.train --model lmf_lstm --task regression --backend eager
    python -m models.train --model cbgp --data ravdess --root ~/data/RAVDESS     # also cremad
    python -m models.train --model mfa_cnn1d --data cremad --root ~/data/CREMA-D
    python -m models.train --model lmf_lstm --data mosei --root ~/data/MOSEI     # sentiment regression
    python -m models.train --model cbgp --data mosei --root ~/data/CMU_MOSEI     # raw media: 7-class sentiment
    python -m models.train --model decision_fusion --data mosei --root ~/data/MOSEI \
        --fusion-weights video=0.55 audio=0.38 text=0.07                          # seed 004's weights
    python -m models.train --preset seed000 --data synthetic                      # a seed paper's recipe
    python -m models.train --model unimodal --modalities audio --data ravdess --root ~/data/RAVDESS
    torchrun --nproc_per_node 2 -m models.train --model cbgp      # data-parallel, gloo on CPU

``--batch-size`` is the global batch: with N processes each takes batch_size / N samples
of it, and DistributedDataParallel averages the gradients, so a step is the same step
whatever N is (exactly so for models without dropout or batch norm, whose statistics are
per process). Evaluation runs on rank 0 over the whole test set. Checkpoints hold plain
state dicts and are read back with ``torch.load(weights_only=True)``.

``--preset seedNNN`` sets what seed paper NNN gives of the model, its size, the
optimisation (lr, epochs, batch size, optimizer, schedule, weight decay, dropout) and the
audio front-end (:data:`PRESETS`); a flag given explicitly overrides its preset value, and
what the paper leaves open keeps the CLI default. ``--scheduler cosine`` anneals the
learning rate per epoch (torch's ``CosineAnnealingLR`` over ``--epochs``), ``step``
multiplies it by ``--lr-gamma`` every ``--lr-step`` epochs (``StepLR``).

``--modalities`` picks the modalities a model sees: one of them alone trains ``--model
unimodal`` (that modality's encoder and a linear decision layer), so that an audio-only
corpus (RAVDESS's ``Audio_Speech_Actors_01-24``) can be used; the fusion models need all
of the data's modalities.

Arguments are checked before any data is loaded: a bad number, device or backend, an
output path that cannot be written, or a ``--resume`` file that is no checkpoint or was
saved with other settings is a usage error (exit code 2) naming the flag and file.
Recordings whose ``.wav`` is damaged are skipped with a warning and counted in the output
(``skipped_files``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import fastfusion

from ..datasets import corpora, mosei
from ..datasets.data import CLASS_NAMES, SyntheticAVEmotion, SyntheticConfig, train_test_split
from ..datasets.mosei import MODALITIES as MOSEI_MODALITIES
from ..features.handcrafted import HandcraftedFrontend
from ..nets.backbones import AudioCNN, VideoCNN
from ..nets.decision_fusion import unimodal_classifier
from ..zoo import (
    MODEL_NAMES,
    MOSEI_MODEL_NAMES,
    SEQUENCE_MODELS,
    SIZES,
    build_model,
    data_config,
    features_for,
    get_preset,
)
from . import metrics

TASKS = ("classification", "regression")
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "cosine", "step")
DATA = ("synthetic",) + corpora.CORPUS_NAMES
# "unimodal": one modality's encoder and a linear decision layer (--modalities audio or video).
UNIMODAL = "unimodal"
ALL_MODEL_NAMES = MODEL_NAMES + (UNIMODAL,)
AV_INPUTS = ("audio", "video")


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process sits: rank and world size (1 when not distributed), and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> str:
    """``device``, with "auto" made cuda where CUDA is available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1):
    NCCL with one GPU per process on CUDA, gloo on CPU. A single process needs no group."""
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    torch_dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Distributed(torch_dist.get_rank(), world_size, target)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, *, dist: Distributed, shuffle: bool, seed: int, workers: int = 0
) -> DataLoader:
    """A loader of this process's share of every global batch of ``batch_size``.

    Always through DistributedSampler (a single process is world size 1), so the global
    batches are the same sets of samples whatever the number of processes."""
    if batch_size % dist.world_size:
        raise ValueError(
            f"the global batch size ({batch_size}) must be a multiple of the number of processes ({dist.world_size})"
        )
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size // dist.world_size, sampler=sampler, num_workers=workers)


def split_batch(
    batch: dict, task: str, device: torch.device, inputs: tuple[str, ...] = AV_INPUTS
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(model inputs, target) of a dataset batch; ``inputs`` names the item keys forward takes, in order."""
    target = batch["label"] if task == "classification" else batch["sentiment"]
    return tuple(batch[key].to(device) for key in inputs), target.to(device)


def loss_function(task: str) -> nn.Module:
    """Cross-entropy for classes; L1 for sentiment, the LMF paper's training loss."""
    return nn.CrossEntropyLoss() if task == "classification" else nn.L1Loss()


def make_optimizer(
    name: str, parameters: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, epochs: int, step: int = 10, gamma: float = 0.1
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule ``name`` (one of :data:`SCHEDULERS`), stepped once per epoch:

    - "none": the optimizer's lr throughout (returns None);
    - "cosine": lr_e = lr (1 + cos(pi e / epochs)) / 2 in epoch e = 0 .. epochs - 1
      (``CosineAnnealingLR`` with T_max = epochs, eta_min = 0);
    - "step": lr_e = lr gamma^floor(e / step) (``StepLR``).
    """
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=gamma)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


def train_step(
    model: nn.Module, inputs, target: torch.Tensor, optimizer: torch.optim.Optimizer, loss_fn: nn.Module
) -> float:
    """One optimisation step on a batch; returns the (local) mean loss.

    Models with an objective of their own (``has_training_loss``: a triplet term, one loss
    per modality) return it from ``forward(*inputs, target=...)``, so that DDP sees a
    single forward call either way."""
    optimizer.zero_grad(set_to_none=True)
    if getattr(getattr(model, "module", model), "has_training_loss", False):
        loss = model(*inputs, target=target)
    else:
        loss = loss_fn(model(*inputs), target)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: DataLoader, task: str, device: torch.device, inputs: tuple[str, ...] = AV_INPUTS
) -> None:
    """Replace every batch norm's running statistics by their average over one pass of
    ``loader`` at the current weights ("precise BN").

    The running averages that training keeps lag behind weights that still move fast; on
    the synthetic data that lag alone cost some final epochs 25 points of test accuracy
    while the same weights scored 100% with batch statistics. Dropout stays off and the
    RNG state is restored afterwards (iterating a DataLoader draws a seed), so a resumed run
    stays identical to an uninterrupted one. ``inputs``: the item keys forward takes.

    Not ``torch.optim.swa_utils.update_bn``, which does the same reset-and-average but puts
    the *whole* model in training mode for the pass: dropout then perturbs the activations
    that later batch norms average, and the statistics no longer match what evaluation
    (dropout off) feeds them. It also calls ``model(x)`` with a single input, where our
    models take one per modality.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
        bn.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in loader:
            tensors, _ = split_batch(batch, task, device, inputs)
            model(*tensors)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, task: str, device: torch.device, inputs: tuple[str, ...] = AV_INPUTS
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) over the loader: class indices, or sentiment scores."""
    was_training = model.training
    model.eval()
    predictions, targets = [], []
    for batch in loader:
        tensors, target = split_batch(batch, task, device, inputs)
        out = model(*tensors)
        predictions.append((out.argmax(-1) if task == "classification" else out).cpu())
        targets.append(target.cpu())
    model.train(was_training)
    return torch.cat(predictions).numpy(), torch.cat(targets).numpy()


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    *,
    device: torch.device,
    batch_size: int = 64,
    inputs: tuple[str, ...] = AV_INPUTS,
    num_classes: int = len(CLASS_NAMES),
) -> dict:
    """The task's metric report over a whole dataset, in this process."""
    loader = DataLoader(dataset, batch_size=batch_size)
    predictions, targets = predict(model, loader, task, device, inputs)
    if task == "classification":
        return metrics.classification_report(targets, predictions, num_classes)
    return metrics.regression_report(targets, predictions)


def save_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, config: dict,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": config,
        "torch_rng": torch.get_rng_state(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if torch.cuda.is_initialized():  # dropout on the GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "torch_rng")


def read_checkpoint(path: str | Path) -> dict:
    """The state :func:`save_checkpoint` wrote at ``path``; ValueError naming the file and
    what is wrong when it is no such checkpoint. Only tensors and plain containers are
    unpickled (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways (zip, pickle, EOF); each means the same here
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of models.train: it lacks {', '.join(map(repr, missing))}")
    return state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer) state in place; returns the checkpoint's epoch, config
    and RNG state (:func:`read_checkpoint`). ValueError naming the file when its weights do
    not fit ``model``."""
    state = read_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as error:  # torch's and fastfusion's messages name keys and shapes, not the file
        raise ValueError(f"{path} does not fit this model: {error}") from error
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def fit(
    model: nn.Module,
    train_set: Dataset,
    *,
    task: str = "classification",
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    scheduler: str = "none",
    lr_step: int = 10,
    lr_gamma: float = 0.1,
    dist: Distributed = Distributed(),
    workers: int = 0,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    config: dict | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    inputs: tuple[str, ...] = AV_INPUTS,
) -> nn.Module:
    """Train ``model`` (moved to ``dist.device``) and return it, unwrapped from DDP.

    ``scheduler`` (with ``lr_step`` and ``lr_gamma``): :func:`make_scheduler`, stepped after
    every epoch. The data order depends only on ``seed`` and the epoch. After the last epoch the batch
    norm statistics are recomputed over the training data (:func:`recalibrate_batchnorm`).
    With ``checkpoint`` the state is saved after every epoch (by rank 0); with ``resume``
    training continues after the checkpoint's epoch, with its optimizer state and RNG
    state, as if never interrupted. ``on_epoch_end(epoch, mean_loss)`` runs on rank 0 after
    each epoch. ``inputs``: the item keys forward takes, in order.

    A model with a step fitted in closed form (MFA's ``prepare(train_set)``) takes it first,
    in every process alike (it is deterministic), unless resumed: the checkpoint holds its
    result.
    """
    if resume is None and hasattr(model, "prepare"):
        model.prepare(train_set)
    loader = make_loader(train_set, batch_size, dist=dist, shuffle=True, seed=seed, workers=workers)
    model.to(dist.device).train()
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    # Made before the optimizer state is loaded: a scheduler's constructor sets the lr to its
    # first value, which would overwrite the resumed one.
    schedule = make_scheduler(scheduler, opt, epochs=epochs, step=lr_step, gamma=lr_gamma)
    start = 0
    if resume is not None:
        state = load_checkpoint(resume, model, opt)
        if schedule is not None:
            if "scheduler" not in state:
                raise ValueError(f"{resume} was saved without a learning-rate schedule; --scheduler {scheduler} "
                                 "cannot resume from it")
            schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], dist.device)
        start = state["epoch"] + 1
    wrapped = DistributedDataParallel(model) if dist.world_size > 1 else model
    loss_fn = loss_function(task)
    for epoch in range(start, epochs):
        loader.sampler.set_epoch(epoch)
        total, steps = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and dist.is_main), leave=False)
        for batch in bar:
            tensors, target = split_batch(batch, task, dist.device, inputs)
            total += train_step(wrapped, tensors, target, opt, loss_fn)
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.4f}")
        mean_loss = _mean_over_processes(total / max(steps, 1), dist)
        if schedule is not None:
            schedule.step()
        if epoch == epochs - 1:
            recalibrate_batchnorm(model, loader, task, dist.device, inputs)
        if dist.is_main:
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, opt, epoch, config or {}, schedule)
            if on_epoch_end is not None:
                on_epoch_end(epoch, mean_loss)
    return model


def _mean_over_processes(value: float, dist: Distributed) -> float:
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.item() / dist.world_size


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], requirement: str):
    """An argparse ``type``: ``convert`` the text, and refuse what ``accept`` rejects, so that
    a bad value is a usage error naming its flag rather than a traceback minutes later."""

    def parse(text: str):
        try:
            value = convert(text)
            good = accept(value)
        except ValueError:
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
        return value

    return parse


# Comparisons with nan are false, so nan fails every one of these.
positive_int = _checked(int, lambda v: v > 0, "must be a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "must be a non-negative integer")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "must be a positive finite number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "must be a finite number >= 0")
probability = _checked(float, lambda v: 0 <= v < 1, "must lie in [0, 1)")
seed_value = _checked(int, lambda v: 0 <= v < 2**32, "must be an integer in [0, 2**32)")  # numpy's seed range
# Every modality any data here has, in the order models take them.
ALL_MODALITIES = tuple(dict.fromkeys(AV_INPUTS + MOSEI_MODALITIES))


def named_weight(text: str) -> tuple[str, float]:
    """An argparse ``type`` for --fusion-weights: ``modality=weight`` -> (modality, weight)."""
    name, equals, number = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"takes modality=weight, e.g. video=0.55, got {text!r}")
    if name not in ALL_MODALITIES:
        raise argparse.ArgumentTypeError(f"unknown modality {name!r} in {text!r}; name {', '.join(ALL_MODALITIES)}")
    try:
        return name, non_negative_float(number)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"the weight of {name} {error}") from None


def modality_list(text: str) -> tuple[str, ...]:
    """An argparse ``type`` for --modalities: comma-separated names, e.g. "audio,video"."""
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in ALL_MODALITIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown modality {unknown[0]!r} in {text!r}; "
                                         f"choose from {', '.join(ALL_MODALITIES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"names a modality twice: {text!r}")
    return names


@dataclasses.dataclass(frozen=True)
class Preset:
    """One seed paper's recipe: ``values`` maps argument names (``args`` attributes) to what
    the paper gives, ``not_given`` names the settings it leaves open, which keep the CLI's
    defaults. models/README.md ("Presets") has every value with where the paper gives it."""

    paper: str
    values: dict
    not_given: tuple[str, ...]


# The settings a preset decides, given or not: every one appears in values or not_given.
PRESET_KEYS = ("model", "size", "lr", "epochs", "batch_size", "optimizer", "scheduler", "weight_decay", "dropout",
               "sample_rate", "n_fft", "hop_length")
PRESETS = {
    # 000 (CBGP): the model is the paper's proposal; Table 2 gives the training values (both
    # encoders alike, except epochs "30" for audio and "30-50" for video: 30), section 4.2a
    # the front-end ("sampled at 22500 Hz", "window size of 2048 and a hop length of 512").
    # Its dropouts differ per encoder (audio "0.3%", video "0.2%", read as 0.3 and 0.2),
    # which one --dropout cannot express: the encoders' own defaults are those values.
    # "Regularization=L2" comes without a coefficient: weight decay is not given.
    "seed000": Preset("000 CBGP", {"model": "cbgp", "size": "paper", "lr": 3e-5, "epochs": 30, "batch_size": 32,
                                   "optimizer": "adam", "scheduler": "cosine", "sample_rate": 22500, "n_fft": 2048,
                                   "hop_length": 512},
                      ("weight_decay", "dropout")),
    # 001 (LMF vs TFN): LMF is the proposal; the paper gives no training or front-end values.
    "seed001": Preset("001 LMF vs TFN", {"model": "lmf_lstm", "size": "paper"},
                      ("lr", "epochs", "batch_size", "optimizer", "scheduler", "weight_decay", "dropout",
                       "sample_rate", "n_fft", "hop_length")),
    # 002 (MFA + 1D-CNN): the only training value is the 20% dropout after the dense layer
    # (section E); its layer table's other dropouts have no rate, and get the same.
    "seed002": Preset("002 MFA + 1D-CNN", {"model": "mfa_cnn1d", "size": "paper", "dropout": 0.2},
                      ("lr", "epochs", "batch_size", "optimizer", "scheduler", "weight_decay",
                       "sample_rate", "n_fft", "hop_length")),
    # 003 (AVT-CA), section 4: "128 epochs", "Batch Size: 8", "Optimizer: Adam", "Learning
    # Rate: 0.01", "Weight Decay: 0.001"; no schedule, dropout rate or front-end values.
    "seed003": Preset("003 AVT-CA", {"model": "avt_ca", "size": "paper", "lr": 0.01, "epochs": 128, "batch_size": 8,
                                     "optimizer": "adam", "weight_decay": 0.001},
                      ("scheduler", "dropout", "sample_rate", "n_fft", "hop_length")),
    # 004 (review): cross-modal attention with the emotion-constrained triplet loss; a review,
    # it gives no training values.
    "seed004": Preset("004 review: cross-attention + triplet", {"model": "ca_triplet", "size": "paper"},
                      ("lr", "epochs", "batch_size", "optimizer", "scheduler", "weight_decay", "dropout",
                       "sample_rate", "n_fft", "hop_length")),
}


def device_name(text: str) -> str:
    """An argparse ``type`` for --device: auto, or a cpu or cuda device that this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA, which this machine or torch build lacks")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created (where missing) and written in, or None.
    Creates nothing: a run refused for another argument leaves no trace."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


# What a checkpoint's state is of: the model's architecture and weights (decision fusion's
# fixed weights are a buffer), and the optimizer's kind and hyperparameters (its state
# dict carries lr and weight decay, which would silently replace the new ones).
# The schedule's kind and parameters are in the scheduler's state, which a resumed run loads.
RESUME_MUST_MATCH = ("model", "size", "data", "task", "modalities", "fusion_weights", "learn_weights", "optimizer",
                     "lr", "weight_decay", "scheduler", "lr_step", "lr_gamma")


def _resume_mismatches(stored: dict, args: argparse.Namespace) -> list[str]:
    """Each argument of RESUME_MUST_MATCH that differs from the checkpoint's config, with
    both values. Checkpoints without a config (``fit(config=None)``) have nothing to compare."""

    def plain(value):  # a tuple saved in the config may come back as a list
        return list(value) if isinstance(value, tuple) else value

    def shown(value) -> str:
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in value.items())
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    # The task as it will run: --task, else the data's own (load_data's Data.task).
    wanted = {**vars(args), "task": args.task or ("regression" if _mosei_features(args) else "classification")}
    mismatches = [f"--{key.replace('_', '-')} {shown(wanted[key])} (the checkpoint has {shown(stored[key])})"
                  for key in RESUME_MUST_MATCH if key in stored and plain(stored[key]) != plain(wanted[key])]
    # A cosine schedule spans the run's epochs (its T_max): more epochs would be another schedule.
    if args.scheduler == "cosine" and stored.get("scheduler") == "cosine" and stored.get("epochs") != args.epochs:
        mismatches.append(f"--epochs {args.epochs} (the checkpoint's cosine schedule spans {stored.get('epochs')})")
    return mismatches


def _mosei_features(args: argparse.Namespace) -> bool:
    """--data mosei with a root of feature pickles (the sequence models' data), not the raw media."""
    return args.data == "mosei" and (args.root is None or mosei.source_kind(args.root) == "features")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a seed paper's model, sizes and training recipe (models/README.md, Presets); "
                        "flags given explicitly override it")
    p.add_argument("--model", choices=ALL_MODEL_NAMES, default="cbgp",
                   help="fusion head on the CNN encoders, or a whole model; with --data mosei feature pickles: "
                        + ", ".join(MOSEI_MODEL_NAMES) + f"; {UNIMODAL}: one modality (--modalities)")
    p.add_argument("--data", choices=DATA, default="synthetic", help="the synthetic set or a corpus under --root")
    p.add_argument("--modalities", type=modality_list, default=None,
                   help="comma-separated: audio, video, or all of the data's (default; mosei: audio,video,text)")
    p.add_argument("--root", type=Path, default=None, help="the corpus directory (models/DATASETS.md has the layouts)")
    p.add_argument("--cache-dir", default="auto", help="feature cache of the media corpora: auto, a path, or none")
    p.add_argument("--size", choices=SIZES, default="tiny", help="model and data sizes: tiny (CPU) or the papers'")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: the data's own (mosei pickles: regression, else classification); "
                        "regression: lmf_lstm / tfn_lstm (and decision_fusion on mosei)")
    p.add_argument("--fusion-weights", type=named_weight, nargs="+", default=None, metavar="MODALITY=W",
                   help="decision_fusion: a weight per modality by name, e.g. video=0.55 audio=0.38 text=0.07")
    p.add_argument("--learn-weights", action="store_true",
                   help="decision_fusion: learn the weights (softmax-parametrised), starting from --fusion-weights")
    p.add_argument("--num-train", type=positive_int, default=2048)
    p.add_argument("--num-test", type=positive_int, default=512)
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch, split across processes")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="none",
                   help="learning-rate schedule, stepped per epoch: cosine annealing to 0 over --epochs, "
                        "or x --lr-gamma every --lr-step epochs")
    p.add_argument("--lr-step", type=positive_int, default=10, help="--scheduler step: epochs between decays")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="--scheduler step: the decay factor")
    p.add_argument("--sample-rate", type=positive_int, default=None,
                   help="audio front-end sample rate in Hz (default: the size's, 22050)")
    p.add_argument("--n-fft", type=positive_int, default=None, help="audio front-end STFT window (default 2048)")
    p.add_argument("--hop-length", type=positive_int, default=None, help="audio front-end STFT hop (default 512)")
    p.add_argument("--dropout", type=probability, default=None, help="override every dropout probability")
    p.add_argument("--seed", type=seed_value, default=0, help="seeds the model, the data order and the dataset")
    p.add_argument("--backend", choices=("auto", "eager", "torch", "triton", "cpp", "cuda"), default="auto",
                   help="fastfusion backend; eager is the plain-PyTorch reference")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="DataLoader processes rendering clips (for --size paper)")
    p.add_argument("--checkpoint", type=Path, default=None, help="save here after every epoch")
    p.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    p.add_argument("--out-dir", type=Path, default=None, help="write metrics.json (and confusion.png) here")
    p.add_argument("--no-progress", action="store_true")
    # Each preset setting starts unset, so that what the user gave explicitly can be told
    # apart from argparse's defaults (which it only fills in for attributes not yet present).
    args = p.parse_args(argv, namespace=argparse.Namespace(**{key: _UNSET for key in PRESET_KEYS}))
    preset = PRESETS[args.preset].values if args.preset is not None else {}
    for key in PRESET_KEYS:
        if getattr(args, key) is _UNSET:
            setattr(args, key, preset.get(key, p.get_default(key)))
    # Mistakes caught here rather than minutes later, after a corpus scan or feature extraction.
    if args.data != "synthetic" and args.root is None:
        p.error(f"--data {args.data} needs --root, the corpus directory")
    mosei_features = _mosei_features(args)
    if features_for(args.model) == "handcrafted" and mosei_features:
        p.error(f"--model {args.model} reads hand-crafted features of media: --data synthetic, "
                f"{' or '.join(corpora.CORPORA)}, or mosei with the raw release (not its feature pickles)")
    if mosei_features and args.model not in MOSEI_MODEL_NAMES:
        p.error(f"--data mosei with feature pickles takes --model {' / '.join(MOSEI_MODEL_NAMES)}, "
                f"got {args.model} (the audio-video models need the raw release: models/DATASETS.md)")
    if args.task == "regression" and args.data == "mosei" and not mosei_features and \
            args.model not in SEQUENCE_MODELS:
        p.error(f"--model {args.model} is a classifier; on MOSEI media only lmf_lstm and tfn_lstm regress")
    if args.task == "regression" and args.data in corpora.CORPORA:
        p.error(f"--data {args.data} has emotion classes only, no sentiment to regress")
    if args.task == "regression" and args.data == "synthetic" and args.model not in SEQUENCE_MODELS:
        p.error(f"--model {args.model} is a classifier on --data synthetic")
    _check_modalities(p, args)
    front_end = [f"--{key.replace('_', '-')}" for key in ("sample_rate", "n_fft", "hop_length")
                 if getattr(args, key) is not None]
    if front_end and features_for(args.model) == "handcrafted":
        p.error(f"{' '.join(front_end)} set the spectrogram images' front-end; --model {args.model} reads "
                "hand-crafted features")
    if front_end and args.data == "mosei":
        p.error(f"{' '.join(front_end)} set the spectrogram images' front-end; --data mosei ships its features")
    if (args.fusion_weights is not None or args.learn_weights) and args.model != "decision_fusion":
        p.error(f"--fusion-weights and --learn-weights set decision_fusion's weights; --model {args.model} has none")
    if args.fusion_weights is not None:
        args.fusion_weights = _fusion_weights(p, args.fusion_weights, args.modalities)
        if args.learn_weights and 0 in args.fusion_weights.values():
            p.error("--learn-weights starts from --fusion-weights, which must then all be positive "
                    "(the softmax never reaches 0)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # as init_distributed reads it
    if args.batch_size % world_size:
        p.error(f"--batch-size {args.batch_size} is the global batch: it must be a multiple of the number of "
                f"processes ({world_size})")
    # Where the run will write, checked now rather than at the first save or after the last epoch.
    if args.checkpoint is not None and args.checkpoint.is_dir():
        p.error(f"--checkpoint {args.checkpoint} is a directory; name the file to save to")
    directories = [  # (flag, its value, the directory it writes in)
        ("--out-dir", args.out_dir, args.out_dir),
        ("--checkpoint", args.checkpoint, None if args.checkpoint is None else args.checkpoint.parent),
        ("--cache-dir", args.cache_dir, None if args.cache_dir in ("auto", "none") else Path(args.cache_dir)),
    ]
    for flag, value, directory in directories:
        problem = None if directory is None else _unwritable(directory)
        if problem is not None:
            p.error(f"{flag} {value}: {problem}")
    if args.resume is not None:
        try:
            state = read_checkpoint(args.resume)
        except ValueError as error:
            p.error(f"--resume {error}")
        done = state["epoch"] + 1
        if done > args.epochs:
            p.error(f"--epochs {args.epochs}: --resume {args.resume} has already trained {done} epochs")
        mismatches = _resume_mismatches(state.get("config", {}), args)
        if mismatches:
            p.error(f"--resume {args.resume} was saved with other settings, which its state holds; "
                    "resume with the checkpoint's values or start afresh:\n  " + "\n  ".join(mismatches))
    # Last, as asking about "cpp" may build the C++ extension (once); "torch" runs everywhere.
    if args.backend not in ("auto", "eager", "torch"):
        device_type = torch.device(resolve_device(args.device)).type
        available = fastfusion.available_backends(device_type)
        if args.backend not in available:
            hint = " (python -m fastfusion._extension says why it does not build)" if args.backend == "cpp" else ""
            p.error(f"--backend {args.backend} is not available on {device_type} here{hint}; "
                    f"choose from auto, eager, {', '.join(available)}")
    return args


_UNSET = object()  # parse_args's marker of a preset setting not given on the command line


def _data_modalities(args: argparse.Namespace) -> tuple[str, ...]:
    """The modalities of --data: MOSEI's feature pickles hold three, the media two."""
    return MOSEI_MODALITIES if _mosei_features(args) else AV_INPUTS


def _check_modalities(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set ``args.modalities`` (default: all of the data's) and refuse a selection the data
    lacks, or that does not fit the model: ``unimodal`` takes one modality, every other
    model all of the data's."""
    available = _data_modalities(args)
    if args.modalities is None:
        args.modalities = available
    missing = [m for m in args.modalities if m not in available]
    if missing:
        p.error(f"--modalities {','.join(args.modalities)}: --data {args.data} has no {missing[0]} "
                f"(it has {','.join(available)})")
    args.modalities = tuple(m for m in available if m in args.modalities)  # in the order models take them
    if args.model == UNIMODAL:
        if len(args.modalities) != 1 or args.data == "mosei":
            p.error(f"--model {UNIMODAL} trains on one modality: --modalities audio or --modalities video"
                    + (" (not on --data mosei, whose models take all its modalities)" if args.data == "mosei" else ""))
    elif args.modalities != available:
        p.error(f"--model {args.model} needs {','.join(available)}, but --modalities selects "
                f"{','.join(args.modalities)}" + (f"; --model {UNIMODAL} trains on one modality"
                                                  if len(args.modalities) == 1 and args.data != "mosei" else ""))


def _fusion_weights(p: argparse.ArgumentParser, named: list[tuple[str, float]],
                    modalities: tuple[str, ...]) -> dict[str, float]:
    """--fusion-weights as {modality: weight} in ``modalities``' order, with one weight for
    each selected modality and no other."""
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        p.error(f"--fusion-weights gives {repeated[0]} more than one weight")
    extra = [n for n in names if n not in modalities]
    if extra:
        p.error(f"--fusion-weights names {extra[0]}, which is not among the modalities ({','.join(modalities)})")
    missing = [m for m in modalities if m not in names]
    if missing:
        p.error(f"--fusion-weights needs a weight for every modality ({','.join(modalities)}): "
                f"{','.join(missing)} has none")
    weights = dict(named)
    if not any(weights.values()):
        p.error("--fusion-weights are all 0; at least one must be positive")
    return {m: weights[m] for m in modalities}


@dataclasses.dataclass(frozen=True)
class Data:
    """Training and test sets, and what the model and the report need to know of them:
    class names, the item keys forward takes (in order) and the data's own task."""

    train: Dataset
    test: Dataset
    class_names: tuple[str, ...]
    inputs: tuple[str, ...]
    task: str
    skipped: tuple[tuple[Path, str], ...] = ()  # (file, problem) of each recording left out


class HandcraftedClips(Dataset):
    """Synthetic clips as the hand-crafted seed system (``mfa_cnn1d``) takes media: each
    clip's waveform and frames through :class:`~models.features.handcrafted.HandcraftedFrontend`
    (MFCC, ZCR, energy and pitch statistics; STIP descriptors), computed once and kept.
    Item: ``audio`` and ``video`` vectors, ``label``.

    The clips are those the dataset's items show as images (:meth:`SyntheticAVEmotion.render`)."""

    def __init__(self, clips: SyntheticAVEmotion):
        self.clips = clips
        self.frontend = HandcraftedFrontend(sample_rate=clips.config.sample_rate)
        self._items: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._items:
            wave, frames = self.clips.render(index)
            self._items[index] = {**self.frontend(wave, frames), "label": self.clips.labels[index]}
        return self._items[index]


def frontend_config(args: argparse.Namespace) -> SyntheticConfig:
    """The size's data configuration with the audio front-end flags given (or a preset's)."""
    overrides = {key: getattr(args, key) for key in ("sample_rate", "n_fft", "hop_length")
                 if getattr(args, key) is not None}
    return dataclasses.replace(data_config(args.size), **overrides)


def load_data(args: argparse.Namespace) -> Data:
    """The training and test sets of ``args.data``, with ``args.modalities`` as inputs."""
    features = features_for(args.model)
    if args.data == "synthetic":
        # Tiny clips are kept once rendered; paper-size ones (~10 MB each) are rendered per epoch.
        train_set, test_set = train_test_split(args.num_train, args.num_test, seed=args.seed,
                                               config=frontend_config(args), cache=args.size == "tiny")
        if features == "handcrafted":
            train_set, test_set = HandcraftedClips(train_set), HandcraftedClips(test_set)
        return Data(train_set, test_set, CLASS_NAMES, args.modalities, "classification")
    options = {} if args.data == "mosei" else {"modalities": args.modalities}
    corpus = corpora.build_corpus(args.data, args.root, features=features, config=frontend_config(args),
                                  seed=args.seed, cache_dir=None if args.cache_dir == "none" else args.cache_dir,
                                  **options)
    return Data(corpus.train, corpus.test, corpus.class_names, corpus.modalities, corpus.task, corpus.skipped)


def make_model(args: argparse.Namespace, data: Data, task: str) -> nn.Module:
    num_classes = len(data.class_names)
    # The builders take decision fusion's weights in forward's order, which data.inputs is.
    weights = None if args.fusion_weights is None else [args.fusion_weights[m] for m in data.inputs]
    fusion = {"weights": weights, "learn_weights": args.learn_weights}
    if args.model == UNIMODAL:
        (modality,) = data.inputs
        preset = get_preset(args.size)
        drop = {} if args.dropout is None else {"dropout": args.dropout}
        encoder = (AudioCNN(preset.audio_channels, **drop) if modality == "audio"
                   else VideoCNN(preset.video_channels, **drop))
        return unimodal_classifier(encoder, encoder.out_dim, num_classes)
    # MOSEI's feature widths differ between the toolkits' files: read them from the data.
    dims = tuple(data.train.dims[m] for m in data.inputs) if isinstance(data.train, mosei.CMUMOSEI) else None
    return build_model(args.model, size=args.size, num_classes=num_classes, task=task, dropout=args.dropout,
                       input_dims=dims, class_names=data.class_names, **fusion)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist = init_distributed(args.device)
    try:
        # A context, not set_backend: main() called from Python leaves the caller's choice as it was.
        with fastfusion.backend(args.backend):
            return _run(args, dist)
    finally:
        if dist.world_size > 1:
            torch_dist.destroy_process_group()


def _run(args: argparse.Namespace, dist: Distributed) -> dict:
    seed_everything(args.seed)
    data = load_data(args)
    task = args.task or data.task
    model = make_model(args, data, task)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["task"] = task  # what ran, not None for "the data's own"

    def report(epoch: int, loss: float) -> None:
        tqdm.write(f"epoch {epoch + 1}/{args.epochs}  train loss {loss:.4f}")

    fit(model, data.train, task=task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        optimizer=args.optimizer, weight_decay=args.weight_decay, scheduler=args.scheduler, lr_step=args.lr_step,
        lr_gamma=args.lr_gamma, dist=dist, workers=args.workers,
        progress=not args.no_progress,
        checkpoint=args.checkpoint, resume=args.resume, config=config, on_epoch_end=report, inputs=data.inputs)
    if not dist.is_main:
        torch_dist.barrier()
        return {}
    test_metrics = evaluate(model, data.test, task, device=dist.device, inputs=data.inputs,
                            num_classes=len(data.class_names))
    results = {"config": config, "backend": args.backend, "test": test_metrics, "skipped_files": len(data.skipped),
               "skipped": [{"file": str(path), "reason": problem} for path, problem in data.skipped]}
    shown = {k: round(v, 4) for k, v in results["test"].items() if isinstance(v, float)}
    print(json.dumps({"model": args.model, "test": shown, "skipped_files": results["skipped_files"]}))
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        if task == "classification":
            metrics.plot_confusion_matrix(results["test"]["confusion_matrix"], data.class_names,
                                          str(args.out_dir / "confusion.png"), title=f"{args.model} (test)")
    if dist.world_size > 1:
        torch_dist.barrier()
    return results


if __name__ == "__main__":
    main()
