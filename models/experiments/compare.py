"""The comparison report: every fusion head's size, FLOPs, throughput and accuracy, with
fastfusion's fused backend ("auto") against its plain-PyTorch reference ("eager"), which
head is best and whether it is significantly so, and the LMF-vs-TFN speed claim of seed
001 (its Table 4) and of the LMF paper.

    python -m models.compare --quick                     # CPU: a few minutes on 2 cores
    python -m models.compare                             # more seeds and epochs (the published numbers)
    python -m models.compare --difficulty hard           # the data where the heads differ

Writes ``models/results/compare-<device>[-<difficulty>].json`` and ``.md`` and refreshes
the matching block in ``models/README.md`` (no suffix for the default "easy" data).

What is measured, and how:

- Accuracy: each head on the CNN encoders (tiny size), trained from scratch on the
  synthetic dataset at ``--difficulty`` (the same data for every run) with one seed per
  run; test accuracy after the last epoch, mean and standard deviation over the seeds.
  Training runs go to ``--jobs`` worker processes of one thread each.
- Significance: the head with the best mean accuracy (fused backend) against each other
  head, by a paired t-test over seeds (``metrics.paired_test``: seed s of both heads saw
  the same data) and by McNemar's exact test on the two heads' test predictions of each
  seed (``metrics.mcnemar``; the largest p over the seeds is reported, so "p < 0.05" means
  on every seed). "Significant" needs both below 0.05. No correction for the multiple
  comparisons is applied.
- Throughput (samples/s): a whole training step (forward, backward, Adam) and an
  inference forward pass on one fixed batch, timed with ``fastfusion.timing.measure``
  (median of repeated calls after a warm-up), for the whole model and for the head alone
  on its embeddings. Timings run one at a time in the main process at ``--threads``.
- FLOPs: ``fastfusion.flops.count_flops`` for one sample's forward pass (its convention:
  2 per multiply-add; pooling, normalisation and activations count 0; LSTM recurrences
  and attention are not counted by it, see the notes in the report).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import logging
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import fastfusion
from fastfusion.timing import measure

from ..datasets.data import DIFFICULTIES, at_difficulty, train_test_split
from ..nets.heads import ADDITIVE_HEADS, HEAD_NAMES, HEAD_OPS
from ..nets.sequence_fusion import LMFNet, TFNNet
from ..zoo import build_model, data_config
from . import metrics
from .train import Distributed, fit, loss_function, make_optimizer, predict, seed_everything, train_step

# The report lives with the models package (models/results/, models/README.md), not in experiments/.
MODELS_DIR = Path(__file__).resolve().parents[1]
RESULTS = MODELS_DIR / "results"
README = MODELS_DIR / "README.md"
REFERENCE, FUSED = "eager", "auto"
# Version of the report's JSON layout; --render refuses an older one (it lacks fields).
SCHEMA = 2
ALPHA = 0.05  # significance level of the verdicts

# Published LMF-vs-TFN speeds in inferences per second (IPS), training and testing, with the
# setting each was measured at. Seed 001 (its Table 4) first: it is the paper this report
# reproduces, and it fuses audio and video only. The LMF paper's efficiency table second.
PAPER_IPS = {
    "001 (Table 4)": {
        "setting": "audio + video",
        "lmf": {"train": 1153.54, "test": 2232.82}, "tfn": {"train": 321.67, "test": 1138.33},
    },
    "LMF paper": {
        "setting": "CMU-MOSI, audio + video + text",
        "lmf": {"train": 1134.82, "test": 2249.90}, "tfn": {"train": 340.74, "test": 1177.17},
    },
}
# 001's setting: LSTM sub-networks over audio and video, then LMF or TFN. 001 gives no sizes;
# ours (a choice) are the usual CMU-MOSI COVAREP audio (74) and FACET video (35) widths over
# 20 steps, the LMF paper's LSTM hidden sizes for those modalities (32 / 32), rank 4 and
# TFN's post-fusion width 128.
SEQUENCE_SETUP = {"in_dims": (74, 35), "steps": 20, "hidden_dims": (32, 32), "rank": 4, "post_fusion_dim": 128}


@dataclasses.dataclass(frozen=True)
class Settings:
    num_train: int
    num_test: int
    epochs: int
    seeds: tuple[int, ...]
    reference_seeds: tuple[int, ...]
    batch_size: int = 32
    lr: float = 1e-3
    timing_budget_s: float = 1.0
    difficulty: str = "easy"  # a key of models.datasets.data.DIFFICULTIES


QUICK = Settings(num_train=1024, num_test=256, epochs=8, seeds=(0, 1), reference_seeds=(0,), timing_budget_s=0.5)
FULL = Settings(num_train=2048, num_test=512, epochs=10, seeds=(0, 1, 2, 3, 4), reference_seeds=(0, 1, 2, 3, 4))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """One forward pass's FLOPs by fastfusion.flops, or None where fvcore is missing."""
    try:
        from fastfusion.flops import count_flops
    except ImportError:
        return None
    was_training = module.training
    try:
        return count_flops(module.eval(), inputs)
    finally:
        module.train(was_training)


