"""A condensed markdown table of one results file, for the READMEs.

    python -m benchmarks.summary benchmarks/results/<stamp>-cpu.json

One line per kernel and mode: the median time of every provider, the fastest fastfusion
backend's speedup over eager and over torch.compile, and the extra memory (peak minus the
returned tensors) of eager vs that backend. Everything comes from the JSON; nothing is measured here.
"""

from __future__ import annotations

import argparse
import json

from .ops import MODES

_BASELINES = ("eager", "compile", "fastfusion")


def summary_table(results: dict) -> str:
    header = results["header"]
    rows = [r for r in results["rows"] if r["error"] is None]
    backends = [p for p in header["providers"] if p not in _BASELINES]
    lines = [
        f"{header['device']}, torch {header['torch']}, commit `{header['git_commit'][:10]}`, {header['date'][:10]}; "
        f"medians in ms, speedups from the same run; extra memory (peak minus the returned tensors) in MiB.",
        "",
        "| kernel | mode | eager | compile | " + " | ".join(backends) + " | best backend vs eager | vs compile | extra MiB eager → best |",
        "|---|---|" + "--:|" * (2 + len(backends)) + "--:|--:|---|",
    ]
    several_dtypes = len(header["dtypes"]) > 1
    for kernel, dtype in dict.fromkeys((r["kernel"], r["dtype"]) for r in rows):
        label = f"{kernel} {dtype}" if several_dtypes else kernel
        for mode in MODES:
            by_provider = {
                r["provider"]: r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype and r["mode"] == mode
            }
            if "eager" not in by_provider:
                continue
            times = " | ".join(f"{by_provider[p]['p50_ms']:.3g}" if p in by_provider else "–" for p in ("eager", "compile", *backends))
            ran = [by_provider[b] for b in backends if b in by_provider]
            if not ran:  # every backend failed on this case: their errors are in the JSON
                lines.append(f"| {label} | {mode} | {times} | – | – | – |")
                continue
            best = min(ran, key=lambda r: r["p50_ms"])
            memory = f"{by_provider['eager']['extra_mem_bytes'] / 2**20:.3g} → {best['extra_mem_bytes'] / 2**20:.3g}"
            lines.append(
                f"| {label} | {mode} | {times} | {_speedup(best['speedup_vs_eager'])} ({best['provider']}) | "
                f"{_speedup(best['speedup_vs_compile'])} | {memory} |"
            )
    return "\n".join(lines)


def _speedup(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"  # None: that baseline failed, or was not run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by python -m benchmarks.run")
    with open(parser.parse_args(argv).results) as f:
        print(summary_table(json.load(f)))


if __name__ == "__main__":
    main()
