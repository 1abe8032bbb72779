"""The linear baselines (noisy_linear, clean_linear) as evaluate scores them and as train
checks its model against them: one fit, so the two stages compare the same probe."""

from __future__ import annotations

import numpy as np

from pipeline.config import EvaluateConfig
from pipeline.linear import LinearProbe, fit_linear_selected
from pipeline.tables import UNKNOWN, EmbeddingsFile, Labels


def fit_linear_baselines(emb: EmbeddingsFile, lab: Labels, cfg: EvaluateConfig, *,
                         clean: bool = True
                         ) -> tuple[dict[str, LinearProbe], dict[str, float], dict[str, float]]:
    """The linear probes on the raw embeddings: observed labels ("noisy_linear"), and clean
    labels ("clean_linear") when `clean` and every train label is known.

    Fitted on at most cfg.linear_max_rows train rows (a fixed random subset, the same for
    both probes); each keeps the L2 strength (cfg.linear_l2 x 10^j, j < linear_l2_decades)
    best on the validation rows, scored against `Labels.selection_truth` (clean labels
    where known), as LRA-diffusion keeps its best epoch. Returns (probes, chosen L2,
    validation accuracy), each keyed by probe name.
    """
    all_train = emb.rows("train")
    train = all_train
    if len(train) > cfg.linear_max_rows:
        pick = np.random.default_rng(0).choice(len(train), cfg.linear_max_rows, replace=False)
        train = train[np.sort(pick)]
    x = emb.read_rows(train)
    val = emb.rows("val")
    fit = {"x_val": emb.read_rows(val), "y_val": lab.selection_truth(val),
           "num_classes": lab.num_classes, "iters": cfg.linear_iters,
           "l2_values": tuple(cfg.linear_l2 * 10.0 ** j for j in range(cfg.linear_l2_decades))}
    targets = {"noisy_linear": lab.observed[train]}
    if clean and (lab.clean[all_train] != UNKNOWN).all():
        targets["clean_linear"] = lab.clean[train]
    probes, chosen, accuracy = {}, {}, {}
    for name, y in targets.items():
        probes[name], chosen[name], accuracy[name] = fit_linear_selected(x, y, **fit)
    return probes, chosen, accuracy
