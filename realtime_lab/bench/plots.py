"""One PNG per measure against the number of clients, one line per transport.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state),
so plotting works headless and from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from realtime_lab.bench.stats import MEASURES

#: Measures whose spread over clients is large enough to read best on a log axis.
_LOG_Y = {
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "ttft_ms",
    "ttft_p99_ms",
    "gap_p99_ms",
    "cpu_s_per_1k",
    "cpu_us_per_token",
    "events_per_s",
}
_STYLE = {
    "sse": ("tab:blue", "o"),
    "ws": ("tab:orange", "s"),
    "longpoll": ("tab:green", "^"),
    "poll": ("tab:red", "v"),
    "fetch": ("tab:purple", "D"),
    "openai": ("tab:brown", "P"),
    "naive": ("tab:gray", "x"),
}


#: Measures a workload does not plot: the other's way of saying the same (CPU per token), or
#: what it does not measure (chats; RSS per connection, which churns with chats).
SKIP: Final = {
    "ticker": frozenset({"cpu_us_per_token", "chats_per_s"}),
    "chats": frozenset({"cpu_s_per_1k", "rss_kb_per_conn"}),
}


def plot_measures(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``<measure>.png`` (``<measure>_rate<R>.png`` when several rates were swept), for
    each measure of the workload (see :data:`SKIP`).

    Returns:
        The written files by measure key.
    """
    points = results["points"]
    rates = sorted({p["rate"] for p in points})
    workload = results["config"]["workload"]
    skip = SKIP.get(workload, frozenset())
    written: dict[str, Path] = {}
    for rate in rates:
        at_rate = [p for p in points if p["rate"] == rate]
        labels = list(dict.fromkeys(p["label"] for p in at_rate))
        for key, title, unit in MEASURES:
            if key in skip:
                continue
            figure = Figure(figsize=(7, 4.5), dpi=100)
            FigureCanvasAgg(figure)
            ax = figure.add_subplot()
            drawn = False
            positive = True
            for label in labels:
                series = sorted((p for p in at_rate if p["label"] == label), key=_clients)
                xs, ys, low, high = [], [], [], []
                for p in series:
                    spread = p["summary"][key]
                    if spread["median"] is None:
                        continue
                    xs.append(p["clients"])
                    ys.append(spread["median"])
                    low.append(spread["median"] - spread["min"])
                    high.append(spread["max"] - spread["median"])
                if not xs:
                    continue
                positive = positive and min(ys) > 0
                color, marker = _STYLE.get(series[0]["transport"], (None, "o"))
                ax.errorbar(
                    xs, ys, yerr=[low, high], label=label, color=color, marker=marker, capsize=3
                )
                drawn = True
            ax.set_xscale("log")
            ticks = sorted({int(p["clients"]) for p in at_rate})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            if key in _LOG_Y and drawn and positive:
                ax.set_yscale("log")
            ax.set_xlabel("users" if workload == "chats" else "clients")
            ax.set_ylabel(unit)
            ax.set_title(f"{title} ({workload}, {rate:g} tokens/s)")
            ax.grid(True, which="both", alpha=0.3)
            if drawn:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            figure.tight_layout()
            name = key if len(rates) == 1 else f"{key}_rate{rate:g}"
            path = out / f"{name}.png"
            figure.savefig(path)
            written[name] = path
    return written


def _clients(point: dict[str, Any]) -> int:
    return int(point["clients"])
