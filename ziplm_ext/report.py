"""Markdown + PNG report of a pruned model family.

:func:`write_report` works from any duck-typed "family" object with the
attributes of :class:`ziplm_ext.pipeline.PrunedFamily` (``results``, ``env``,
``latency_table``, ``dense_calibration_loss``, ``dense_num_parameters``,
``dense_metrics``, ``baselines``, ``stage_seconds``, ``model_name``); nothing
from :mod:`ziplm_ext.pipeline` is imported.  Missing optional attributes are
reported as "n/a".

Files written (each atomically: temp file in the same directory, then
``os.replace``):

* ``report.md`` -- model, environment, dense time, stage timing, one table row
  per target and per baseline, and the best method per target;
* ``quality_vs_speedup.png`` -- quality against measured speedup (matplotlib,
  Agg canvas; no pyplot global state).

Quality shown in the plot and used for "best method": perplexity (lower is
better) if any row has it, else embedding cosine (higher is better), else the
calibration loss (lower is better).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable

from ziplm_ext.io.fileio import atomic_write_bytes

REPORT_MD = "report.md"
REPORT_PNG = "quality_vs_speedup.png"

#: metric key -> (label, higher_is_better)
_KNOWN_METRICS = {
    "perplexity": ("perplexity", False),
    "embedding_cosine": ("embedding cosine", True),
    "calibration_loss": ("calibration loss", False),
}
_QUALITY_ORDER = ("perplexity", "embedding_cosine")
_STAGES = ("calibration", "database", "latency", "search", "export", "evaluation")
_NA = "n/a"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _get(obj: Any, name: str, default=None):
    """Attribute or mapping key ``name`` of ``obj`` (baselines are dicts, results objects)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x, spec: str = ".4g") -> str:
    v = _num(x)
    return _NA if v is None else format(v, spec)


def _fmt_speedup(x) -> str:
    v = _num(x)
    return _NA if v is None else f"{v:.2f}x"


def _fmt_params(x) -> str:
    v = _num(x)
    return _NA if v is None else f"{int(v):,}"


def _fmt_seconds(s) -> str:
    v = _num(s)
    if v is None:
        return _NA
    if v >= 120:
        return f"{v:.0f} s ({v / 60:.1f} min)"
    return f"{v:.2f} s"


def _fmt_time(seconds) -> str:
    v = _num(seconds)
    if v is None:
        return _NA
    if v < 1e-3:
        return f"{v * 1e6:.1f} us"
    if v < 1:
        return f"{v * 1e3:.3f} ms"
    return f"{v:.3f} s"


def _metrics(row) -> dict:
    m = _get(row, "metrics") or {}
    return dict(m) if isinstance(m, dict) else {}


def _target_key(t) -> float | None:
    v = _num(t)
    return None if v is None else round(v, 6)


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------
def main_method(family) -> str:
    """Label of the family's own results (``family.method``; "ZipLM" when absent)."""
    return str(_get(family, "method", None) or "ZipLM")


def _rows(family) -> list[dict]:
    """One dict per (method, target): method, target, predicted, measured, loss, params, metrics
    (``main`` is True for the family's own results, False for baselines)."""
    rows = []
    for r in list(_get(family, "results") or []):
        rows.append({
            "method": main_method(family),
            "main": True,
            "target": _num(_get(r, "target")),
            "predicted_speedup": _num(_get(r, "predicted_speedup")),
            "measured_speedup": _num(_get(r, "measured_speedup")),
            "calibration_loss": _num(_get(r, "calibration_loss")),
            "num_parameters": _num(_get(r, "num_parameters")),
            "metrics": _metrics(r),
        })
    baselines = _get(family, "baselines") or {}
    for name, entries in dict(baselines).items():
        for b in list(entries or []):
            rows.append({
                "method": str(name),
                "target": _num(_get(b, "target")),
                "predicted_speedup": _num(_get(b, "predicted_speedup")),
                "measured_speedup": _num(_get(b, "measured_speedup")),
                "calibration_loss": _num(_get(b, "calibration_loss")),
                "num_parameters": _num(_get(b, "num_parameters")),
                "metrics": _metrics(b),
            })
    return rows


def _metric_keys(family, rows: Iterable[dict]) -> list[str]:
    seen: list[str] = []
    sources = [dict(_get(family, "dense_metrics") or {})]
    sources += [r["metrics"] for r in rows]
    for m in sources:
        for k in m:
            if k not in seen and k != "calibration_loss":
                seen.append(k)
    first = [k for k in _QUALITY_ORDER if k in seen]
    return first + sorted(k for k in seen if k not in first)


def quality_key(family) -> str:
    """``"perplexity"``, ``"embedding_cosine"`` or ``"calibration_loss"`` (see module docstring)."""
    rows = _rows(family)
    dense = _get(family, "dense_metrics") or {}
    for k in _QUALITY_ORDER:
        if _num(dense.get(k)) is not None or any(_num(r["metrics"].get(k)) is not None for r in rows):
            return k
    return "calibration_loss"


