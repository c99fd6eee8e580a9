"""Train and evaluate a model on the synthetic audio-video emotion data or a real corpus.

    python -m models.train --model cbgp --data synthetic --epochs 15 --out-dir runs/cbgp
    python -m models.train --model lmf_lstm --task regression --backend eager
    python -m models.train --model cbgp --data ravdess --root ~/data/RAVDESS     # also cremad
    python -m models.train --model mfa_cnn1d --data cremad --root ~/data/CREMA-D
    python -m models.train --model lmf_lstm --data mosei --root ~/data/MOSEI     # sentiment regression
    torchrun --nproc_per_node 2 -m models.train --model cbgp      # data-parallel, gloo on CPU

``--batch-size`` is the global batch: with N processes each takes batch_size / N samples
of it, and DistributedDataParallel averages the gradients, so a step is the same step
whatever N is (exactly so for models without dropout or batch norm, whose statistics are
per process). Evaluation runs on rank 0 over the whole test set. Checkpoints hold plain
state dicts and are read back with ``torch.load(weights_only=True)``.

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

from . import corpora, metrics, seed_zoo
from .data import CLASS_NAMES, train_test_split
from .mosei import MODALITIES as MOSEI_MODALITIES
from .zoo import MODEL_NAMES, SIZES, build_model, data_config

TASKS = ("classification", "regression")
OPTIMIZERS = ("adam", "sgd")
DATA = ("synthetic",) + corpora.CORPUS_NAMES
ALL_MODEL_NAMES = MODEL_NAMES + tuple(n for n in seed_zoo.SEED_MODEL_NAMES if n not in MODEL_NAMES)
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
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, config: dict
) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": config,
        "torch_rng": torch.get_rng_state(),
    }
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

    The data order depends only on ``seed`` and the epoch. After the last epoch the batch
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
    start = 0
    if resume is not None:
        state = load_checkpoint(resume, model, opt)
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
        if epoch == epochs - 1:
            recalibrate_batchnorm(model, loader, task, dist.device, inputs)
        if dist.is_main:
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, opt, epoch, config or {})
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
RESUME_MUST_MATCH = ("model", "size", "data", "task", "fusion_weights", "learn_weights", "optimizer", "lr",
                     "weight_decay")


def _resume_mismatches(stored: dict, args: argparse.Namespace) -> list[str]:
    """Each argument of RESUME_MUST_MATCH that differs from the checkpoint's config, with
    both values. Checkpoints without a config (``fit(config=None)``) have nothing to compare."""

    def shown(value) -> str:
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)

    # The task as it will run: --task, else the data's own (load_data's Data.task).
    wanted = {**vars(args), "task": args.task or ("regression" if args.data == "mosei" else "classification")}
    return [f"--{key.replace('_', '-')} {shown(wanted[key])} (the checkpoint has {shown(stored[key])})"
            for key in RESUME_MUST_MATCH if key in stored and stored[key] != wanted[key]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=ALL_MODEL_NAMES, default="cbgp",
                   help="fusion head on the CNN encoders, or a whole model; with --data mosei: "
                        + ", ".join(seed_zoo.MOSEI_MODEL_NAMES))
    p.add_argument("--data", choices=DATA, default="synthetic", help="the synthetic set or a corpus under --root")
    p.add_argument("--root", type=Path, default=None, help="the corpus directory (models/DATASETS.md has the layouts)")
    p.add_argument("--cache-dir", default="auto", help="feature cache of the media corpora: auto, a path, or none")
    p.add_argument("--size", choices=SIZES, default="tiny", help="model and data sizes: tiny (CPU) or the papers'")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="default: the data's own (mosei: regression, else classification); "
                        "regression: lmf_lstm / tfn_lstm (and decision_fusion on mosei)")
    p.add_argument("--fusion-weights", type=non_negative_float, nargs="+", default=None,
                   help="decision_fusion: one weight per modality (audio video [text]), e.g. 0.55 0.38 0.07")
    p.add_argument("--learn-weights", action="store_true",
                   help="decision_fusion: learn the weights (softmax-parametrised), starting from --fusion-weights")
    p.add_argument("--num-train", type=positive_int, default=2048)
    p.add_argument("--num-test", type=positive_int, default=512)
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch, split across processes")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
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
    args = p.parse_args(argv)
    # Mistakes caught here rather than minutes later, after a corpus scan or feature extraction.
    if args.data != "synthetic" and args.root is None:
        p.error(f"--data {args.data} needs --root, the corpus directory")
    if seed_zoo.features_for(args.model) == "handcrafted" and args.data not in corpora.CORPORA:
        p.error(f"--model {args.model} reads hand-crafted features of raw media: "
                f"--data {' or '.join(corpora.CORPORA)}")
    if args.data == "mosei" and args.model not in seed_zoo.MOSEI_MODEL_NAMES:
        p.error(f"--data mosei takes --model {' / '.join(seed_zoo.MOSEI_MODEL_NAMES)}, got {args.model}")
    if args.task == "regression" and args.data in corpora.CORPORA:
        p.error(f"--data {args.data} has emotion classes only, no sentiment to regress")
    if args.task == "regression" and args.data == "synthetic" and args.model not in MODEL_NAMES:
        p.error(f"--model {args.model} is a classifier on --data synthetic")
    if (args.fusion_weights is not None or args.learn_weights) and args.model != "decision_fusion":
        p.error(f"--fusion-weights and --learn-weights set decision_fusion's weights; --model {args.model} has none")
    if args.fusion_weights is not None:
        modalities = MOSEI_MODALITIES if args.data == "mosei" else AV_INPUTS
        if len(args.fusion_weights) != len(modalities):
            p.error(f"--fusion-weights takes one weight per modality ({' '.join(modalities)}): "
                    f"{len(modalities)} values, got {len(args.fusion_weights)}")
        if not any(args.fusion_weights):
            p.error("--fusion-weights are all 0; at least one must be positive")
        if args.learn_weights and 0 in args.fusion_weights:
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


def load_data(args: argparse.Namespace) -> Data:
    if args.data == "synthetic":
        # Tiny clips are kept once rendered; paper-size ones (~10 MB each) are rendered per epoch.
        train_set, test_set = train_test_split(args.num_train, args.num_test, seed=args.seed,
                                               config=data_config(args.size), cache=args.size == "tiny")
        return Data(train_set, test_set, CLASS_NAMES, AV_INPUTS, "classification")
    corpus = corpora.build_corpus(args.data, args.root, features=seed_zoo.features_for(args.model),
                                  config=data_config(args.size), seed=args.seed,
                                  cache_dir=None if args.cache_dir == "none" else args.cache_dir)
    return Data(corpus.train, corpus.test, corpus.class_names, corpus.modalities, corpus.task, corpus.skipped)


def make_model(args: argparse.Namespace, data: Data, task: str) -> nn.Module:
    num_classes = len(data.class_names)
    fusion = {"weights": args.fusion_weights, "learn_weights": args.learn_weights}
    if args.data == "mosei":
        # MOSEI's feature widths differ between the toolkits' files: read them from the data.
        dims = tuple(data.train.dims[m] for m in data.inputs)
        return seed_zoo.build_mosei_model(args.model, dims, size=args.size, task=task, num_classes=num_classes,
                                          dropout=args.dropout, **fusion)
    if args.model in seed_zoo.SEED_MODEL_NAMES:
        return seed_zoo.build_seed_model(args.model, size=args.size, num_classes=num_classes, dropout=args.dropout,
                                         class_names=data.class_names, **fusion)
    return build_model(args.model, size=args.size, num_classes=num_classes, task=task, dropout=args.dropout)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist = init_distributed(args.device)
    try:
        return _run(args, dist)
    finally:
        if dist.world_size > 1:
            torch_dist.destroy_process_group()


def _run(args: argparse.Namespace, dist: Distributed) -> dict:
    fastfusion.set_backend(args.backend)
    seed_everything(args.seed)
    data = load_data(args)
    task = args.task or data.task
    model = make_model(args, data, task)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["task"] = task  # what ran, not None for "the data's own"

    def report(epoch: int, loss: float) -> None:
        tqdm.write(f"epoch {epoch + 1}/{args.epochs}  train loss {loss:.4f}")

    fit(model, data.train, task=task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        optimizer=args.optimizer, weight_decay=args.weight_decay, dist=dist, workers=args.workers,
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