def resolved_backend(op: str | None, requested: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` under ``requested`` ("-" for heads without a
    fastfusion op)."""
    if op is None:
        return "-"
    return fastfusion.selected_backend(op, device, requested)


def throughput(model: nn.Module, inputs, target, task: str, device: torch.device, budget_s: float) -> dict:
    """{backend: {"train": samples/s, "test": samples/s}} for a training step and for
    inference on one fixed batch, under the reference and the fused backend. The two
    backends' calls take turns (fastfusion.timing.measure), so load from outside the
    process falls on both alike and their ratio stays fair."""
    optimizer = make_optimizer("adam", model.parameters(), 1e-3)
    loss_fn = loss_function(task)

    def step() -> None:
        train_step(model, inputs, target, optimizer, loss_fn)

    @torch.no_grad()
    def infer() -> None:
        model(*inputs)

    def under(backend: str, fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            with fastfusion.backend(backend):
                fn()
        return call

    rates: dict = {REFERENCE: {}, FUSED: {}}
    for mode, fn in (("train", step), ("test", infer)):
        model.train(mode == "train")
        calls = {backend: under(backend, fn) for backend in rates}
        for call in calls.values():  # warm-up (allocator, oneDNN primitive caches)
            call()
            call()
        for backend, timing in measure(calls, device, budget_s).items():
            if isinstance(timing, Exception):
                raise timing
            rates[backend][mode] = target.shape[0] / (timing.p50_ms * 1e-3)
    model.train()
    return rates


@functools.lru_cache(maxsize=2)
def _datasets(num_train: int, num_test: int, difficulty: str):
    return train_test_split(num_train, num_test, seed=0, config=at_difficulty(data_config("tiny"), difficulty))


def _accuracy_job(head: str, seed: int, backend: str, settings: Settings, device: str):
    """One training run, in a worker process: ``head`` trained with ``seed``; returns its
    test-set class predictions (an int64 array in test-set order)."""
    if device == "cpu":
        torch.set_num_threads(1)
    fastfusion.set_backend(backend)
    train_set, test_set = _datasets(settings.num_train, settings.num_test, settings.difficulty)
    seed_everything(seed)
    model = build_model(head, size="tiny")
    dist_device = torch.device(device)
    fit(model, train_set, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
        dist=Distributed(device=dist_device))
    predictions, _ = predict(model, DataLoader(test_set, batch_size=64), "classification", dist_device)
    return head, seed, backend, predictions


def labels_of_test_set(settings: Settings) -> np.ndarray:
    """The test set's labels (drawn at construction; no clip is rendered)."""
    return _datasets(settings.num_train, settings.num_test, settings.difficulty)[1].labels.numpy()


def accuracy_runs(settings: Settings, device: torch.device, jobs: int, log: Callable[[str], None]):
    """({head: {backend: {seed: accuracy}}}, {head: {seed: predictions}} of the fused
    backend). Heads without a fastfusion op run the same code under both backends, so they
    are trained once."""
    plan = [(h, s, FUSED) for h in HEAD_NAMES for s in settings.seeds]
    plan += [(h, s, REFERENCE) for h in HEAD_NAMES if h in HEAD_OPS for s in settings.reference_seeds]
    labels = labels_of_test_set(settings)
    results: dict = {h: {FUSED: {}, REFERENCE: {}} for h in HEAD_NAMES}
    predictions: dict = {h: {} for h in HEAD_NAMES}
    # spawn, not fork: a forked child inherits torch's thread pools in an unusable state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_accuracy_job, h, s, b, settings, device.type) for h, s, b in plan]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            head, seed, backend, predicted = future.result()
            acc = metrics.accuracy(labels, predicted)
            results[head][backend][seed] = acc
            if backend == FUSED:
                predictions[head][seed] = predicted
            log(f"[{done}/{len(plan)}] {head} seed {seed} {backend}: accuracy {acc:.3f}")
    return results, predictions


def significance(accuracy: dict, predictions: dict, labels, alpha: float = ALPHA) -> dict:
    """The head with the best mean accuracy against every other head.

    ``accuracy``: {head: {seed: accuracy}}; ``predictions``: {head: {seed: test-set class
    predictions}}; ``labels``: the test set's labels. Per other head, over the seeds both
    ran: the mean accuracy difference best - head, the paired t-test's p-value (None with
    fewer than 2 seeds) and McNemar's exact p-value of each seed. The best head is
    "significantly better" than a head when both tests say so: the t-test's p and every
    seed's McNemar p below ``alpha``. The t-test alone is not enough with few seeds: test
    accuracy moves in steps of 1 / test-set size, so equal differences on every seed are
    common, and they make t infinite and its p 0 whatever their size.
    """
    means = {head: statistics.fmean(by_seed.values()) for head, by_seed in accuracy.items()}
    best = max(means, key=means.get)
    rows = {}
    for head, by_seed in accuracy.items():
        if head == best:
            continue
        seeds = sorted(set(accuracy[best]) & set(by_seed))
        paired = (
            metrics.paired_test([accuracy[best][s] for s in seeds], [by_seed[s] for s in seeds]) if len(seeds) > 1
            else None
        )
        mcnemar = {s: metrics.mcnemar(labels, predictions[best][s], predictions[head][s])["p_value"] for s in seeds}
        rows[head] = {
            "mean_difference": means[best] - means[head],
            "seeds": seeds,
            "t_p_value": paired["p_value"] if paired else None,
            "mcnemar_p_values": {str(s): p for s, p in mcnemar.items()},
            "significant": paired is not None and paired["p_value"] < alpha and max(mcnemar.values()) < alpha,
        }
    return {"best": best, "alpha": alpha, "against": rows}


def _summary(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def head_rows(settings: Settings, accuracy: dict, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    config = data_config("tiny")
    batch = settings.batch_size
    g = torch.Generator().manual_seed(0)
    audio = torch.rand((batch, 1, *config.audio_size), generator=g).to(device)
    video = torch.randn((batch, 3, config.num_frames, config.frame_size, config.frame_size), generator=g).to(device)
    labels = torch.randint(4, (batch,), generator=g).to(device)
    rows = []
    for head in HEAD_NAMES:
        torch.manual_seed(0)
        model = build_model(head, size="tiny").to(device)
        embed_dims = (model.audio_encoder.out_dim, model.video_encoder.out_dim)
        embeddings = tuple(torch.randn((batch, n), generator=g).to(device) for n in embed_dims)
        op = HEAD_OPS.get(head)
        row = {
            "head": head,
            "kind": "additive" if head in ADDITIVE_HEADS else "multiplicative",
            "params": parameter_count(model),
            "head_params": parameter_count(model.head),
            "flops": forward_flops(model, (audio[:1], video[:1])),
            "head_flops": forward_flops(model.head, tuple(e[:1] for e in embeddings)),
            "backends": {},
        }
        speed = throughput(model, (audio, video), labels, "classification", device, settings.timing_budget_s)
        head_speed = throughput(model.head, embeddings, labels, "classification", device, settings.timing_budget_s)
        for requested in (REFERENCE, FUSED):
            seeds = accuracy[head][requested] or accuracy[head][FUSED]
            row["backends"][requested] = {
                "backend": resolved_backend(op, requested, device),
                "model_samples_per_s": speed[requested],
                "head_samples_per_s": head_speed[requested],
                "accuracy": _summary(list(seeds.values())),
                "accuracy_by_seed": {str(s): a for s, a in sorted(seeds.items())},
                "trained_separately": bool(accuracy[head][requested]),
            }
        log(f"timed {head}")
        rows.append(row)
    return rows


def sequence_rows(settings: Settings, device: torch.device, log: Callable[[str], None]) -> dict:
    setup = SEQUENCE_SETUP
    batch = settings.batch_size
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn((batch, setup["steps"], n), generator=g).to(device) for n in setup["in_dims"])
    target = torch.randn((batch,), generator=g).clamp(-3, 3).to(device)
    models = {
        "lmf": LMFNet(setup["in_dims"], setup["hidden_dims"], rank=setup["rank"]),
        "tfn": TFNNet(setup["in_dims"], setup["hidden_dims"], post_fusion_dim=setup["post_fusion_dim"]),
    }
    rows = {}
    for name, model in models.items():
        model.to(device)
        fusion_inputs = tuple(torch.randn((1, n), generator=g).to(device) for n in setup["hidden_dims"])
        row = {
            "params": parameter_count(model),
            "fusion_params": parameter_count(model.fusion),
            "fusion_flops": forward_flops(model.fusion, fusion_inputs),
            "backends": {},
        }
        speed = throughput(model, inputs, target, "regression", device, settings.timing_budget_s)
        op = "low_rank_fusion" if name == "lmf" else "tensor_fusion"
        for requested in (REFERENCE, FUSED):
            row["backends"][requested] = {
                "backend": resolved_backend(op, requested, device), "samples_per_s": speed[requested],
            }
        rows[name] = row
        log(f"timed {name}_lstm")

    def rate(name: str, requested: str, mode: str) -> float:
        return rows[name]["backends"][requested]["samples_per_s"][mode]

    ratios = {
        requested: {mode: rate("lmf", requested, mode) / rate("tfn", requested, mode) for mode in ("train", "test")}
        for requested in (REFERENCE, FUSED)
    }
    return {"setup": {**setup, "batch": batch}, "models": rows, "lmf_over_tfn": ratios, "papers": paper_ratios()}


def paper_ratios() -> dict:
    """{source: {"setting", "lmf", "tfn", "lmf_over_tfn": {mode: LMF IPS / TFN IPS}}}."""
    return {
        source: {**table, "lmf_over_tfn": {mode: table["lmf"][mode] / table["tfn"][mode] for mode in ("train", "test")}}
        for source, table in PAPER_IPS.items()
    }


def environment(device: torch.device, threads: int) -> dict:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=README.parent)
            return done.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "fastfusion": fastfusion.__version__,
        "python": platform.python_version(),
        "available_backends": list(fastfusion.available_backends(device.type)),
        "git_commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _fmt_list(xs) -> str:
    return ", ".join(str(x) for x in xs)


def render_markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    load = env["load_average_1min"]
    load_text = f", 1-min load average {load:.1f} at the start of timing" if load is not None else ""
    lines = [
        f"Device: {env['device_name']} ({env['device']}, {env['threads']} threads{load_text}) "
        f"· torch {env['torch']} · fastfusion {env['fastfusion']} "
        f"· backends available: {', '.join(env['available_backends'])} · commit {env['git_commit']} · {env['date']}"
        f"{' · quick run' if report['quick'] else ''}",
        "",
        f"Synthetic data at difficulty `{settings['difficulty']}`: {settings['num_train']} training and "
        f"{settings['num_test']} test clips (tiny size); {settings['epochs']} epochs, batch {settings['batch_size']}, "
        f"Adam lr {settings['lr']}. "
        f"Reference = backend `{REFERENCE}` (plain PyTorch); fused = backend `{FUSED}`, which ran the backend named "
        f"in the table. Accuracy: mean ± sd over seeds {_fmt_list(settings['seeds'])}.",
        "",
        "| head | kind | params | FLOPs / sample | test accuracy (fused) | test accuracy (reference) | fused backend "
        "| model train samples/s ref → fused | model test samples/s ref → fused | head train samples/s ref → fused "
        "| head test samples/s ref → fused |",
        "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["heads"]:
        ref, fused = row["backends"][REFERENCE], row["backends"][FUSED]

        def pair(key: str, mode: str, ref=ref, fused=fused) -> str:
            a, b = ref[key][mode], fused[key][mode]
            return f"{_fmt_rate(a)} → {_fmt_rate(b)} ({b / a:.2f}x)"

        def acc(entry: dict) -> str:
            s = entry["accuracy"]
            text = f"{s['mean']:.3f} ± {s['sd']:.3f} (n={s['n']})"
            return text if entry["trained_separately"] else "same code as fused"

        lines.append(
            f"| {row['head']} | {row['kind']} | {_fmt_count(row['params'])} (head {_fmt_count(row['head_params'])}) "
            f"| {_fmt_count(row['flops'])} (head {_fmt_count(row['head_flops'])}) | {acc(fused)} | {acc(ref)} "
            f"| {fused['backend']} | {pair('model_samples_per_s', 'train')} | {pair('model_samples_per_s', 'test')} "
            f"| {pair('head_samples_per_s', 'train')} | {pair('head_samples_per_s', 'test')} |"
        )
    verdict = report["bilinear_vs_concat"]
    lines += [
        "",
        f"**Bilinear vs concatenation.** Additive heads (early, late, hybrid): mean test accuracy "
        f"{verdict['additive_mean']:.3f}; multiplicative heads (mfb, cbp, cbgp, lmf, tfn): "
        f"{verdict['multiplicative_mean']:.3f}; the data's ceiling for any additive head is "
        f"{verdict['additive_ceiling']:.3f}. Every multiplicative head beats every additive head on mean accuracy: "
        f"{'yes' if verdict['every_pair'] else 'no'}.",
    ]
    lines += _render_significance(report["significance"])
    seq = report["lmf_vs_tfn"]
    setup = seq["setup"]
    lines += [
        "",
        f"**LMF vs TFN** (LSTM sub-networks, inputs of {_fmt_list(setup['in_dims'])} features over "
        f"{setup['steps']} steps, hidden sizes {_fmt_list(setup['hidden_dims'])}, rank {setup['rank']}, "
        f"TFN post-fusion {setup['post_fusion_dim']}, batch {setup['batch']}):",
        "",
        "| model | params (fusion) | fusion FLOPs / sample | backend | train samples/s | test samples/s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, row in seq["models"].items():
        for requested in (REFERENCE, FUSED):
            b = row["backends"][requested]
            lines.append(
                f"| {name}_lstm | {_fmt_count(row['params'])} ({_fmt_count(row['fusion_params'])}) "
                f"| {_fmt_count(row['fusion_flops'])} | {requested} ({b['backend']}) "
                f"| {_fmt_rate(b['samples_per_s']['train'])} | {_fmt_rate(b['samples_per_s']['test'])} |"
            )
    lines += [
        "",
        "LMF / TFN speed (LMF's samples/s over TFN's), measured here at 001's setting and published:",
        "",
        "| source | setting | LMF train / test IPS | TFN train / test IPS | LMF / TFN train | LMF / TFN test |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for requested in (REFERENCE, FUSED):
        ratio = seq["lmf_over_tfn"][requested]
        speeds = {name: seq["models"][name]["backends"][requested]["samples_per_s"] for name in ("lmf", "tfn")}
        lines.append(
            f"| this run, {requested} | audio + video, batch {setup['batch']} "
            + "".join(f"| {_fmt_rate(speeds[n]['train'])} / {_fmt_rate(speeds[n]['test'])} " for n in ("lmf", "tfn"))
            + f"| {ratio['train']:.2f}x | {ratio['test']:.2f}x |"
        )
    for source, paper in seq["papers"].items():
        lines.append(
            f"| {source} | {paper['setting']} "
            + "".join(f"| {paper[n]['train']:,.2f} / {paper[n]['test']:,.2f} " for n in ("lmf", "tfn"))
            + f"| {paper['lmf_over_tfn']['train']:.2f}x | {paper['lmf_over_tfn']['test']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _render_significance(result: dict) -> list[str]:
    best, alpha = result["best"], result["alpha"]
    lines = [
        "",
        (f"**Best head: {best}** (highest mean test accuracy, fused backend) against each other head: paired t-test "
         f"over seeds and McNemar's exact test on each seed's test predictions (largest p over the seeds); "
         f"significant = both p < {alpha}, no correction for multiple comparisons."),
        "",
        f"| head | {best} − head (mean accuracy) | paired t p | McNemar p (largest) | significant |",
        "|---|---:|---:|---:|---|",
    ]
    for head, row in result["against"].items():
        t_p = "n/a (1 seed)" if row["t_p_value"] is None else f"{row['t_p_value']:.3g}"
        mcnemar = max(row["mcnemar_p_values"].values()) if row["mcnemar_p_values"] else None
        lines.append(
            f"| {head} | {row['mean_difference']:+.3f} | {t_p} | {'n/a' if mcnemar is None else f'{mcnemar:.3g}'} "
            f"| {'yes' if row['significant'] else 'no'} |"
        )
    return lines


def update_readme(markdown: str, key: str, readme: Path = README) -> None:
    """Replace the README's block for ``key`` (the device, with the difficulty when not
    "easy"; between its markers) with ``markdown``."""
    start, end = f"<!-- compare:{key}:start -->", f"<!-- compare:{key}:end -->"
    block = f"{start}\n{markdown}{end}"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    readme.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, epochs and timing (a few minutes on 2 CPU cores)")
    p.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="easy",
                   help="synthetic data setting (models.datasets.data.DIFFICULTIES); 'hard' is where the heads differ")
    p.add_argument("--seeds", type=_positive, default=None, help="train seeds 0 .. N-1 (overrides the preset)")
    p.add_argument("--epochs", type=_positive, default=None, help="training epochs (overrides the preset)")
    p.add_argument("--num-train", type=_positive, default=None, help="training clips (overrides the preset)")
    p.add_argument("--num-test", type=_positive, default=None, help="test clips (overrides the preset)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for the timings (CPU)")
    p.add_argument("--jobs", type=int, default=None, help="parallel training processes (default: CPU cores, 1 on CUDA)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-readme", action="store_true", help="do not refresh models/README.md")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rebuild the .md and the README block from the device's existing JSON")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The --quick or full preset at ``--difficulty``, with the size flags applied. With
    ``--seeds N`` the reference backend keeps those of its preset's seeds below N."""
    settings = dataclasses.replace(QUICK if args.quick else FULL, difficulty=args.difficulty)
    if args.seeds is not None:
        seeds = tuple(range(args.seeds))
        reference = tuple(s for s in settings.reference_seeds if s < args.seeds)
        settings = dataclasses.replace(settings, seeds=seeds, reference_seeds=reference)
    for field in ("epochs", "num_train", "num_test"):
        if getattr(args, field) is not None:
            settings = dataclasses.replace(settings, **{field: getattr(args, field)})
    return settings


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = device.type if args.difficulty == "easy" else f"{device.type}-{args.difficulty}"
    stem = args.out_dir / f"compare-{key}"
    if args.render:
        report = json.loads(stem.with_suffix(".json").read_text())
        if report.get("schema") != SCHEMA:
            raise SystemExit(f"{stem.with_suffix('.json')} was written by an older models.compare (layout "
                             f"{report.get('schema', 1)}, this one reads {SCHEMA}): rerun it without --render")
        return _publish(report, stem, key, readme=not args.no_readme)
    settings = settings_from_args(args)
    jobs = args.jobs or (1 if device.type == "cuda" else os.cpu_count() or 1)
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # its per-op "unsupported operator" notes

    def log(message: str) -> None:
        print(message, flush=True)

    accuracy, predictions = accuracy_runs(settings, device, jobs, log)
    torch.set_num_threads(args.threads)
    env = environment(device, args.threads)
    heads = head_rows(settings, accuracy, device, log)
    additive = [r["backends"][FUSED]["accuracy"]["mean"] for r in heads if r["kind"] == "additive"]
    multiplicative = [r["backends"][FUSED]["accuracy"]["mean"] for r in heads if r["kind"] == "multiplicative"]
    report = {
        "schema": SCHEMA,
        "quick": args.quick,
        "environment": env,
        "settings": dataclasses.asdict(settings),
        "heads": heads,
        "bilinear_vs_concat": {
            "additive_mean": statistics.fmean(additive),
            "multiplicative_mean": statistics.fmean(multiplicative),
            "additive_ceiling": at_difficulty(data_config("tiny"), settings.difficulty).additive_ceiling,
            "every_pair": min(multiplicative) > max(additive),
        },
        "significance": significance(
            {head: accuracy[head][FUSED] for head in HEAD_NAMES}, predictions, labels_of_test_set(settings)
        ),
        "lmf_vs_tfn": sequence_rows(settings, device, log),
        "notes": [
            "FLOPs: fastfusion.flops counts neither aten::lstm nor attention; the LSTM models' FLOPs are "
            "therefore given for the fusion operator only.",
            "Heads without a fastfusion op (early, late, hybrid) run identical code under both backends.",
        ],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return _publish(report, stem, key, readme=not args.no_readme)


def _publish(report: dict, stem: Path, key: str, *, readme: bool) -> dict:
    markdown = render_markdown(report)
    stem.with_suffix(".md").write_text(markdown)
    if readme:
        update_readme(markdown, key)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