def _quality(row: dict, key: str) -> float | None:
    if key == "calibration_loss":
        return row["calibration_loss"]
    return _num(row["metrics"].get(key))


def _dense_quality(family, key: str) -> float | None:
    if key == "calibration_loss":
        return _num(_get(family, "dense_calibration_loss"))
    return _num((_get(family, "dense_metrics") or {}).get(key))


def _label(key: str) -> str:
    return _KNOWN_METRICS.get(key, (key.replace("_", " "), False))[0]


def _higher_is_better(key: str) -> bool:
    return _KNOWN_METRICS.get(key, (key, False))[1]


def best_per_target(family) -> list[tuple[float, dict | None, str]]:
    """``[(target, best_row or None, quality key), ...]`` in ascending target order."""
    key = quality_key(family)
    rows = _rows(family)
    targets = sorted({_target_key(r["target"]) for r in rows if _target_key(r["target"]) is not None})
    out = []
    for t in targets:
        cands = [r for r in rows if _target_key(r["target"]) == t and _quality(r, key) is not None]
        best = None
        for r in cands:  # ties keep the first (ZipLM comes first)
            q = _quality(r, key)
            if best is None or (q > _quality(best, key) if _higher_is_better(key) else q < _quality(best, key)):
                best = r
        out.append((t, best, key))
    return out


