"""DET and ROC curves as PNG files. matplotlib is not a device requirement: it is imported only
when a plot is asked for (it comes with requirements-train.txt)."""
from __future__ import annotations

import io
from pathlib import Path
from statistics import NormalDist

import numpy as np

from edge.atomic import atomic_write_bytes

# Probit axes cannot show 0: rates are clipped to this floor (well below one error in LFW's 6,000 pairs).
_FLOOR = 1e-5
_DET_TICKS = (1e-4, 1e-3, 1e-2, 0.02, 0.05, 0.1, 0.2, 0.5)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib, which is not a device requirement: "
                           "pip install -r requirements-train.txt (or matplotlib alone)") from None
    matplotlib.use("Agg")  # no display on a gate or a CI runner
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _probit(p) -> np.ndarray:
    """Normal deviate of each rate: the DET axis on which Gaussian score distributions are lines."""
    inv = NormalDist().inv_cdf
    return np.array([inv(v) for v in np.clip(np.asarray(p, dtype=np.float64).ravel(), _FLOOR, 1 - _FLOOR)])


def det_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "DET",
             xlabel: str = "false match rate", ylabel: str = "false non-match rate",
             marks: dict[str, float] | None = None) -> Path:
    """DET curves on probit axes. `curves` maps a label to (x rate, y rate) arrays, e.g. (far, frr)
    from `evaluation.metrics.det_points` or (curve_fpir, curve_fnir) from `open_set_1n`; `marks` draws
    vertical lines at named x rates (e.g. {"FPIR 0.003": 0.003})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for label, (x, y) in curves.items():
        ax.plot(_probit(x), _probit(y), label=label)
    for label, x in (marks or {}).items():
        ax.axvline(_probit([x])[0], color="grey", linestyle=":", linewidth=1)
        ax.text(_probit([x])[0], _probit([0.4])[0], label + " ", rotation=90, color="grey", fontsize=8, ha="right", va="top")
    ticks = _probit(_DET_TICKS)
    labels = [f"{t:g}" for t in _DET_TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlim(*_probit([1e-4, 0.5]))
    # The y axis starts just below the lowest error any curve reaches, so the curves fill the plot.
    low = min((float(np.min(y[y > 0])) for _, y in curves.values() if np.any(np.asarray(y) > 0)), default=1e-4)
    ax.set_ylim(*_probit([max(1e-4, low / 2), 0.5]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, linewidth=0.3)
    # Below the axes: with a dozen curves a legend inside hides them.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8)
    return _save(fig, plt, path)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves, FAR on a log axis. `curves` maps a label to (far, tar) from `evaluation.metrics.roc`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, (far, tar) in curves.items():
        ax.plot(np.clip(far, _FLOOR, 1), tar, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="lower right")
    return _save(fig, plt, path)


def calibration_plot(summaries: dict[str, list[dict]], path: str | Path, title: str = "calibration") -> Path:
    """Measured FPIR (mean over draws, 95% interval) against the target, log-log, one panel per
    calibration method and a line per gallery size K; the band is [0.5x, 1x] of the target."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 5), sharey=True, squeeze=False)
    for ax, (method, rows) in zip(axes[0], summaries.items()):
        targets = sorted({r["target_fpir"] for r in rows})
        t = np.array(targets)
        ax.fill_between(t, 0.5 * t, t, color="green", alpha=0.12, label="[0.5x, 1x] target")
        ax.plot(t, 1.5 * t, color="grey", linestyle=":", linewidth=1, label="1.5x target")
        for i, k in enumerate(sorted({r["K"] for r in rows})):
            rs = sorted((r for r in rows if r["K"] == k), key=lambda r: r["target_fpir"])
            x = np.array([r["target_fpir"] for r in rs]) * (1 + 0.04 * (i - 1.5))  # side by side, not on top
            y = np.array([max(r["measured_fpir"], 1e-5) for r in rs])
            err = np.array([[y_ - max(r["ci95"][0], 1e-5) for y_, r in zip(y, rs)], [r["ci95"][1] - y_ for y_, r in zip(y, rs)]])
            ax.errorbar(x, y, yerr=np.maximum(err, 0), marker="o", capsize=3, label=f"K = {k:,}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("target FPIR")
        ax.set_title(f"match.calibration: {method}", fontsize=9)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("measured FPIR (mean over draws, 95% interval)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)
