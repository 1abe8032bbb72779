"""data/report/index.html: one self-contained page a person opens from disk. Styles and
charts are inline, images are PNG data: URIs, and there is no script and no reference
to any other file or host, so it renders offline, the same in every browser, and can be
mailed as it is. All text is escaped with html.escape.

The page: LRA-diffusion against the baselines, the training curves, the test confusion
matrix, the noise and retrieval summaries, the label-issue summary and a gallery of the
most suspect training labels, each beside its retrieved neighbours.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from pipeline.charts import bar_rows, confusion_matrix, key_values, line_chart

IMAGE_PX = 96
"""Longest side of a gallery image: small images are enlarged by an integer factor
(nearest neighbour, so pixels stay sharp), large ones thumbnailed."""
NEIGHBOUR_PX = 56

METHOD_NAMES = {
    "lra_diffusion": "LRA-diffusion",
    "lra_diffusion_vote": "LRA-diffusion, stochastic vote",
    "knn_vote": "kNN vote (observed labels)",
    "noisy_linear": "linear probe, observed labels",
    "clean_linear": "linear probe, clean labels (upper bound)",
}


def image_data_uri(img: Image.Image, target: int) -> str:
    """A PNG data: URI of `img` with its longest side near `target` pixels: enlarged by
    the largest integer factor that fits (nearest), or thumbnailed when larger."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    longest = max(img.size)
    if longest < target:
        factor = max(1, target // longest)
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    elif longest > target:
        img = img.copy()
        img.thumbnail((target, target), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Neighbour:
    sample_id: int
    image: Image.Image | None
    label: str
    agrees_with_suggestion: bool
    agrees_with_given: bool = False


@dataclass(frozen=True)
class GalleryEntry:
    """One suspected label issue: the image, its labels and its retrieved neighbours."""

    rank: int
    sample_id: int
    image_ref: str
    image: Image.Image | None
    given: str
    suggested: str
    confidence: float
    label_score: float
    flagged: bool
    clean: str | None  # the true label where known (digits: the label before the noise)
    neighbours: Sequence[Neighbour] = field(default_factory=tuple)


@dataclass(frozen=True)
class ReportInputs:
    """Everything the page shows (plain values; `render` does no I/O)."""

    title: str
    facts: dict[str, Any]  # source, encoder, split sizes ...
    metrics: dict[str, Any]  # data/evaluate/metrics.json
    train_log: list[dict[str, float | None]]  # data/model/train_log.csv rows
    confusion_actual: np.ndarray  # (n,) int64, test rows with a known label
    confusion_predicted: np.ndarray
    class_names: Sequence[str]
    noise: dict[str, Any]  # data/labels/noise.json
    retrieval: dict[str, Any]  # data/retrieval/retrieval.json
    issues: dict[str, Any]  # data/report/report.json
    gallery: Sequence[GalleryEntry]


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:16px 24px;color:#222;background:#fff}
h1{font-size:1.6em;margin:.2em 0}
h2{font-size:1.2em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd}
.facts{color:#555}table{border-collapse:collapse;font-size:.9em}
th,td{padding:3px 8px;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv th{font-weight:normal;color:#555}.grid-2{display:flex;flex-wrap:wrap;gap:24px}
.barcell{width:260px}.bar{height:12px;background:#1f77b4}
tr.highlight th,tr.highlight td{font-weight:bold}tr.highlight .bar{background:#d62728}
svg text{font-size:11px;fill:#333}svg .chart-title{font-size:13px;font-weight:bold}
svg .grid{stroke:#e4e4e4}svg .frame{fill:none;stroke:#999}
h3{font-size:.95em;margin:.6em 0 .3em}
.confusion td{width:2.2em;height:1.6em;text-align:center;border:1px solid #eee;font-size:.85em}
.confusion td.dark{color:#fff}.confusion th.col{font-weight:normal;text-align:center}
.issue{display:flex;gap:14px;align-items:flex-start;border:1px solid #ddd;border-radius:6px;
padding:8px;margin:8px 0}.issue .main{flex:0 0 auto;text-align:center;width:150px}
.issue img{image-rendering:pixelated;display:block;margin:0 auto;background:#eee}
.labels{font-size:.85em;text-align:left;margin-top:4px}.given{color:#b71c1c}
.suggested{color:#1b5e20;font-weight:bold}.meta{color:#666;font-size:.8em}
.neighbours{display:flex;flex-wrap:wrap;gap:6px}.nb{text-align:center;font-size:.75em;width:60px}
.nb.agree{color:#1b5e20;font-weight:bold}.nb.same{color:#b71c1c}.nb.other{color:#777}
.flag{display:inline-block;background:#b71c1c;color:#fff;border-radius:3px;padding:0 4px;
font-size:.75em}
.note{color:#555;font-size:.85em;max-width:900px}.warn{color:#8a4b00}
"""


def _img(uri_source: Image.Image | None, px: int, alt: str) -> str:
    if uri_source is None:
        return f'<div class="meta">({escape(alt)}: no image)</div>'
    uri = image_data_uri(uri_source, px)
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _ordered(scores: dict[str, Any]) -> list[tuple[str, Any]]:
    """LRA-diffusion first, then the baselines in METHOD_NAMES order, then the rest."""
    order = {m: i for i, m in enumerate(["observed", *METHOD_NAMES])}
    return sorted(scores.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


def _accuracy_section(metrics: dict[str, Any]) -> str:
    out = []
    for split in sorted(k for k in metrics if k.endswith("_accuracy")
                        and k != "train_label_accuracy"):
        values = {METHOD_NAMES.get(m, m): v for m, v in _ordered(metrics[split])}
        out.append(f"<div><h3>{escape(split.replace('_', ' '))}</h3><table>"
                   f"{bar_rows(values, highlight=METHOD_NAMES['lra_diffusion'])}</table></div>")
    if "train_label_accuracy" in metrics:
        values = {METHOD_NAMES.get(m, m): v for m, v in _ordered(metrics["train_label_accuracy"])}
        out.append("<div><h3>train labels recovered (against the clean labels)</h3><table>"
                   f"{bar_rows(values, highlight=METHOD_NAMES['lra_diffusion'])}</table></div>")
    return f'<div class="grid-2">{"".join(out)}</div>'


def _curves(log: list[dict[str, float | None]]) -> str:
    epochs = [row.get("epoch") for row in log]
    acc = {name: (epochs, [row.get(col) for row in log])
           for name, col in (("validation accuracy", "val_accuracy"),
                             ("validation accuracy, EMA", "val_accuracy_ema"))
           if any(row.get(col) is not None for row in log)}
    loss = {"training loss": (epochs, [row.get("loss") for row in log])}
    charts = (line_chart(acc, title="Validation accuracy", x_label="epoch", y_label="accuracy"),
              line_chart(loss, title="Training loss", x_label="epoch", y_label="loss"))
    return f'<div class="grid-2">{"".join(charts)}</div>'


def _issue_summary(issues: dict[str, Any]) -> str:
    facts = {k: issues.get(k) for k in ("train_samples", "label_issues", "issue_rate",
                                        "corrupted", "stochastic_samples", "min_confidence",
                                        "val_flag_rate", "mean_confidence") if k in issues}
    tables = [key_values(facts)]
    if "detection" in issues:
        scorer = ("cross-fitted linear probe" if issues.get("scored_by") == "noisy_linear"
                  else "LRA-diffusion")
        rows = {f"{scorer} flag (this table)": issues["detection"],
                **{f"reference: {k.replace('_', ' ')}": v
                   for k, v in issues.get("reference", {}).items()}}
        head = "<tr><th></th><th>precision</th><th>recall</th><th>F1</th><th>AUROC</th></tr>"
        body = "".join(
            f"<tr><th>{escape(name)}</th>" + "".join(
                f'<td class="num">{"n/a" if q.get(m) is None else f"{q[m]:.4f}"}</td>'
                for m in ("precision", "recall", "f1", "auroc")) + "</tr>"
            for name, q in rows.items())
        tables.append(f"<table>{head}{body}</table>")
    return f'<div class="grid-2">{"".join(tables)}</div>'


def _scorer_note(issues: dict[str, Any]) -> str:
    """How the labels were scored: by the model, or by the cross-fitted probe when the
    model was below that probe on validation (report.json `fallback`)."""
    fallback = issues.get("fallback")
    if issues.get("scored_by") != "noisy_linear" or not fallback:
        return ("<p class=\"note\">Every training label is scored by the model: the "
                "suggested label is the majority vote of stochastic DDIM samples, its "
                "confidence the share of samples that chose it; a label is flagged when both "
                "that vote and the deterministic prediction reject it. The full ranked table "
                "is data/report/label_issues.parquet.</p>")
    lra, probe = fallback.get("lra_val_accuracy"), fallback.get("probe_val_accuracy")
    numbers = (f" ({lra:.4f} against {probe:.4f})"
               if isinstance(lra, float) and isinstance(probe, float) else "")
    return ("<p class=\"note warn\">LRA-diffusion was below the linear probe on the observed "
            f"labels on validation{escape(numbers)}, so the labels are scored by that probe, "
            f"cross-fitted over {escape(str(fallback.get('folds')))} folds (each training "
            "label by a probe that did not see it): the suggested label is the probe's class, "
            "label score its probability of the given label, and a label is flagged when the "
            "probe's class differs from it. The full ranked table is "
            "data/report/label_issues.parquet.</p>")


def _nb_class(n: Neighbour) -> str:
    return "agree" if n.agrees_with_suggestion else "same" if n.agrees_with_given else "other"


def _gallery(entries: Sequence[GalleryEntry]) -> str:
    if not entries:
        return '<p class="note">No training samples to show.</p>'
    out = []
    for e in entries:
        flag = '<span class="flag">label issue</span> ' if e.flagged else ""
        clean = ("" if e.clean is None else
                 f'<div class="meta">true label: {escape(e.clean)}</div>')
        nbs = "".join(
            f'<div class="nb {_nb_class(n)}">'
            f'{_img(n.image, NEIGHBOUR_PX, f"neighbour {n.sample_id}")}{escape(n.label)}</div>'
            for n in e.neighbours)
        out.append(
            f'<div class="issue"><div class="main">{_img(e.image, IMAGE_PX, e.image_ref)}'
            f'<div class="labels">{flag}#{e.rank + 1} <span class="meta">{escape(e.image_ref)}'
            f'</span><br>given: <span class="given">{escape(e.given)}</span><br>'
            f'suggested: <span class="suggested">{escape(e.suggested)}</span><br>'
            f'confidence {e.confidence:.2f}<br>'
            f'<span class="meta">label score {e.label_score:.3f}</span>{clean}</div></div>'
            f'<div><div class="meta">nearest training neighbours and their labels</div>'
            f'<div class="neighbours">{nbs}</div></div></div>')
    return "".join(out)


def render(inp: ReportInputs) -> str:
    """The whole page as one string (deterministic for equal inputs)."""
    facts = " &middot; ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in inp.facts.items())
    confusion = (confusion_matrix(inp.confusion_actual, inp.confusion_predicted,
                                  inp.class_names)
                 if len(inp.confusion_actual) else "<p>No test rows with a known label.</p>")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{escape(inp.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(inp.title)}</h1><p class=\"facts\">{facts}</p>",
        "<h2>Accuracy: LRA-diffusion against the baselines</h2>",
        _accuracy_section(inp.metrics),
        "<h2>Training</h2>", _curves(inp.train_log),
        "<h2>Test confusion matrix (LRA-diffusion)</h2>", confusion,
        "<h2>Label noise and retrieval</h2><div class=\"grid-2\">",
        f"<div><h3>noise</h3>{key_values(inp.noise)}</div>",
        f"<div><h3>retrieval</h3>{key_values(inp.retrieval)}</div></div>",
        "<h2>Label issues</h2>",
        _scorer_note(inp.issues),
        _issue_summary(inp.issues),
        "<h2>Most suspect training labels</h2>",
        "<p class=\"note\">Ranked by label score (lowest first). Neighbours' labels in bold "
        "green are the suggested label, in red the given one. Confidence: ",
        "the cross-fitted probe's probability of the suggested label.</p>"
        if inp.issues.get("scored_by") == "noisy_linear" else
        "the share of stochastic samples that voted for the suggested label.</p>",
        _gallery(inp.gallery),
        "</body></html>\n",
    ])
