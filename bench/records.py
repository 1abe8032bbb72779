"""Result records: one flat JSON object per measured figure.

Every record has the keys the issue asks for:
    stage, scale, seconds, peak_memory_bytes, throughput, limit, fraction_of_limit
(index_retrieve records also recall_at_k and speedup_vs_exact), plus units and context:
    variant           what was measured within the stage (batch size, index, ...)
    throughput_unit   unit of `throughput` and of `limit` (always the same unit)
    limit_kind        what the limit is (a matmul-derived ceiling, or the exact baseline)
    fraction_of_limit throughput / limit
    target            {field: minimum} the issue's targets; meets_target: all met
    array_bytes       the arrays the stage must hold; memory_ratio = peak / array_bytes;
                      within_2x_memory = memory_ratio <= 2
Records that do not apply leave a field null. The first record of a results file is the
machine (stage "machine"), the second the measured matrix-multiply throughput ("matmul").
"""

from __future__ import annotations

from typing import Any

REQUIRED = ("stage", "scale", "seconds", "peak_memory_bytes", "throughput", "limit",
            "fraction_of_limit")


def record(stage: str, scale: str, *, variant: str | None = None,
           seconds: float | None = None, peak_memory_bytes: int | None = None,
           throughput: float | None = None, throughput_unit: str | None = None,
           limit: float | None = None, limit_kind: str | None = None,
           array_bytes: int | None = None, target: dict[str, float] | None = None,
           **extra: Any) -> dict[str, Any]:
    fraction = (throughput / limit) if throughput is not None and limit else None
    out: dict[str, Any] = {
        "stage": stage, "scale": scale, "variant": variant, "seconds": seconds,
        "peak_memory_bytes": peak_memory_bytes, "throughput": throughput,
        "throughput_unit": throughput_unit, "limit": limit, "limit_kind": limit_kind,
        "fraction_of_limit": fraction, "array_bytes": array_bytes,
    }
    if array_bytes and peak_memory_bytes is not None:
        out["memory_ratio"] = peak_memory_bytes / array_bytes
        out["within_2x_memory"] = out["memory_ratio"] <= 2.0
    out.update(extra)
    if target:
        out["target"] = target
        out["meets_target"] = all(out.get(key) is not None and out[key] >= minimum
                                  for key, minimum in target.items())
    return out


def error_record(stage: str, scale: str, variant: str | None, error: str) -> dict[str, Any]:
    return {**{key: None for key in REQUIRED}, "stage": stage, "scale": scale,
            "variant": variant, "error": error}
