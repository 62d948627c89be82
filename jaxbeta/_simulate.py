"""Ground-truth trace simulator: a single continuous-batching engine.

:func:`simulate` produces a phase table (SPEC section 2) whose step-time
coefficients are known exactly, together with the engine's step log, so that
the estimators can be checked against the truth.

The engine model
----------------
One engine runs steps back to back while any request is waiting or running;
when nothing is left it sits idle until the next arrival, and the next step
starts exactly at that arrival time. Step ``k`` takes::

    dt[k] = beta0 + beta1 * prefill_tokens[k] + beta2 * decode_tokens[k]

seconds, multiplied by ``max(1 + noise_sigma * z[k], 0.01)`` with ``z[k]``
standard normal when ``noise_sigma > 0``.

At the start of every step the scheduler does, in this order:

1. Every request that has arrived by the step's start time joins the FCFS
   waiting queue.
2. Every running request that is decoding gets one decode token.
3. Running requests still in prefill get a chunk of
   ``min(chunk_size, tokens left in their prompt)`` tokens each, in the order
   they were admitted. With ``max_num_batched_tokens`` set, the decode tokens
   are taken out of that budget first, and the prefill chunks are handed out
   FCFS from what is left: the chunk that meets the end of the budget is cut
   to fit, and later requests get nothing in that step (they stay running).
4. Waiting requests are admitted FCFS while fewer than ``max_num_seqs``
   requests are running and some token budget is left; an admitted request
   gets its first chunk in this same step (cut to the budget if need be).

A request whose last prompt chunk runs in step ``k`` starts decoding at step
``k + 1``, one token per step. With ``first_token_in_prefill`` (vLLM's
behaviour) the last prefill step also emits the first output token, so a
request with ``O`` output tokens decodes for ``O - 1`` steps and a request with
``O == 1`` has no decode phase at all; otherwise it decodes for ``O`` steps.
A request leaves the engine when its last step ends.

Phases are read off the step boundaries: prefill is [start of the request's
first prefill step, end of its last prefill step]; decode is [end of the last
prefill step, end of the last decode step]. Many phases therefore share
timestamps, as in real engine traces.

How it runs fast
----------------
The step composition (prefill and decode tokens, running count) only changes
at a few events per request: admission, the last (partial) prompt chunk, the
end of prefill and the end of decode. Decode lengths are fixed once decoding
starts, so decode completions sit in a heap keyed by step index. Between two
events every step is identical, so the loop advances a whole *segment* of
identical steps at once: without noise their times are ``t + j * dt`` in
closed form; with noise they are one cumulative sum over pre-drawn per-step
factors. Python work is per segment, never per step, and each segment touches
only the requests whose state changes or that receive prefill tokens. The
per-step log is expanded from the segments with NumPy at the end.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

__all__ = [
    "SimulationResult",
    "add_simulate_arguments",
    "run_simulate",
    "simulate",
]

ARRIVAL_PROCESSES = ("poisson", "bursty", "fixed")
"""Accepted values of ``simulate(arrival=...)``."""

NOISE_FACTOR_FLOOR = 0.01
"""Lower clip of the multiplicative step-time noise factor ``1 + sigma * z``."""

_NOISE_BLOCK = 1 << 16  # per-step noise factors are drawn in blocks this long
_UNLIMITED = 1 << 62  # stands for "no cap" in integer comparisons
_SHORT_SEGMENT = 32  # noisy segments up to this many steps are timed in Python

PHASE_COLUMNS = (
    "request_id",
    "phase_type",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
)
STEP_COLUMNS = (
    "step",
    "t_start",
    "t_end",
    "prefill_tokens",
    "decode_tokens",
    "n_running",
)


@dataclasses.dataclass(frozen=True, eq=False)
class SimulationResult:
    """Output of :func:`simulate`.

    Attributes:
      phases: the phase table (SPEC section 2), one prefill row per request and
        one decode row per request that decodes at all, ordered by request and
        then prefill before decode. Columns ``request_id`` (str, ``r000123``;
        numbered in arrival order), ``phase_type`` (``prefill``/``decode``),
        ``t_start`` and ``t_end`` (seconds), ``prefill_tokens`` (prompt tokens
        on prefill rows, 0 on decode rows) and ``decode_tokens`` (decode steps
        on decode rows, 0 on prefill rows).
      beta: the true ``(beta0, beta1, beta2)``: seconds per step, seconds per
        prefill token, seconds per decode token.
      steps: the engine's step log, one row per step: ``step`` (index from 0),
        ``t_start`` and ``t_end`` (seconds), ``prefill_tokens`` and
        ``decode_tokens`` (tokens processed in the step, summed over requests)
        and ``n_running`` (requests admitted and not yet finished, including
        prefilling ones that got no tokens in the step).
      chunk_size: the prefill chunk size C (tokens per step per request).
      params: every argument :func:`simulate` was called with.
      requests: one row per request in arrival order: ``request_id``,
        ``arrival_time`` (seconds), ``prompt_tokens`` and ``output_tokens``.
    """

    phases: pd.DataFrame
    beta: tuple[float, float, float]
    steps: pd.DataFrame
    chunk_size: int
    params: dict[str, Any]
    requests: pd.DataFrame


# ----------------------------------------------------------------------------
# argument validation


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise ValueError(
            f"{name} must be None or an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def _check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """Return ``value`` as a finite float (> 0 if ``positive``, else >= 0)."""
    ok = _is_real(value) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_beta(beta: Any) -> tuple[float, float, float]:
    if isinstance(beta, (str, bytes)) or not isinstance(beta, (Sequence, np.ndarray)):
        raise ValueError(
            f"beta must be a sequence of three numbers (beta0, beta1, beta2), "
            f"got {beta!r}"
        )
    if len(beta) != 3:
        raise ValueError(
            f"beta must have three entries (beta0, beta1, beta2), got {beta!r}"
        )
    values = []
    for index, value in enumerate(beta):
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"beta[{index}] must be a finite number >= 0, got {value!r} "
                f"(beta={beta!r})"
            )
        values.append(float(value))
    beta0, beta1, beta2 = values
    # Every step carries at least one token, but possibly only prefill or only
    # decode tokens; each kind of step must take a positive time.
    if beta0 == 0 and (beta1 == 0 or beta2 == 0):
        raise ValueError(
            f"beta must make every step take positive time: with beta0 == 0 both "
            f"beta1 and beta2 must be > 0, got beta={beta!r}"
        )
    return beta0, beta1, beta2


def _check_distribution(name: str, dist: Any) -> tuple:
    """Validate a length distribution spec and return it as a normalised tuple.

    Returns ``("lognormal", median, sigma, lo, hi)``, ``("fixed", value)`` or
    ``("uniform", lo, hi)`` with the numbers as float/int.
    """
    usage = (
        f"{name} must be ('lognormal', median, sigma, min, max), "
        f"('fixed', value) or ('uniform', lo, hi)"
    )
    if isinstance(dist, (str, bytes)) or not isinstance(dist, Sequence) or not dist:
        raise ValueError(f"{usage}, got {dist!r}")
    kind = dist[0]
    if not isinstance(kind, str):
        raise ValueError(f"{usage}, got {dist!r}")
    kind = kind.lower()
    args = tuple(dist[1:])
    if kind == "lognormal":
        if len(args) != 4:
            raise ValueError(f"{usage}, got {dist!r}")
        median, sigma, lo, hi = args
        if not (_is_real(median) and math.isfinite(median) and median > 0):
            raise ValueError(f"{name}: lognormal median must be > 0, got {dist!r}")
        if not (_is_real(sigma) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"{name}: lognormal sigma must be >= 0, got {dist!r}")
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
            raise ValueError(
                f"{name}: lognormal min and max must be integers with "
                f"1 <= min <= max, got {dist!r}"
            )
        return ("lognormal", float(median), float(sigma), int(lo), int(hi))
    if kind == "fixed":
        if len(args) != 1 or not _is_int(args[0]) or args[0] < 1:
            raise ValueError(
                f"{name}: ('fixed', value) needs an integer value >= 1, got {dist!r}"
            )
        return ("fixed", int(args[0]))
    if kind == "uniform":
        if len(args) != 2 or not all(_is_int(a) for a in args):
            raise ValueError(
                f"{name}: ('uniform', lo, hi) needs integers, got {dist!r}"
            )
        lo, hi = args
        if not 1 <= lo <= hi:
            raise ValueError(
                f"{name}: ('uniform', lo, hi) needs 1 <= lo <= hi, got {dist!r}"
            )
        return ("uniform", int(lo), int(hi))
    raise ValueError(f"{usage}, got unknown kind {dist[0]!r} in {dist!r}")


# ----------------------------------------------------------------------------
# workload generation


def _draw_lengths(dist: tuple, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` token counts (int64, all >= 1) from a validated spec."""
    kind = dist[0]
    if kind == "lognormal":
        _, median, sigma, lo, hi = dist
        raw = median * np.exp(sigma * rng.standard_normal(n))
        return np.rint(np.clip(raw, lo, hi)).astype(np.int64)
    if kind == "fixed":
        return np.full(n, dist[1], dtype=np.int64)
    _, lo, hi = dist
    return rng.integers(lo, hi, size=n, endpoint=True, dtype=np.int64)


