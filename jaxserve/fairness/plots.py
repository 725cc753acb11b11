"""Figures for fairness runs (matplotlib, Agg backend; matplotlib is imported only here).

* `plot_run(result, path)`: one figure per run — service rate per client over time (top) and
  first-token latency per client over time (bottom).
* `plot_compare(results, path)`: schedulers side by side (one column each, same rows), with
  shared y-axes so the columns compare directly.
"""
from __future__ import annotations

from pathlib import Path

from jaxserve.fairness import metrics as M
from jaxserve.fairness.sim import SimResult


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _draw(ax_rate, ax_lat, result: SimResult, window: float, w_p: float, w_q: float, weights,
          legend: bool = True, end: float | None = None):
    x, rates = M.service_rate(result, window, w_p, w_q, weights, end=end)
    xl, lats = M.response_time_over_time(result, window, end=end)
    many = len(rates) > 10
    for c in sorted(rates):
        ax_rate.plot(x, rates[c], label=None if many else c, lw=1)
        ax_lat.plot(xl, lats[c], lw=1)
    ax_rate.set_title(result.scheduler)
    ax_rate.set_ylabel("service rate (service/s)")
    ax_lat.set_ylabel("first-token latency (s)")
    ax_lat.set_xlabel("time (s)")
    for ax in (ax_rate, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    if legend and not many:
        ax_rate.legend(fontsize=7, loc="upper right")


def plot_run(result: SimResult, path, window: float = 10.0, w_p: float = 1.0, w_q: float = 2.0,
             weights=None) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    _draw(a, b, result, window, w_p, w_q, weights)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(results: list[SimResult], path, window: float = 10.0, w_p: float = 1.0,
                 w_q: float = 2.0, weights=None, title: str | None = None) -> Path:
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6), sharex=True, sharey="row", squeeze=False)
    end = max(r.end_time for r in results)
    for j, r in enumerate(results):
        _draw(axes[0, j], axes[1, j], r, window, w_p, w_q, weights, legend=(j == 0), end=end)
        if j:
            axes[0, j].set_ylabel("")
            axes[1, j].set_ylabel("")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
