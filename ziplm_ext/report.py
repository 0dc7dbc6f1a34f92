"""Markdown + PNG report of a pruned model family.

:func:`write_report` works from any duck-typed "family" object with the
attributes of :class:`ziplm_ext.results.PrunedFamily` (``results``, ``env``,
``latency_table``, ``dense_calibration_loss``, ``dense_num_parameters``,
``dense_metrics``, ``baselines``, ``stage_seconds``, ``model_name``), or the
same fields as mappings (``family.json``); nothing from the pipeline is
imported.  Missing optional attributes are reported as "n/a".  A result's kept
structures per layer are read from ``widths`` (older saves: ``levels``).

:func:`summary_table` is the short fixed-width table ``ziplm prune`` prints.

Files written (each atomically: temp file in the same directory, then
``os.replace``):

* ``report.md`` -- model, environment, dense time, stage timing, one table row
  per target and per baseline, the best method per target, and the kept
  structures per layer of each target (when the results record them);
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


def _widths(row) -> dict:
    """Kept structures per layer name of a result (``widths``; ``levels`` in saves before the rename)."""
    w = _get(row, "widths", None)
    if w is None:
        w = _get(row, "levels", None)
    return dict(w) if isinstance(w, dict) else {}


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
            "widths": _widths(r),
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
                "widths": _widths(b),
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
def _md_setup(family, mkeys: list[str]) -> list[str]:
    """Model, environment, dense time and the dense model's numbers."""
    env = _get(family, "env")
    table = _get(family, "latency_table")
    name = _get(family, "model_name") or "model"
    env_desc = env.describe() if hasattr(env, "describe") else str(env)
    L = [f"- **Model:** `{_md_escape(name)}`", f"- **Environment:** `{_md_escape(env_desc)}`"]
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
    return L + [""]


def _md_stages(family) -> list[str]:
    """Wall-clock time per pipeline stage and its share."""
    stages = dict(_get(family, "stage_seconds") or {})
    L = ["## Stage timing", ""]
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
    return L + [""]


def _md_results(family, rows: list[dict], mkeys: list[str]) -> list[str]:
    """One row for the dense model, then one per (target, method)."""
    L = ["## Results", ""]
    head = ["method", "target", "predicted speedup", "measured speedup", "calibration loss", "parameters"]
    head += [_label(k) for k in mkeys]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    dense_metrics = _get(family, "dense_metrics") or {}
    dense_row = ["dense", _NA, "1.00x", "1.00x", _fmt(_get(family, "dense_calibration_loss")),
                 _fmt_params(_get(family, "dense_num_parameters"))]
    dense_row += [_fmt(dense_metrics.get(k)) for k in mkeys]
    L.append("| " + " | ".join(dense_row) + " |")
    for r in _by_target(rows):
        cells = [_md_escape(r["method"]), _fmt_speedup(r["target"]), _fmt_speedup(r["predicted_speedup"]),
                 _fmt_speedup(r["measured_speedup"]), _fmt(r["calibration_loss"]), _fmt_params(r["num_parameters"])]
        cells += [_fmt(r["metrics"].get(k)) for k in mkeys]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Baselines are listed at the target they were built for; compare them at their *measured* speedup.")
    return L + [""]


def _by_target(rows: list[dict]) -> list[dict]:
    """Rows by ascending target; at each target the family's own result first, then baselines by name."""
    return sorted(rows, key=lambda r: (r["target"] if r["target"] is not None else math.inf,
                                       not r.get("main"), r["method"]))


def _md_best(family, qkey: str) -> list[str]:
    arrow = "higher" if _higher_is_better(qkey) else "lower"
    L = ["## Best method per target", "", f"Criterion: {_label(qkey)} ({arrow} is better).", ""]
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
    return L + [""]


def _md_widths(rows: list[dict]) -> list[str]:
    """Kept structures per layer (attention: heads or KV groups; FFN: channels; FLOP: ranks), one column
    per target of the family's own results; nothing when no result records them."""
    main = [r for r in _by_target(rows) if r.get("main") and r["widths"]]
    if not main:
        return []
    names = list(dict.fromkeys(n for r in main for n in r["widths"]))
    L = ["## Kept structures per layer", "",
         "| layer | " + " | ".join(_fmt_speedup(r["target"]) for r in main) + " |",
         "|---|" + "---:|" * len(main)]
    for n in names:
        cells = [str(r["widths"][n]) if n in r["widths"] else _NA for r in main]
        L.append(f"| {_md_escape(n)} | " + " | ".join(cells) + " |")
    return L + [""]


def render_markdown(family, png_name: str | None = REPORT_PNG) -> str:
    rows = _rows(family)
    mkeys = _metric_keys(family, rows)
    qkey = quality_key(family)
    name = _get(family, "model_name") or "model"
    L: list[str] = [f"# ZipLM pruning report: {_md_escape(name)}", ""]
    L += _md_setup(family, mkeys)
    L += _md_stages(family)
    L += _md_results(family, rows, mkeys)
    L += _md_best(family, qkey)
    if png_name:
        L += ["## Quality vs measured speedup", "", f"![{_label(qkey)} vs measured speedup]({png_name})", ""]
    L += _md_widths(rows)
    return "\n".join(L)


# --------------------------------------------------------------------------
# summary table (stdout of ``ziplm prune``)
# --------------------------------------------------------------------------
def summary_table(family) -> str:
    """Short fixed-width table: one line for the dense model, one per target (+ baselines)."""
    key = quality_key(family)
    label = {"perplexity": "ppl", "embedding_cosine": "emb_cos", "calibration_loss": "calib_loss"}.get(key, key)

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"{'method':<10} {'target':>7} {'pred':>7} {'measured':>9} {'params':>12} {label:>11}"]
    dq = (getattr(family, "dense_calibration_loss", None) if key == "calibration_loss"
          else (getattr(family, "dense_metrics", None) or {}).get(key))
    lines.append(f"{'dense':<10} {'-':>7} {'1.00x':>7} {'1.00x':>9} "
                 f"{f(getattr(family, 'dense_num_parameters', None), ','):>12} {f(dq, '.4g'):>11}")
    for r in sorted(_rows(family), key=lambda r: (r["target"] or 0, not r.get("main"), r["method"])):
        q = r["calibration_loss"] if key == "calibration_loss" else r["metrics"].get(key)
        params = None if r["num_parameters"] is None else int(r["num_parameters"])
        lines.append(f"{r['method'][:10]:<10} {f(r['target'], '.2f') + 'x':>7} "
                     f"{(f(r['predicted_speedup'], '.2f') + 'x') if r['predicted_speedup'] else '-':>7} "
                     f"{(f(r['measured_speedup'], '.2f') + 'x') if r['measured_speedup'] else '-':>9} "
                     f"{f(params, ','):>12} {f(q, '.4g'):>11}")
    return "\n".join(lines)


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