def _draw_arrivals(
    kind: str,
    n: int,
    rate: float,
    burst_size: int,
    t0: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Arrival times in seconds, non-decreasing, the first one at ``t0``."""
    if kind == "fixed":
        return t0 + np.arange(n, dtype=np.float64) / rate
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
        gaps[0] = 0.0
        return t0 + np.cumsum(gaps)
    n_bursts = -(-n // burst_size)
    gaps = rng.exponential(burst_size / rate, size=n_bursts)
    gaps[0] = 0.0
    return np.repeat(t0 + np.cumsum(gaps), burst_size)[:n]


class _NoiseFactors:
    """Per-step multiplicative noise factors, drawn lazily in fixed blocks.

    Factor ``k`` belongs to step ``k`` whatever the segmentation, so the drawn
    sequence (and thus the trace) depends only on the seed. The buffer grows by
    doubling, so drawing K factors costs O(K) in total.
    """

    def __init__(self, sigma: float, rng: np.random.Generator):
        self._sigma = sigma
        self._rng = rng
        self._buffer = np.empty(0, dtype=np.float64)
        self._n_drawn = 0

    def upto(self, stop: int) -> np.ndarray:
        """A buffer whose first ``stop`` entries are the factors of steps
        ``0 .. stop - 1`` (later entries are unspecified)."""
        if stop > self._n_drawn:
            n_blocks = -(-(stop - self._n_drawn) // _NOISE_BLOCK)
            needed = self._n_drawn + n_blocks * _NOISE_BLOCK
            if needed > self._buffer.size:
                grown = np.empty(max(needed, 2 * self._buffer.size), dtype=np.float64)
                grown[: self._n_drawn] = self._buffer[: self._n_drawn]
                self._buffer = grown
            for _ in range(n_blocks):
                z = self._rng.standard_normal(_NOISE_BLOCK)
                block = self._buffer[self._n_drawn : self._n_drawn + _NOISE_BLOCK]
                np.maximum(1.0 + self._sigma * z, NOISE_FACTOR_FLOOR, out=block)
                self._n_drawn += _NOISE_BLOCK
        return self._buffer


# ----------------------------------------------------------------------------
# the engine


@dataclasses.dataclass
class _EngineLog:
    """What the event loop records: segments of identical steps and, per
    request, the step indices of its phase boundaries."""

    seg_first_step: list[int]
    seg_n_steps: list[int]
    seg_t_start: list[float]
    seg_dt: list[float]  # noiseless step duration of the segment, seconds
    seg_prefill_tokens: list[int]
    seg_decode_tokens: list[int]
    seg_n_running: list[int]
    # per-step end times (arrays or lists), noisy runs only
    seg_t_ends: list | None
    first_prefill_step: list[int]
    last_prefill_step: list[int]
    last_decode_step: list[int]  # -1 for requests that never decode


def _run_engine(
    arrival: list[float],
    prompt_tokens: list[int],
    decode_steps: list[int],
    *,
    beta: tuple[float, float, float],
    chunk_size: int,
    token_budget: int,
    seq_cap: int,
    noise: _NoiseFactors | None,
    progress: bool,
) -> _EngineLog:
    """Event-driven busy loop; see the module docstring for the policy.

    Args:
      arrival: arrival times in seconds, non-decreasing.
      prompt_tokens: prompt length of each request (tokens, >= 1).
      decode_steps: decode steps of each request (>= 0).
      beta: (seconds/step, seconds/prefill token, seconds/decode token).
      chunk_size: most prefill tokens one request gets per step.
      token_budget: most tokens per step over all requests (``_UNLIMITED``).
      seq_cap: most requests running at once; must be <= ``token_budget``
        so that decodes always fit in the budget.
      noise: per-step noise factors, or None for exact step times.
      progress: show a tqdm bar over admitted requests.
    """
    beta0, beta1, beta2 = beta
    n = len(arrival)
    first_pf = [-1] * n
    last_pf = [-1] * n
    last_dec = [-1] * n
    seg_k: list[int] = []
    seg_m: list[int] = []
    seg_t: list[float] = []
    seg_dt: list[float] = []
    seg_pf: list[int] = []
    seg_dec: list[int] = []
    seg_run: list[int] = []
    seg_ends: list | None = [] if noise is not None else None

    # Running requests in prefill, FCFS: [request index, prompt tokens left].
    prefilling: list[list[int]] = []
    decode_ends: list[int] = []  # heap of the last decode step of each decoder
    n_decoding = 0
    n_arrived = 0  # arrival[:n_arrived] <= t
    n_admitted = 0  # FCFS: requests [n_admitted, n_arrived) are waiting
    step = 0  # index of the next step
    t = arrival[0] if n else 0.0  # start time of the next step, seconds

    bar = tqdm(total=n, desc="simulate", unit="req", disable=not progress)
    shown = 0
    while True:
        n_arrived = bisect.bisect_right(arrival, t, n_arrived)
        if not prefilling and not n_decoding and n_admitted == n_arrived:
            if n_admitted == n:
                break
            t = arrival[n_admitted]  # idle: jump to the next arrival
            n_arrived = bisect.bisect_right(arrival, t, n_arrived)

        # Hand out this segment's prefill tokens: running prefills first, then
        # admissions. `n_steps` is the longest run of identical steps before a
        # prefill's chunk pattern changes (last partial chunk or prompt done).
        budget_left = token_budget - n_decoding
        prefill_in_step = 0
        n_steps = _UNLIMITED
        granted: list[tuple[list[int], int]] = []
        for entry in prefilling:
            if budget_left <= 0:
                break
            left = entry[1]
            chunk = chunk_size if chunk_size < left else left
            if chunk > budget_left:
                chunk = budget_left
            budget_left -= chunk
            prefill_in_step += chunk
            granted.append((entry, chunk))
            if left // chunk < n_steps:
                n_steps = left // chunk
        n_running = len(prefilling) + n_decoding
        while n_admitted < n_arrived and n_running < seq_cap and budget_left > 0:
            request = n_admitted
            n_admitted += 1
            n_running += 1
            left = prompt_tokens[request]
            chunk = chunk_size if chunk_size < left else left
            if chunk > budget_left:
                chunk = budget_left
            budget_left -= chunk
            prefill_in_step += chunk
            entry = [request, left]
            prefilling.append(entry)
            granted.append((entry, chunk))
            first_pf[request] = step
            if left // chunk < n_steps:
                n_steps = left // chunk
        if decode_ends and decode_ends[0] - step + 1 < n_steps:
            n_steps = decode_ends[0] - step + 1

        # Cut the segment at the first step that starts at or after the next
        # arrival, so that the arrival is considered for admission there.
        dt = beta0 + beta1 * prefill_in_step + beta2 * n_decoding
        next_arrival = arrival[n_arrived] if n_arrived < n else math.inf
        if noise is None:
            if next_arrival < math.inf:
                j = max(1, math.ceil((next_arrival - t) / dt))
                while j > 1 and t + (j - 1) * dt >= next_arrival:
                    j -= 1
                while t + j * dt < next_arrival:
                    j += 1
                if j < n_steps:
                    n_steps = j
            t_next = t + n_steps * dt
        else:
            if next_arrival < math.inf:
                # Splitting a segment is harmless, so bound the noisy lookahead
                # by a generous guess of where the arrival falls.
                guess = 2 * math.ceil((next_arrival - t) / dt) + 16
                if guess < n_steps:
                    n_steps = guess
            factors = noise.upto(step + n_steps)[step : step + n_steps]
            if n_steps <= _SHORT_SEGMENT:
                # Plain Python beats NumPy's call overhead on a few steps.
                ends = []
                t_next = t
                for factor in factors.tolist():
                    t_next += dt * factor
                    ends.append(t_next)
                    if t_next >= next_arrival:
                        break
                n_steps = len(ends)
            else:
                ends = t + np.cumsum(dt * factors)
                if next_arrival < math.inf:
                    j = int(np.searchsorted(ends, next_arrival, side="left")) + 1
                    if j < n_steps:
                        n_steps = j
                        ends = ends[:j]
                t_next = float(ends[-1])
            seg_ends.append(ends)

        seg_k.append(step)
        seg_m.append(n_steps)
        seg_t.append(t)
        seg_dt.append(dt)
        seg_pf.append(prefill_in_step)
        seg_dec.append(n_decoding)
        seg_run.append(n_running)

        # Apply the segment: advance prefills, retire decoders, start decoders.
        last_step = step + n_steps - 1
        any_prefill_done = False
        for entry, chunk in granted:
            entry[1] -= chunk * n_steps
            if entry[1] == 0:
                any_prefill_done = True
        while decode_ends and decode_ends[0] <= last_step:
            heapq.heappop(decode_ends)
            n_decoding -= 1
        if any_prefill_done:
            still_prefilling = []
            for entry in prefilling:
                if entry[1]:
                    still_prefilling.append(entry)
                    continue
                request = entry[0]
                last_pf[request] = last_step
                n_decode = decode_steps[request]
                if n_decode:
                    last_dec[request] = last_step + n_decode
                    heapq.heappush(decode_ends, last_step + n_decode)
                    n_decoding += 1
            prefilling = still_prefilling
        step = last_step + 1
        t = t_next
        if n_admitted - shown >= 1024:
            bar.update(n_admitted - shown)
            shown = n_admitted
    bar.update(n_admitted - shown)
    bar.close()

    return _EngineLog(
        seg_first_step=seg_k,
        seg_n_steps=seg_m,
        seg_t_start=seg_t,
        seg_dt=seg_dt,
        seg_prefill_tokens=seg_pf,
        seg_decode_tokens=seg_dec,
        seg_n_running=seg_run,
        seg_t_ends=seg_ends,
        first_prefill_step=first_pf,
        last_prefill_step=last_pf,
        last_decode_step=last_dec,
    )


def _step_table(log: _EngineLog) -> pd.DataFrame:
    """Expand the segments into one row per step."""
    first = np.asarray(log.seg_first_step, dtype=np.int64)
    counts = np.asarray(log.seg_n_steps, dtype=np.int64)
    n_steps = int(first[-1] + counts[-1])
    seg_start = np.asarray(log.seg_t_start, dtype=np.float64)
    if log.seg_t_ends is None:
        # Same float operations as the loop's `t + n_steps * dt`, so a segment's
        # last end equals the next segment's start bit for bit.
        offset = np.arange(n_steps, dtype=np.int64) - np.repeat(first, counts)
        origin = np.repeat(seg_start, counts)
        dt = np.repeat(np.asarray(log.seg_dt, dtype=np.float64), counts)
        t_start = origin + offset * dt
        t_end = origin + (offset + 1) * dt
    else:
        t_end = np.concatenate(
            [np.asarray(ends, dtype=np.float64) for ends in log.seg_t_ends]
        )
        t_start = np.empty_like(t_end)
        t_start[1:] = t_end[:-1]
        t_start[first] = seg_start  # restores the idle jumps
    return pd.DataFrame(
        {
            "step": np.arange(n_steps, dtype=np.int64),
            "t_start": t_start,
            "t_end": t_end,
            "prefill_tokens": np.repeat(
                np.asarray(log.seg_prefill_tokens, dtype=np.int64), counts
            ),
            "decode_tokens": np.repeat(
                np.asarray(log.seg_decode_tokens, dtype=np.int64), counts
            ),
            "n_running": np.repeat(
                np.asarray(log.seg_n_running, dtype=np.int64), counts
            ),
        },
        copy=False,  # fresh arrays: skip pandas' copy (~1 s per 10M steps)
    )


def _phase_table(
    log: _EngineLog,
    steps: pd.DataFrame,
    request_ids: np.ndarray,
    prompt_tokens: np.ndarray,
    decode_steps: np.ndarray,
) -> pd.DataFrame:
    """Read each request's phases off the step boundaries."""
    t_start = steps["t_start"].to_numpy()
    t_end = steps["t_end"].to_numpy()
    first_pf = np.asarray(log.first_prefill_step, dtype=np.int64)
    last_pf = np.asarray(log.last_prefill_step, dtype=np.int64)
    last_dec = np.asarray(log.last_decode_step, dtype=np.int64)
    n = request_ids.size
    decodes = np.flatnonzero(decode_steps > 0)
    n_dec = decodes.size

    # Interleave: request r's prefill row sorts before its decode row.
    order_key = np.concatenate([2 * np.arange(n), 2 * decodes + 1])
    order = np.argsort(order_key, kind="stable")
    columns = {
        "request_id": np.concatenate([request_ids, request_ids[decodes]]),
        "phase_type": np.repeat(
            np.array(["prefill", "decode"], dtype=object), [n, n_dec]
        ),
        "t_start": np.concatenate([t_start[first_pf], t_end[last_pf[decodes]]]),
        "t_end": np.concatenate([t_end[last_pf], t_end[last_dec[decodes]]]),
        "prefill_tokens": np.concatenate(
            [prompt_tokens, np.zeros(n_dec, dtype=np.int64)]
        ),
        "decode_tokens": np.concatenate(
            [np.zeros(n, dtype=np.int64), decode_steps[decodes]]
        ),
    }
    return pd.DataFrame(
        {name: values[order] for name, values in columns.items()}, copy=False
    )


def simulate(
    n_requests: int = 1000,
    *,
    beta: Sequence[float] = (0.006, 3e-5, 1.5e-4),
    chunk_size: int = 512,
    arrival: str = "poisson",
    arrival_rate: float = 10.0,
    burst_size: int = 8,
    prompt_dist: Sequence = ("lognormal", 400, 0.8, 1, 4096),
    output_dist: Sequence = ("lognormal", 128, 0.8, 1, 1024),
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    noise_sigma: float = 0.0,
    first_token_in_prefill: bool = True,
    t0: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> SimulationResult:
    """Simulate a continuous-batching engine and return its phase trace.

    The scheduling policy is described in the module docstring. Requests are
    numbered in arrival order; the first one arrives at ``t0``.

    Args:
      n_requests: number of requests (>= 1).
      beta: true ``(beta0, beta1, beta2)``: seconds per step, seconds per
        prefill token, seconds per decode token; all >= 0, and either
        beta0 > 0 or both beta1 and beta2 > 0 so that every step takes time.
      chunk_size: most prefill tokens a request gets per step (tokens, >= 1).
        Unconstrained, a P-token prompt takes ceil(P / chunk_size) steps.
      arrival: ``"poisson"`` (exponential gaps), ``"bursty"`` (bursts of
        ``burst_size`` requests arriving together, bursts Poisson at
        ``arrival_rate / burst_size`` per second) or ``"fixed"`` (evenly
        spaced, ``1 / arrival_rate`` seconds apart).
      arrival_rate: mean arrivals per second (> 0).
      burst_size: requests per burst for ``arrival="bursty"`` (>= 1).
      prompt_dist: prompt length distribution, in tokens:
        ``("lognormal", median, sigma, min, max)`` (clipped to [min, max],
        rounded to integers), ``("fixed", value)`` or ``("uniform", lo, hi)``
        (integers, both ends included).
      output_dist: output length distribution (tokens, >= 1), same forms.
      max_num_batched_tokens: optional per-step token budget shared by all
        running requests: decode tokens first, then prefill chunks FCFS, the
        chunk at the end of the budget cut to fit. It also caps the running
        requests at this number (as vLLM requires), so decodes always fit.
      max_num_seqs: optional cap on running requests; waiting requests are
        admitted FCFS. Must not exceed ``max_num_batched_tokens`` if both are
        given.
      noise_sigma: relative step-time noise (>= 0): each step time is
        multiplied by ``max(1 + noise_sigma * z, 0.01)``, z standard normal.
      first_token_in_prefill: if True (vLLM), the last prefill step emits the
        first output token, so decode rows have ``O - 1`` steps and ``O == 1``
        requests have no decode row; if False, decode rows have ``O`` steps.
      t0: arrival time of the first request (seconds). Step times are exact
        to float64 rounding relative to t0's magnitude: with Unix-epoch t0
        (~1.7e9 s) timestamps are only good to ~1e-7 s.
      seed: seed for ``numpy.random.default_rng`` (integer >= 0). Arrivals,
        prompt lengths, output lengths and step noise use independent child
        streams, so changing ``noise_sigma`` leaves the workload unchanged.
      progress: show a tqdm progress bar over admitted requests.

    Returns:
      A :class:`SimulationResult` with the phase table, the true beta, the
      step log, the chunk size and the arguments.

    Raises:
      ValueError: an argument is out of range (the message names it and shows
        the value), or timestamps lose their step resolution (t0 too large for
        the step times).
    """
    params = {
        "n_requests": n_requests,
        "beta": tuple(beta) if isinstance(beta, (list, tuple)) else beta,
        "chunk_size": chunk_size,
        "arrival": arrival,
        "arrival_rate": arrival_rate,
        "burst_size": burst_size,
        "prompt_dist": tuple(prompt_dist)
        if isinstance(prompt_dist, list)
        else prompt_dist,
        "output_dist": tuple(output_dist)
        if isinstance(output_dist, list)
        else output_dist,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "noise_sigma": noise_sigma,
        "first_token_in_prefill": first_token_in_prefill,
        "t0": t0,
        "seed": seed,
        "progress": progress,
    }
    n = _check_int("n_requests", n_requests, 1)
    beta_true = _check_beta(beta)
    chunk = _check_int("chunk_size", chunk_size, 1)
    if arrival not in ARRIVAL_PROCESSES:
        raise ValueError(f"arrival must be one of {ARRIVAL_PROCESSES}, got {arrival!r}")
    rate = _check_real("arrival_rate", arrival_rate, positive=True)
    burst = _check_int("burst_size", burst_size, 1)
    prompt_spec = _check_distribution("prompt_dist", prompt_dist)
    output_spec = _check_distribution("output_dist", output_dist)
    budget = _check_optional_int("max_num_batched_tokens", max_num_batched_tokens, 1)
    seqs = _check_optional_int("max_num_seqs", max_num_seqs, 1)
    if budget is not None and seqs is not None and seqs > budget:
        raise ValueError(
            f"max_num_seqs ({seqs!r}) must not exceed max_num_batched_tokens "
            f"({budget!r}): every running decode needs one token of the budget"
        )
    sigma = _check_real("noise_sigma", noise_sigma)
    if not isinstance(first_token_in_prefill, (bool, np.bool_)):
        raise ValueError(
            f"first_token_in_prefill must be a bool, got {first_token_in_prefill!r}"
        )
    if not (_is_real(t0) and math.isfinite(t0)):
        raise ValueError(f"t0 must be a finite number of seconds, got {t0!r}")
    seed_value = _check_int("seed", seed, 0)
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress must be a bool, got {progress!r}")

    arrival_rng, prompt_rng, output_rng, noise_rng = (
        np.random.default_rng(child)
        for child in np.random.SeedSequence(seed_value).spawn(4)
    )
    arrival_times = _draw_arrivals(arrival, n, rate, burst, float(t0), arrival_rng)
    prompt_tokens = _draw_lengths(prompt_spec, n, prompt_rng)
    output_tokens = _draw_lengths(output_spec, n, output_rng)
    decode_steps = output_tokens - 1 if first_token_in_prefill else output_tokens.copy()

    if budget is None:
        token_budget = _UNLIMITED
        seq_cap = _UNLIMITED if seqs is None else seqs
    else:
        token_budget = budget
        seq_cap = budget if seqs is None else seqs
    log = _run_engine(
        arrival_times.tolist(),
        prompt_tokens.tolist(),
        decode_steps.tolist(),
        beta=beta_true,
        chunk_size=chunk,
        token_budget=token_budget,
        seq_cap=seq_cap,
        noise=_NoiseFactors(sigma, noise_rng) if sigma > 0 else None,
        progress=bool(progress),
    )
    steps = _step_table(log)
    if not np.all(steps["t_end"].to_numpy() > steps["t_start"].to_numpy()):
        raise ValueError(
            f"step times vanish in float64 rounding at t0={t0!r} with "
            f"beta={beta_true!r}: use a smaller t0 (e.g. 0) and shift afterwards"
        )

    width = max(6, len(str(n - 1)))
    request_ids = np.array([f"r{i:0{width}d}" for i in range(n)], dtype=object)
    phases = _phase_table(log, steps, request_ids, prompt_tokens, decode_steps)
    requests = pd.DataFrame(
        {
            "request_id": request_ids,
            "arrival_time": arrival_times,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
        }
    )
    return SimulationResult(
        phases=phases,
        beta=beta_true,
        steps=steps,
        chunk_size=chunk,
        params=params,
        requests=requests,
    )


# ----------------------------------------------------------------------------
# command line


def _parse_distribution(text: str) -> tuple:
    """Parse ``kind:a:b...`` (e.g. ``lognormal:400:0.8:1:4096``) into a tuple.

    Integer-looking fields become ints, others floats; :func:`simulate`
    validates the result.
    """
    kind, *fields = text.split(":")
    values: list[Any] = [kind]
    for field in fields:
        try:
            values.append(int(field))
        except ValueError:
            try:
                values.append(float(field))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"not a number in distribution {text!r}: {field!r}"
                ) from None
    return tuple(values)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``jaxbeta simulate`` options to ``parser``.

    Pair with :func:`run_simulate`, e.g.
    ``sub.add_parser("simulate").set_defaults(func=run_simulate)``.

    Returns:
      ``parser``, for chaining.
    """
    parser.add_argument(
        "--out", required=True, type=Path, help="output phase table: .csv or .parquet"
    )
    parser.add_argument(
        "--steps-out",
        type=Path,
        default=None,
        help="optional step log: .csv or .parquet",
    )
    parser.add_argument("--n-requests", type=int, default=1000)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=512,
        help="prefill tokens per request per step",
    )
    parser.add_argument("--beta0", type=float, default=0.006, help="seconds per step")
    parser.add_argument(
        "--beta1", type=float, default=3e-5, help="seconds per prefill token"
    )
    parser.add_argument(
        "--beta2", type=float, default=1.5e-4, help="seconds per decode token"
    )
    parser.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    parser.add_argument(
        "--arrival-rate", type=float, default=10.0, help="requests per second"
    )
    parser.add_argument("--burst-size", type=int, default=8)
    parser.add_argument(
        "--prompt-dist",
        type=_parse_distribution,
        default=("lognormal", 400, 0.8, 1, 4096),
        help="e.g. lognormal:400:0.8:1:4096, fixed:256, uniform:16:512 (tokens)",
    )
    parser.add_argument(
        "--output-dist",
        type=_parse_distribution,
        default=("lognormal", 128, 0.8, 1, 1024),
        help="same forms as --prompt-dist (tokens)",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument(
        "--noise-sigma", type=float, default=0.0, help="relative step-time noise"
    )
    parser.add_argument(
        "--no-first-token-in-prefill",
        dest="first_token_in_prefill",
        action="store_false",
        help="decode phases emit all O output tokens",
    )
    parser.add_argument(
        "--t0", type=float, default=0.0, help="first arrival time, seconds"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    return parser


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # No float_format: pandas writes the shortest repr, which round-trips.
        frame.to_csv(path, index=False)
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(
                f"writing {str(path)!r} needs pyarrow: pip install 'jaxbeta[parquet]'"
            ) from None
        frame.to_parquet(path, index=False, engine="pyarrow")
    else:
        raise ValueError(f"output file must end in .csv or .parquet, got {str(path)!r}")


def run_simulate(args: argparse.Namespace) -> int:
    """Run :func:`simulate` from parsed ``add_simulate_arguments`` options and
    write the phase table (and optionally the step log).

    Returns:
      0 (the process exit code).

    Raises:
      ValueError: an invalid option value or output suffix.
    """
    for path in (args.out, args.steps_out):
        if path is not None and path.suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise ValueError(
                f"output file must end in .csv or .parquet, got {str(path)!r}"
            )
    result = simulate(
        args.n_requests,
        beta=(args.beta0, args.beta1, args.beta2),
        chunk_size=args.chunk_size,
        arrival=args.arrival,
        arrival_rate=args.arrival_rate,
        burst_size=args.burst_size,
        prompt_dist=args.prompt_dist,
        output_dist=args.output_dist,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        noise_sigma=args.noise_sigma,
        first_token_in_prefill=args.first_token_in_prefill,
        t0=args.t0,
        seed=args.seed,
        progress=args.progress,
    )
    _write_table(result.phases, args.out)
    if args.steps_out is not None:
        _write_table(result.steps, args.steps_out)
    print(
        f"wrote {len(result.phases)} phases of {args.n_requests} requests "
        f"({len(result.steps)} steps) to {args.out}"
    )
    return 0
