"""Plain NumPy loops written from SPEC.md, as independent test expectations.

Deliberately naive: a unique-value grid, explicit loops over phases and
segments, and window integrals summed over the window's own segments (no
global running sums, hence no cancellation). Only for small traces.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


class SpecTrace:
    """SPEC sections 2-4 for one validated table."""

    def __init__(self, table: pd.DataFrame, chunk_size: float, min_duration=0.0):
        kind = table["phase_type"].astype(str).str.lower().to_numpy()
        self.is_prefill = kind == "prefill"
        self.t_start = table["t_start"].to_numpy(dtype=float)
        self.t_end = table["t_end"].to_numpy(dtype=float)
        prefill = table["prefill_tokens"].to_numpy(dtype=float)
        decode = table["decode_tokens"].to_numpy(dtype=float)
        self.tokens = np.where(self.is_prefill, prefill, decode)
        self.chunk = float(chunk_size)
        if "N_steps" in table.columns:
            self.steps = table["N_steps"].to_numpy(dtype=float)
        else:
            self.steps = np.array(
                [
                    math.ceil(p / self.chunk) if is_pf else p
                    for p, is_pf in zip(self.tokens, self.is_prefill, strict=True)
                ]
            )
        raw = self.t_end - self.t_start
        self.duration = np.maximum(raw, min_duration) if min_duration > 0 else raw
        self.grid = np.unique(np.concatenate([self.t_start, self.t_end]))
        n_seg = len(self.grid) - 1
        self.length = np.diff(self.grid)
        self.n_pf = np.zeros(n_seg)
        self.n_dec = np.zeros(n_seg)
        for i in range(len(self.t_start)):
            for j in self.segments_of(self.t_start[i], self.t_end[i]):
                if self.is_prefill[i]:
                    self.n_pf[j] += 1
                else:
                    self.n_dec[j] += 1

    def segments_of(self, start: float, end: float) -> range:
        first = int(np.searchsorted(self.grid, start))
        last = int(np.searchsorted(self.grid, end))
        return range(first, last)

    def window(self, i: int, rate: np.ndarray) -> float:
        """Integral of a per-segment rate over phase i, summed locally."""
        total = 0.0
        for j in self.segments_of(self.t_start[i], self.t_end[i]):
            total += rate[j] * self.length[j]
        return total

    def missing(self) -> np.ndarray:
        out = np.zeros(len(self.tokens))
        for i in np.flatnonzero(self.is_prefill):
            last_chunk = self.tokens[i] - self.chunk * (self.steps[i] - 1)
            rho = min(max(last_chunk, 0), self.chunk)
            out[i] = min(max(self.chunk - rho, 0), self.chunk)
        return out

    def trace_only_correction(self, mode: str) -> np.ndarray:
        c = np.zeros(len(self.length))
        if mode == "none":
            return c
        mu = self.missing()
        n_seg = len(self.length)
        for i in np.flatnonzero(self.is_prefill):
            if mu[i] <= 0:
                continue
            if mode == "uniform":
                for j in self.segments_of(self.t_start[i], self.t_end[i]):
                    c[j] += mu[i] / (self.t_end[i] - self.t_start[i])
            elif mode == "end":
                j = int(np.searchsorted(self.grid, self.t_end[i], side="right")) - 1
                j = min(max(j, 0), n_seg - 1)
                c[j] += mu[i] / self.length[j]
            else:
                raise ValueError(mode)
        return c

    def last_step_start(self, i: int, step_rate: np.ndarray) -> float | None:
        """t* of prefill row i (SPEC section 8), or None when r is skipped.

        Walks the segments of [t_rs, t_re) from the left, accumulating
        lambda_j * length_j until the steps reach L - L / N_r.
        """
        start, end, steps = self.t_start[i], self.t_end[i], self.steps[i]
        if self.missing()[i] <= 0 or steps <= 0 or end <= start:
            return None
        segs = list(self.segments_of(start, end))
        total = sum(step_rate[j] * self.length[j] for j in segs)
        if total <= 0:
            return None
        target = min(max(total - total / steps, 0.0), total)
        t_star, acc = end, 0.0
        for j in segs:
            mass = step_rate[j] * self.length[j]
            if acc + mass >= target - 1e-15:
                remaining = max(target - acc, 0.0)
                t_star = self.grid[j] + remaining / step_rate[j]
                t_star = min(max(t_star, start), end)
                break
            acc += mass
        if t_star >= end:
            return None
        return t_star

    def beta_informed_correction(
        self, step_rate: np.ndarray, rows: list[int] | None = None
    ) -> np.ndarray:
        """SPEC section 8, walking segments request by request.

        ``rows`` restricts the sum to those prefill rows (default: all).
        """
        c = np.zeros(len(self.length))
        mu = self.missing()
        for i in np.flatnonzero(self.is_prefill):
            if rows is not None and i not in rows:
                continue
            t_star = self.last_step_start(i, step_rate)
            if t_star is None:
                continue
            start, end = self.t_start[i], self.t_end[i]
            overlaps = []
            for j in self.segments_of(start, end):
                overlap = min(self.grid[j + 1], end) - max(self.grid[j], t_star)
                if overlap > 0:
                    overlaps.append((j, overlap))
            tail = sum(step_rate[j] * o for j, o in overlaps)
            if tail <= 0:
                continue
            for j, o in overlaps:
                c[j] += mu[i] * step_rate[j] * o / tail / self.length[j]
        return c

    def baseline_design(self, mode: str) -> np.ndarray:
        """Rows [N_i, A_pf_i, A_dec_i] (SPEC section 6)."""
        c = self.trace_only_correction(mode)
        rows = []
        for i in range(len(self.tokens)):
            rate = self.steps[i] / self.duration[i]
            a_pf = rate * self.window(i, self.chunk * self.n_pf) - self.window(i, c)
            a_dec = rate * self.window(i, self.n_dec)
            rows.append([self.steps[i], a_pf, a_dec])
        return np.array(rows)

    def mm_features(self, beta, effective_prefill, mode="beta_informed"):
        """One outer step's (features [n, 3], ptilde) from beta^(m-1)."""
        step_time = beta[0] + beta[1] * effective_prefill + beta[2] * self.n_dec
        step_rate = 1.0 / np.maximum(step_time, 1e-12)
        if mode == "beta_informed":
            c = self.beta_informed_correction(step_rate)
        else:
            c = self.trace_only_correction(mode)
        removed = c / np.maximum(step_rate, 1e-12)
        ptilde = np.maximum(self.chunk * self.n_pf - removed, 0)
        rows = []
        for i in range(len(self.tokens)):
            steps_in = self.window(i, step_rate)
            if steps_in > 0:
                p_pf = self.window(i, ptilde * step_rate) / steps_in
                p_dec = self.window(i, self.n_dec * step_rate) / steps_in
            else:
                p_pf = p_dec = 0.0
            rows.append([self.steps[i], self.steps[i] * p_pf, self.steps[i] * p_dec])
        return np.array(rows), ptilde


def exact_nnls(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """NNLS by enumerating the 7 supports of 3 coefficients (float64)."""
    best, best_value = np.zeros(3), float(target @ target)
    for mask in range(1, 8):
        support = [j for j in range(3) if mask >> j & 1]
        sub = design[:, support]
        coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
        if np.any(coef <= 0):
            continue
        beta = np.zeros(3)
        beta[support] = coef
        value = float(np.sum((design @ beta - target) ** 2))
        if value < best_value:
            best, best_value = beta, value
    return best
