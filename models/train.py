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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1):
    NCCL with one GPU per process on CUDA, gloo on CPU. A single process needs no group."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer) state in place; returns the checkpoint's epoch, config
    and RNG state. Only tensors and plain containers are unpickled (weights_only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
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
    p.add_argument("--fusion-weights", type=float, nargs="+", default=None,
                   help="decision_fusion: one weight per modality (audio video [text]), e.g. 0.55 0.38 0.07")
    p.add_argument("--learn-weights", action="store_true",
                   help="decision_fusion: learn the weights (softmax-parametrised), starting from --fusion-weights")
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-test", type=int, default=512)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split across processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--dropout", type=float, default=None, help="override every dropout probability")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the dataset")
    p.add_argument("--backend", choices=("auto", "eager", "torch", "triton", "cpp", "cuda"), default="auto",
                   help="fastfusion backend; eager is the plain-PyTorch reference")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering clips (for --size paper)")
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


def load_data(args: argparse.Namespace) -> Data:
    if args.data == "synthetic":
        # Tiny clips are kept once rendered; paper-size ones (~10 MB each) are rendered per epoch.
        train_set, test_set = train_test_split(args.num_train, args.num_test, seed=args.seed,
                                               config=data_config(args.size), cache=args.size == "tiny")
        return Data(train_set, test_set, CLASS_NAMES, AV_INPUTS, "classification")
    corpus = corpora.build_corpus(args.data, args.root, features=seed_zoo.features_for(args.model),
                                  config=data_config(args.size), seed=args.seed,
                                  cache_dir=None if args.cache_dir == "none" else args.cache_dir)
    return Data(corpus.train, corpus.test, corpus.class_names, corpus.modalities, corpus.task)


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
                                         **fusion)
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
    results = {"config": config, "backend": args.backend, "test": test_metrics}
    shown = {k: round(v, 4) for k, v in results["test"].items() if isinstance(v, float)}
    print(json.dumps({"model": args.model, "test": shown}))
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
