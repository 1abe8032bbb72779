"""`lra export`: the dataset with cleaned labels, as a manifest (not a DVC stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.export import (POLICIES, apply_policy, check_out, default_issues, image_paths,
                             manifest_table, read_decisions, write_manifest)
from pipeline.tables import check_same_samples, read_labels, read_prepared
from stages.app import LabelsOption, PreparedOption, app, stage


def _policy(value: str) -> str:
    if value not in POLICIES:
        raise typer.BadParameter(f"{value!r}; valid: {', '.join(POLICIES)}")
    return value


@app.command()
def export(policy: Annotated[str, typer.Option(
               "--policy", callback=_policy, metavar="|".join(POLICIES),
               help="relabel: disputed train labels take the suggested label; "
                    "drop: disputed train rows are left out; keep: labels unchanged.")],
           out: Annotated[Path, typer.Option(
               "--out", help="The manifest: .csv or .parquet / .pq (by the suffix). For "
                             "sources whose images live inside samples.parquet (digits, "
                             "cifar10, cifar100) the images are written as PNG files to "
                             "<stem>_images/ beside it, so the manifest is usable.")],
           issues: Annotated[Path | None, typer.Option(
               "--issues", help="Which labels are disputed: a table (Parquet, or CSV by the "
                                "suffix) with sample_id and "
                                "is_label_issue [+ predicted_label], or evaluate's "
                                "predictions (predicted != observed). Default: "
                                "data/report/label_issues.parquet when present, else "
                                "data/evaluate/predictions.parquet.")] = None,
           prepared: PreparedOption = Path("data/prepared/samples.parquet"),
           labels: LabelsOption = Path("data/labels/labels.parquet"),
           predictions: Annotated[Path, typer.Option(
               help="Predicted labels for an issues table without predicted_label.")
           ] = Path("data/evaluate/predictions.parquet")) -> None:
    """Write the dataset with cleaned labels as a manifest any training code reads. Its
    columns (path, label, split, clean_label, original_label, ...) are the `manifest`
    source's format, so this pipeline reads it too (data.source: manifest, noise.kind:
    none)."""
    with stage("export"):
        check_out(out)
        prep = read_prepared(prepared)
        lab = read_labels(labels)
        check_same_samples(prep.table.column("sample_id").to_numpy(), lab.sample_id,
                           "prepared table", "labels")
        source = issues if issues is not None else default_issues(predictions)
        decisions = read_decisions(source, lab, predictions=predictions)
        rows, label = apply_policy(policy, lab, decisions)
        paths = image_paths(prep, rows, out)
        table = manifest_table(prepared=prep, labels=lab, decisions=decisions, rows=rows,
                               label=label, paths=paths)
        write_manifest(table, out, metadata={"class_names": prep.class_names,
                                             "policy": policy, "issues": decisions.source})
        flagged = int(decisions.flagged.sum())
        changed = int((label != lab.observed[rows]).sum())
        typer.echo(f"lra export: {policy}: {flagged} of {int((lab.split == 'train').sum())} "
                   f"train label(s) disputed ({decisions.source}); {len(rows)} row(s), "
                   f"{changed} relabelled -> {out}", err=True)
