"""The plot of the report: per scenario, increments acknowledged per second and persistence lag,
second by second through the load (from the sampler in bench/harness/metrics.py)."""

from __future__ import annotations

from pathlib import Path

from bench.harness.load import items_per_request
from bench.harness.measure import RunResult
from bench.report.compare import NGINX


def plot(results: list[RunResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in results))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        rate_ax, lag_ax = axes[row]
        for r in results:
            if r.scenario != scenario or r.load is None:
                continue
            if r.target.name == NGINX:
                rate_ax.axhline(
                    r.rps * items_per_request(scenario),
                    linestyle="--",
                    color="grey",
                    label="nginx (mean)",
                )
                continue
            t = r.timeline
            if t.seconds:
                (line,) = rate_ax.plot(t.seconds, t.rate, marker=".", label=r.target.name)
                if r.target.kind == "incrementer" and not r.target.lagging:
                    mean = [float("nan") if v is None else v for v in t.lag_mean]
                    lag_ax.plot(
                        t.seconds,
                        mean,
                        marker=".",
                        color=line.get_color(),
                        label=f"{r.target.name}: mean lag of the batches committed that second",
                    )
                    lag_ax.plot(
                        t.seconds,
                        t.lag,
                        linestyle=":",
                        color=line.get_color(),
                        label=f"{r.target.name}: oldest pending at the sample",
                    )
        rate_ax.set_title(f"{scenario}: increments acknowledged per second")
        rate_ax.set_xlabel("seconds into the load")
        rate_ax.set_ylim(bottom=0)
        rate_ax.legend(fontsize="x-small")
        lag_ax.set_title(f"{scenario}: persistence lag (s)")
        lag_ax.set_xlabel("seconds into the load")
        lag_ax.set_ylim(bottom=0)
        if lag_ax.get_legend_handles_labels()[0]:
            lag_ax.legend(fontsize="x-small")
        for ax in (rate_ax, lag_ax):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
