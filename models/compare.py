"""The comparison report: every fusion head's size, FLOPs, throughput and accuracy, with
fastfusion's fused backend ("auto") against its plain-PyTorch reference ("eager"), and the
LMF-vs-TFN speed claim of the LMF paper.

    python -m models.compare --quick      # CPU: a few minutes on 2 cores
    python -m models.compare              # more seeds and epochs (the published numbers)

Writes ``models/results/compare-<device>.json`` and ``.md`` and refreshes the table in
``models/README.md``.

What is measured, and how:

- Accuracy: each head on the CNN encoders (tiny size), trained from scratch on the
  synthetic dataset (the same data for every run) with one seed per run; test accuracy
  after the last epoch, mean and standard deviation over the seeds. Training runs go to
  ``--jobs`` worker processes of one thread each.
- Throughput (samples/s): a whole training step (forward, backward, Adam) and an
  inference forward pass on one fixed batch, timed with ``benchmarks.timing.measure``
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

import torch
from torch import nn

import fastfusion

from .data import train_test_split
from .heads import ADDITIVE_HEADS, HEAD_NAMES, HEAD_OPS
from .sequence_fusion import LMFNet, TFNNet
from .train import Distributed, evaluate, fit, loss_function, make_optimizer, seed_everything, train_step
from .zoo import build_model, data_config

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
REFERENCE, FUSED = "eager", "auto"

# The LMF paper's efficiency table (CMU-MOSI, inferences per second).
PAPER_IPS = {"lmf": {"train": 1134.82, "test": 2249.90}, "tfn": {"train": 340.74, "test": 1177.17}}
# Sizes comparable to the LMF paper's CMU-MOSI runs (our choice, not its exact set-up): the
# usual COVAREP audio (74), FACET video (35) and GloVe text (300) widths over 20 steps;
# LSTM hidden sizes 32 / 32 / 128; rank 4; TFN's post-fusion width 128. The official code
# encodes audio and video with MLPs on averaged features; here every modality has an LSTM.
SEQUENCE_SETUP = {
    "in_dims": (74, 35, 300), "steps": 20, "hidden_dims": (32, 32, 128), "rank": 4, "post_fusion_dim": 128,
}


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
    backends' calls take turns (benchmarks.timing.measure), so load from outside the
    process falls on both alike and their ratio stays fair."""
    from benchmarks.timing import measure

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
def _datasets(num_train: int, num_test: int):
    return train_test_split(num_train, num_test, seed=0, config=data_config("tiny"))


def _accuracy_job(head: str, seed: int, backend: str, settings: Settings, device: str) -> tuple[str, int, str, float]:
    """One training run, in a worker process: test accuracy of ``head`` trained with ``seed``."""
    if device == "cpu":
        torch.set_num_threads(1)
    fastfusion.set_backend(backend)
    train_set, test_set = _datasets(settings.num_train, settings.num_test)
    seed_everything(seed)
    model = build_model(head, size="tiny")
    dist_device = torch.device(device)
    fit(model, train_set, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
        dist=Distributed(device=dist_device))
    return head, seed, backend, evaluate(model, test_set, "classification", device=dist_device)["accuracy"]