# --------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------
def render_markdown(family, png_name: str | None = REPORT_PNG) -> str:
    rows = _rows(family)
    mkeys = _metric_keys(family, rows)
    qkey = quality_key(family)
    env = _get(family, "env")
    table = _get(family, "latency_table")
    name = _get(family, "model_name") or "model"
    L: list[str] = [f"# ZipLM pruning report: {_md_escape(name)}", ""]

    # --- setup
    env_desc = env.describe() if hasattr(env, "describe") else str(env)
    L.append(f"- **Model:** `{_md_escape(name)}`")
    L.append(f"- **Environment:** `{_md_escape(env_desc)}`")
    if env is not None and all(hasattr(env, a) for a in ("device", "dtype", "batch_size", "seq_len")):
        L.append(f"  (device {env.device}, dtype {env.dtype}, batch size {env.batch_size}, "
                 f"sequence length {env.seq_len}, mode {_get(env, 'mode', 'prefill')})")
    dense_time = _get(table, "dense_time")
    prunable_time = _get(table, "prunable_time")
    line = f"- **Dense time:** {_fmt_time(dense_time)} per forward pass"
    if _num(prunable_time) is not None and _num(dense_time):
        line += (f" (prunable layers {_fmt_time(prunable_time)}, "
                 f"{100 * float(prunable_time) / float(dense_time):.0f}%)")
    L.append(line)
    max_sp = None
    if table is not None and hasattr(table, "max_speedup"):
        try:
            max_sp = table.max_speedup()
        except Exception:  # a partial/fake table: just leave it out
            max_sp = None
    if _num(max_sp) is not None:
        L.append(f"- **Largest speedup the latency table allows:** {_fmt_speedup(max_sp)}")
    dense_bits = [f"calibration loss {_fmt(_get(family, 'dense_calibration_loss'))}",
                  f"{_fmt_params(_get(family, 'dense_num_parameters'))} parameters"]
    dense_metrics = _get(family, "dense_metrics") or {}
    dense_bits += [f"{_label(k)} {_fmt(dense_metrics.get(k))}" for k in mkeys if k in dense_metrics]
    L.append("- **Dense model:** " + ", ".join(dense_bits))
    L.append("")

    # --- stage timing
    stages = dict(_get(family, "stage_seconds") or {})
    L += ["## Stage timing", ""]
    if stages:
        total = sum(v for v in (_num(x) for x in stages.values()) if v is not None)
        order = [s for s in _STAGES if s in stages] + [s for s in stages if s not in _STAGES]
        L += ["| stage | wall-clock | share |", "|---|---:|---:|"]
        for s in order:
            v = _num(stages[s])
            share = f"{100 * v / total:.1f}%" if (v is not None and total > 0) else _NA
            L.append(f"| {_md_escape(s)} | {_fmt_seconds(v)} | {share} |")
        L.append(f"| **total** | **{_fmt_seconds(total)}** | 100% |")
    else:
        L.append("No stage timing recorded.")
    L.append("")

    # --- results table
    L += ["## Results", ""]
    head = ["method", "target", "predicted speedup", "measured speedup", "calibration loss", "parameters"]
    head += [_label(k) for k in mkeys]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    dense_row = ["dense", _NA, "1.00x", "1.00x", _fmt(_get(family, "dense_calibration_loss")),
                 _fmt_params(_get(family, "dense_num_parameters"))]
    dense_row += [_fmt(dense_metrics.get(k)) for k in mkeys]
    L.append("| " + " | ".join(dense_row) + " |")
    by_target = sorted(rows, key=lambda r: (r["target"] if r["target"] is not None else math.inf,
                                            not r.get("main"), r["method"]))
    for r in by_target:
        cells = [_md_escape(r["method"]), _fmt_speedup(r["target"]), _fmt_speedup(r["predicted_speedup"]),
                 _fmt_speedup(r["measured_speedup"]), _fmt(r["calibration_loss"]), _fmt_params(r["num_parameters"])]
        cells += [_fmt(r["metrics"].get(k)) for k in mkeys]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Baselines are listed at the target they were built for; compare them at their *measured* speedup.")
    L.append("")

    # --- best per target
    arrow = "higher" if _higher_is_better(qkey) else "lower"
    L += ["## Best method per target", "", f"Criterion: {_label(qkey)} ({arrow} is better).", ""]
    best = best_per_target(family)
    if not best:
        L.append("No pruned results.")
    for t, row, key in best:
        if row is None:
            L.append(f"- **{_fmt_speedup(t)}:** no method has a {_label(key)} value")
            continue
        note = f", measured {_fmt_speedup(row['measured_speedup'])}" if row["measured_speedup"] is not None else ""
        L.append(f"- **{_fmt_speedup(t)}:** {_md_escape(row['method'])} "
                 f"({_label(key)} {_fmt(_quality(row, key))}{note})")
    L.append("")

    if png_name:
        L += ["## Quality vs measured speedup", "", f"![{_label(qkey)} vs measured speedup]({png_name})", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------
def render_png(family) -> bytes:
    """PNG bytes of quality vs measured speedup (raises ImportError without matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = quality_key(family)
    rows = _rows(family)
    fig = Figure(figsize=(7.0, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    ys_all: list[float] = []
    dense_q = _dense_quality(family, key)
    if dense_q is not None:
        ax.plot([1.0], [dense_q], marker="*", markersize=14, color="black", linestyle="none", label="dense", zorder=5)
        ax.annotate("dense", (1.0, dense_q), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ys_all.append(dense_q)

    main = main_method(family)
    methods = [main] + sorted({r["method"] for r in rows if r["method"] != main})
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    used_predicted = False
    for i, m in enumerate(methods):
        pts = []
        for r in rows:
            if r["method"] != m:
                continue
            x = r["measured_speedup"]
            if x is None and m == main and r["predicted_speedup"] is not None:
                x, used_predicted = r["predicted_speedup"], True  # no measurement: plot the prediction
            y = _quality(r, key)
            if x is not None and y is not None:
                pts.append((x, y))
        if not pts:
            continue
        pts.sort()
        if dense_q is not None and m == main:
            pts = [(1.0, dense_q)] + pts
        xs, ys = zip(*pts)
        ys_all += list(ys)
        ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=2.0 if m == main else 1.2,
                linestyle="-" if m == main else "--", label=m, zorder=4 if m == main else 3)

    targets = sorted({_target_key(r["target"]) for r in rows if _target_key(r["target"]) is not None})
    for j, t in enumerate(targets):
        ax.axvline(t, color="gray", linestyle=":", linewidth=1.0, label="targets" if j == 0 else None, zorder=1)

    pos = [y for y in ys_all if y > 0]
    if key == "perplexity" and len(pos) == len(ys_all) and pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("measured speedup (x)" + (" [ZipLM: predicted where not measured]" if used_predicted else ""))
    arrow = "higher" if _higher_is_better(key) else "lower"
    ax.set_ylabel(f"{_label(key)} ({arrow} is better)")
    env = _get(family, "env")
    env_desc = env.describe() if hasattr(env, "describe") else (str(env) if env is not None else "")
    ax.set_title(f"{_get(family, 'model_name') or 'model'}  {env_desc}".strip(), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
def write_report(family, directory) -> tuple[Path, Path | None]:
    """Write ``report.md`` and ``quality_vs_speedup.png`` into ``directory`` (created if absent).

    Returns ``(md_path, png_path)``; ``png_path`` is ``None`` (and the markdown
    says so) only when matplotlib is not installed.  Both files are written
    atomically; on failure no temp file is left behind.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    md_path, png_path = d / REPORT_MD, d / REPORT_PNG
    try:
        png = render_png(family)
    except ImportError:
        png = None
    md = render_markdown(family, REPORT_PNG if png is not None else None)
    if png is None:
        md += "\n_Plot skipped: matplotlib is not installed (pip install matplotlib)._\n"
    else:
        atomic_write_bytes(png_path, png)
    atomic_write_bytes(md_path, md.encode("utf-8"))
    return md_path, (png_path if png is not None else None)
