"""Human-readable summaries of fit results (CLI and examples)."""

from __future__ import annotations

from jaxbeta._results import BaselineResult, IterativeResult

__all__ = ["format_result"]


def _value(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) if value else "none"
    return str(value)


def format_result(
    result: BaselineResult | IterativeResult, *, history_rows: int = 5
) -> str:
    """Betas, stop information, diagnostics and the last history rows."""
    lines = [
        f"Estimated betas ({result.algo}):",
        f"beta0 (sec/step): {result.beta0:.6g}",
        f"beta1 (sec/token): {result.beta1:.6g}",
        f"beta2 (sec/token): {result.beta2:.6g}",
    ]
    if isinstance(result, IterativeResult):
        lines.append(
            f"Converged: {result.converged} (outer iters: {result.n_outer_iters}; "
            f"stop reason: {result.stop_reason})"
        )
        if result.stop_reason == "cycle":
            lines.append(
                "Note: the loop alternates between two states (period-2 cycle); "
                "the last iterate is reported, as the reference does."
            )
    lines.append("Diagnostics:")
    for key, value in result.diagnostics.items():
        lines.append(f"{key}: {_value(value)}")
    if isinstance(result, IterativeResult):
        betas = result.history["beta"]
        first = max(1, len(betas) - history_rows)
        lines.append("Beta history (last few iters):")
        for m in range(first, len(betas)):
            b0, b1, b2 = betas[m]
            lines.append(f"iter {m}: beta0={b0:.6g}, beta1={b1:.6g}, beta2={b2:.6g}")
    return "\n".join(lines)