def accuracy_runs(settings: Settings, device: torch.device, jobs: int, log: Callable[[str], None]) -> dict:
    """{head: {backend: {seed: accuracy}}}. Heads without a fastfusion op run the same code
    under both backends, so they are trained once."""
    plan = [(h, s, FUSED) for h in HEAD_NAMES for s in settings.seeds]
    plan += [(h, s, REFERENCE) for h in HEAD_NAMES if h in HEAD_OPS for s in settings.reference_seeds]
    results: dict = {h: {FUSED: {}, REFERENCE: {}} for h in HEAD_NAMES}
    # spawn, not fork: a forked child inherits torch's thread pools in an unusable state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_accuracy_job, h, s, b, settings, device.type) for h, s, b in plan]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            head, seed, backend, acc = future.result()
            results[head][backend][seed] = acc
            log(f"[{done}/{len(plan)}] {head} seed {seed} {backend}: accuracy {acc:.3f}")
    return results


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
    paper = {mode: PAPER_IPS["lmf"][mode] / PAPER_IPS["tfn"][mode] for mode in ("train", "test")}
    return {"setup": {**setup, "batch": batch}, "models": rows, "lmf_over_tfn": ratios, "paper_lmf_over_tfn": paper}


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
        f"Synthetic data: {settings['num_train']} training and {settings['num_test']} test clips "
        f"(tiny size); {settings['epochs']} epochs, batch {settings['batch_size']}, Adam lr {settings['lr']}. "
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

        def pair(key: str, mode: str) -> str:
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
    ratio, paper = seq["lmf_over_tfn"], seq["paper_lmf_over_tfn"]
    lines += [
        "",
        f"LMF / TFN speed: train {ratio[REFERENCE]['train']:.2f}x (reference), {ratio[FUSED]['train']:.2f}x (fused); "
        f"test {ratio[REFERENCE]['test']:.2f}x (reference), {ratio[FUSED]['test']:.2f}x (fused). "
        f"The LMF paper: train {paper['train']:.2f}x (1134.8 vs 340.7 IPS), "
        f"test {paper['test']:.2f}x (2249.9 vs 1177.2 IPS).",
    ]
    return "\n".join(lines) + "\n"


def update_readme(markdown: str, device: str, readme: Path = README) -> None:
    """Replace the README's block for ``device`` (between its markers) with ``markdown``."""
    start, end = f"<!-- compare:{device}:start -->", f"<!-- compare:{device}:end -->"
    block = f"{start}\n{markdown}{end}"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    readme.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds, epochs and timing (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for the timings (CPU)")
    p.add_argument("--jobs", type=int, default=None, help="parallel training processes (default: CPU cores, 1 on CUDA)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-readme", action="store_true", help="do not refresh models/README.md")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rebuild the .md and the README block from the device's existing JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = args.out_dir / f"compare-{device.type}"
    if args.render:
        return _publish(json.loads(stem.with_suffix(".json").read_text()), stem, device, readme=not args.no_readme)
    settings = QUICK if args.quick else FULL
    jobs = args.jobs or (1 if device.type == "cuda" else os.cpu_count() or 1)
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # its per-op "unsupported operator" notes

    def log(message: str) -> None:
        print(message, flush=True)

    accuracy = accuracy_runs(settings, device, jobs, log)
    torch.set_num_threads(args.threads)
    env = environment(device, args.threads)
    heads = head_rows(settings, accuracy, device, log)
    additive = [r["backends"][FUSED]["accuracy"]["mean"] for r in heads if r["kind"] == "additive"]
    multiplicative = [r["backends"][FUSED]["accuracy"]["mean"] for r in heads if r["kind"] == "multiplicative"]
    report = {
        "quick": args.quick,
        "environment": env,
        "settings": dataclasses.asdict(settings),
        "heads": heads,
        "bilinear_vs_concat": {
            "additive_mean": statistics.fmean(additive),
            "multiplicative_mean": statistics.fmean(multiplicative),
            "additive_ceiling": data_config("tiny").additive_ceiling,
            "every_pair": min(multiplicative) > max(additive),
        },
        "lmf_vs_tfn": sequence_rows(settings, device, log),
        "notes": [
            "FLOPs: fastfusion.flops counts neither aten::lstm nor attention; the LSTM models' FLOPs are "
            "therefore given for the fusion operator only.",
            "Heads without a fastfusion op (early, late, hybrid) run identical code under both backends.",
        ],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return _publish(report, stem, device, readme=not args.no_readme)


def _publish(report: dict, stem: Path, device: torch.device, *, readme: bool) -> dict:
    markdown = render_markdown(report)
    stem.with_suffix(".md").write_text(markdown)
    if readme:
        update_readme(markdown, device.type)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
