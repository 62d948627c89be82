"""Tests for jaxbeta._simulate.

The fast simulator advances whole segments of identical steps; the tests
compare it with a deliberately naive engine that walks one step at a time with
explicit per-request state, and check the invariants of the trace model.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbeta._simulate import (
    NOISE_FACTOR_FLOOR,
    PHASE_COLUMNS,
    STEP_COLUMNS,
    add_simulate_arguments,
    run_simulate,
    simulate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prompt_dist": ("lognormal", 300, 0.9, 1, 2000),
    "output_dist": ("lognormal", 20, 0.8, 1, 80),
}


# ----------------------------------------------------------------------------
# naive reference engine


def naive_engine(
    arrival, prompt, n_decode, *, beta, chunk_size, budget=None, seq_cap=None
):
    """One step per iteration, one Python object per running request.

    Returns (steps, phases): steps as a list of (t_start, t_end, prefill,
    decode, n_running); phases as {request: (pf_start, pf_end, dec_end)} with
    dec_end None for requests that never decode; also the chunks each request
    got, {request: [tokens, ...]}.
    """
    if budget is not None and seq_cap is None:
        seq_cap = budget
    budget = math.inf if budget is None else budget
    seq_cap = math.inf if seq_cap is None else seq_cap
    beta0, beta1, beta2 = beta
    n = len(arrival)
    waiting: deque[int] = deque()
    running: list[dict] = []  # admission order
    next_arrival = 0
    t = arrival[0]
    steps, chunks = [], {r: [] for r in range(n)}
    pf_start, pf_end, dec_end = {}, {}, {}
    while next_arrival < n or waiting or running:
        if not waiting and not running:
            t = max(t, arrival[next_arrival])
        while next_arrival < n and arrival[next_arrival] <= t:
            waiting.append(next_arrival)
            next_arrival += 1
        decoders = [s for s in running if s["decode_left"] is not None]
        left = budget - len(decoders)
        grants = {}
        for state in running:
            if state["decode_left"] is None and left > 0:
                grants[state["id"]] = min(chunk_size, state["prompt_left"], left)
                left -= grants[state["id"]]
        while waiting and len(running) < seq_cap and left > 0:
            r = waiting.popleft()
            state = {"id": r, "prompt_left": prompt[r], "decode_left": None}
            running.append(state)
            pf_start[r] = len(steps)
            grants[r] = min(chunk_size, prompt[r], left)
            left -= grants[r]
        prefill = sum(grants.values())
        dt = beta0 + beta1 * prefill + beta2 * len(decoders)
        k = len(steps)
        steps.append((t, t + dt, prefill, len(decoders), len(running)))
        t = t + dt
        still_running = []
        for state in running:
            r = state["id"]
            if state["decode_left"] is not None:
                state["decode_left"] -= 1
                if state["decode_left"] == 0:
                    dec_end[r] = k
                    continue
            elif r in grants:
                chunks[r].append(grants[r])
                state["prompt_left"] -= grants[r]
                if state["prompt_left"] == 0:
                    pf_end[r] = k
                    if n_decode[r] == 0:
                        continue
                    state["decode_left"] = n_decode[r]
            still_running.append(state)
        running = still_running
    phases = {r: (pf_start[r], pf_end[r], dec_end.get(r)) for r in range(n)}
    return steps, phases, chunks


def run_both(**kwargs):
    """Simulate with `simulate` and replay its workload on the naive engine."""
    result = simulate(**kwargs)
    req = result.requests
    n_decode = req["output_tokens"].to_numpy() - (
        1 if kwargs.get("first_token_in_prefill", True) else 0
    )
    steps, phases, chunks = naive_engine(
        req["arrival_time"].tolist(),
        req["prompt_tokens"].tolist(),
        n_decode.tolist(),
        beta=result.beta,
        chunk_size=result.chunk_size,
        budget=kwargs.get("max_num_batched_tokens"),
        seq_cap=kwargs.get("max_num_seqs"),
    )
    return result, steps, phases, chunks


def assert_matches_naive(result, steps, phases, chunks):
    got = result.steps
    want = pd.DataFrame(
        steps,
        columns=["t_start", "t_end", "prefill_tokens", "decode_tokens", "n_running"],
    )
    assert len(got) == len(want)
    for column in ("prefill_tokens", "decode_tokens", "n_running"):
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
    for column in ("t_start", "t_end"):
        np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-9)

    # Phases from the naive step indices.
    t_start, t_end = want["t_start"].to_numpy(), want["t_end"].to_numpy()
    prompt = result.requests["prompt_tokens"].to_numpy()
    rows = []
    for r, (first, last_pf, last_dec) in phases.items():
        rid = result.requests["request_id"].iloc[r]
        assert sum(chunks[r]) == prompt[r]
        rows.append((rid, "prefill", t_start[first], t_end[last_pf], prompt[r], 0))
        if last_dec is not None:
            rows.append(
                (rid, "decode", t_end[last_pf], t_end[last_dec], 0, last_dec - last_pf)
            )
    expected = pd.DataFrame(rows, columns=list(PHASE_COLUMNS))
    ph = result.phases
    assert len(ph) == len(expected)
    np.testing.assert_array_equal(ph["request_id"], expected["request_id"])
    np.testing.assert_array_equal(ph["phase_type"], expected["phase_type"])
    for column in ("prefill_tokens", "decode_tokens"):
        np.testing.assert_array_equal(ph[column], expected[column])
    for column in ("t_start", "t_end"):
        np.testing.assert_allclose(ph[column], expected[column], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"chunk_size": 64},
        {"max_num_seqs": 4},
        {"max_num_batched_tokens": 300},
        {"max_num_batched_tokens": 200, "max_num_seqs": 6, "chunk_size": 128},
        {"arrival": "bursty", "burst_size": 5},
        {"arrival": "fixed", "arrival_rate": 3.0},
        {"first_token_in_prefill": False},
        {"output_dist": ("uniform", 1, 3)},
    ],
    ids=lambda extra: ",".join(f"{k}={v}" for k, v in extra.items()) or "default",
)
def test_matches_naive_engine(extra):
    kwargs = {
        "n_requests": 120,
        "chunk_size": 256,
        "arrival_rate": 40.0,
        **SMALL,
        "seed": 7,
        **extra,
    }
    assert_matches_naive(*run_both(**kwargs))


@settings(max_examples=30, deadline=None)
@given(
    n_requests=st.integers(1, 25),
    chunk_size=st.integers(1, 300),
    rate=st.floats(0.5, 500.0),
    budget=st.one_of(st.none(), st.integers(1, 600)),
    seqs=st.one_of(st.none(), st.integers(1, 12)),
    first_token=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_naive_engine_random(
    n_requests, chunk_size, rate, budget, seqs, first_token, seed
):
    if budget is not None and seqs is not None:
        seqs = min(seqs, budget)
    assert_matches_naive(
        *run_both(
            n_requests=n_requests,
            chunk_size=chunk_size,
            arrival_rate=rate,
            max_num_batched_tokens=budget,
            max_num_seqs=seqs,
            first_token_in_prefill=first_token,
            prompt_dist=("uniform", 1, 700),
            output_dist=("uniform", 1, 30),
            seed=seed,
        )
    )


# ----------------------------------------------------------------------------
# invariants of the trace itself


def step_windows(result):
    """Per phase, the first and last step index inside its window."""
    steps = result.steps
    starts = steps["t_start"].to_numpy()
    ends = steps["t_end"].to_numpy()
    ph = result.phases
    first = np.searchsorted(starts, ph["t_start"].to_numpy(), side="left")
    last = np.searchsorted(ends, ph["t_end"].to_numpy(), side="left")
    # Decode windows begin where the prefill's last step ends: the first decode
    # step is the one starting there.
    return first, last


@pytest.fixture(scope="module")
def moderate():
    return simulate(400, chunk_size=128, arrival_rate=12.0, seed=3, **SMALL)


def test_schema(moderate):
    assert tuple(moderate.phases.columns) == PHASE_COLUMNS
    assert tuple(moderate.steps.columns) == STEP_COLUMNS
    ph = moderate.phases
    assert set(ph["phase_type"]) == {"prefill", "decode"}
    assert (ph.loc[ph["phase_type"] == "prefill", "decode_tokens"] == 0).all()
    assert (ph.loc[ph["phase_type"] == "decode", "prefill_tokens"] == 0).all()
    assert ph["request_id"].iloc[0] == "r000000"
    assert (ph.groupby("request_id")["phase_type"].first() == "prefill").all()
    assert moderate.beta == (0.006, 3e-5, 1.5e-4)
    assert moderate.chunk_size == 128
    assert moderate.params["n_requests"] == 400
    assert moderate.params["arrival_rate"] == 12.0
    assert set(moderate.params) >= {"beta", "noise_sigma", "seed", "t0"}


def test_step_times_follow_beta(moderate):
    steps = moderate.steps
    beta0, beta1, beta2 = moderate.beta
    expected = beta0 + beta1 * steps["prefill_tokens"] + beta2 * steps["decode_tokens"]
    np.testing.assert_allclose(
        steps["t_end"] - steps["t_start"], expected, rtol=1e-9, atol=0
    )


def test_busy_time_is_sum_of_step_times(moderate):
    steps = moderate.steps
    assert (steps["step"].to_numpy() == np.arange(len(steps))).all()
    gaps = steps["t_start"].to_numpy()[1:] - steps["t_end"].to_numpy()[:-1]
    assert (gaps >= 0).all()  # steps never overlap; gaps are idle time
    # Busy time from the phase table: the union of all phase windows.
    ph = moderate.phases.sort_values("t_start")
    busy, reach = 0.0, -np.inf
    for start, end in zip(ph["t_start"], ph["t_end"], strict=True):
        if start > reach:
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    step_time = (steps["t_end"] - steps["t_start"]).sum()
    assert busy == pytest.approx(step_time, rel=1e-12)
    assert (gaps > 0).any()  # this load does go idle at times


def test_step_log_adds_up_to_phases(moderate):
    """Rebuild each step's tokens from the phases: chunk_size per prefill step
    with the remainder in the last one, one token per decode step."""
    ph = moderate.phases
    steps = moderate.steps
    chunk = moderate.chunk_size
    first, last = step_windows(moderate)
    n_steps = last - first + 1
    is_pf = (ph["phase_type"] == "prefill").to_numpy()
    prompt = ph["prefill_tokens"].to_numpy()
    decode = ph["decode_tokens"].to_numpy()
    # Unconstrained: a P-token prompt takes ceil(P / C) steps; decode takes D.
    np.testing.assert_array_equal(n_steps[is_pf], -(-prompt[is_pf] // chunk))
    np.testing.assert_array_equal(n_steps[~is_pf], decode[~is_pf])

    prefill_per_step = np.zeros(len(steps), dtype=np.int64)
    decode_per_step = np.zeros(len(steps), dtype=np.int64)
    for i in np.flatnonzero(is_pf):
        request_chunks = np.full(n_steps[i], chunk)
        request_chunks[-1] = prompt[i] - chunk * (n_steps[i] - 1)
        assert request_chunks.sum() == prompt[i] and request_chunks[-1] > 0
        prefill_per_step[first[i] : last[i] + 1] += request_chunks
    for i in np.flatnonzero(~is_pf):
        decode_per_step[first[i] : last[i] + 1] += 1
    np.testing.assert_array_equal(prefill_per_step, steps["prefill_tokens"])
    np.testing.assert_array_equal(decode_per_step, steps["decode_tokens"])
    assert steps["prefill_tokens"].sum() == prompt.sum()
    assert steps["decode_tokens"].sum() == decode.sum()


def test_phases_are_ordered_per_request(moderate):
    ph = moderate.phases
    assert (ph["t_end"] > ph["t_start"]).all()
    pf = ph[ph["phase_type"] == "prefill"].set_index("request_id")
    dec = ph[ph["phase_type"] == "decode"].set_index("request_id")
    assert pf.index.is_unique and dec.index.is_unique
    joined = dec.merge(pf, left_index=True, right_index=True, suffixes=("_dec", "_pf"))
    # Decode starts exactly where prefill ends: no overlap, no gap.
    assert (joined["t_start_dec"] == joined["t_end_pf"]).all()
    arrival = moderate.requests.set_index("request_id")["arrival_time"]
    assert (pf["t_start"] >= arrival.loc[pf.index]).all()
    # Steps start at step boundaries: every timestamp is a step boundary.
    boundaries = set(moderate.steps["t_start"]) | set(moderate.steps["t_end"])
    assert set(ph["t_start"]) <= boundaries and set(ph["t_end"]) <= boundaries


def test_first_request_arrives_at_t0():
    result = simulate(5, t0=100.0, **SMALL)
    assert result.requests["arrival_time"].iloc[0] == 100.0
    assert result.phases["t_start"].min() == 100.0


@pytest.mark.parametrize(
    ("budget", "seqs"), [(None, 5), (256, None), (300, 20), (64, 8)]
)
def test_caps_hold_in_every_step(budget, seqs):
    result = simulate(
        300,
        chunk_size=96,
        arrival_rate=60.0,
        max_num_batched_tokens=budget,
        max_num_seqs=seqs,
        seed=11,
        **SMALL,
    )
    steps = result.steps
    tokens = steps["prefill_tokens"] + steps["decode_tokens"]
    cap = seqs if seqs is not None else budget  # a budget also caps running
    assert (steps["n_running"] <= cap).all()
    if seqs is not None:
        assert steps["n_running"].max() == seqs  # the load is high enough to bind
    assert (steps["decode_tokens"] <= steps["n_running"]).all()
    if budget is not None:
        assert (tokens <= budget).all()
        assert (tokens == budget).any()
    # No request gets more than chunk_size prefill tokens in a step.
    first, last = step_windows(result)
    is_pf = (result.phases["phase_type"] == "prefill").to_numpy()
    prompt = result.phases["prefill_tokens"].to_numpy()
    assert (last[is_pf] - first[is_pf] + 1 >= -(-prompt[is_pf] // 96)).all()
    prefilling = np.zeros(len(steps), dtype=np.int64)
    for i in np.flatnonzero(is_pf):
        prefilling[first[i] : last[i] + 1] += 1
    assert (steps["prefill_tokens"].to_numpy() <= 96 * prefilling).all()


def test_seed_reproduces_and_noise_keeps_workload():
    a = simulate(200, seed=5, noise_sigma=0.2, **SMALL)
    b = simulate(200, seed=5, noise_sigma=0.2, **SMALL)
    pd.testing.assert_frame_equal(a.phases, b.phases)
    pd.testing.assert_frame_equal(a.steps, b.steps)
    c = simulate(200, seed=6, noise_sigma=0.2, **SMALL)
    assert not a.requests["arrival_time"].equals(c.requests["arrival_time"])
    quiet = simulate(200, seed=5, **SMALL)
    pd.testing.assert_frame_equal(a.requests, quiet.requests)


def test_noise_scales_step_times():
    sigma = 0.2
    result = simulate(
        300, seed=2, noise_sigma=sigma, arrival_rate=30.0, chunk_size=64, **SMALL
    )
    steps = result.steps
    beta0, beta1, beta2 = result.beta
    base = beta0 + beta1 * steps["prefill_tokens"] + beta2 * steps["decode_tokens"]
    factor = ((steps["t_end"] - steps["t_start"]) / base).to_numpy()
    assert factor.min() >= NOISE_FACTOR_FLOOR * (1 - 1e-9)
    assert factor.mean() == pytest.approx(1.0, abs=0.02)
    assert factor.std() == pytest.approx(sigma, rel=0.1)
    ph = result.phases
    assert (ph["t_end"] > ph["t_start"]).all()
    first, last = step_windows(result)
    is_pf = (ph["phase_type"] == "prefill").to_numpy()
    np.testing.assert_array_equal(
        (last - first + 1)[~is_pf], ph["decode_tokens"].to_numpy()[~is_pf]
    )


def test_single_token_outputs_have_no_decode_row():
    result = simulate(50, output_dist=("fixed", 1), seed=1)
    assert (result.phases["phase_type"] == "prefill").all()
    assert len(result.phases) == 50
    assert result.steps["decode_tokens"].sum() == 0

    mixed = simulate(100, output_dist=("uniform", 1, 3), seed=1)
    out = mixed.requests.set_index("request_id")["output_tokens"]
    dec = mixed.phases[mixed.phases["phase_type"] == "decode"]
    assert set(dec["request_id"]) == set(out.index[out > 1])
    np.testing.assert_array_equal(
        dec["decode_tokens"], out.loc[dec["request_id"]].to_numpy() - 1
    )


def test_first_token_not_in_prefill():
    result = simulate(
        60, output_dist=("uniform", 1, 4), first_token_in_prefill=False, seed=4
    )
    dec = result.phases[result.phases["phase_type"] == "decode"]
    assert len(dec) == 60  # even O == 1 requests decode once
    out = result.requests.set_index("request_id")["output_tokens"]
    np.testing.assert_array_equal(
        dec["decode_tokens"], out.loc[dec["request_id"]].to_numpy()
    )
    assert result.steps["decode_tokens"].sum() == out.sum()


def test_arrival_processes():
    fixed = simulate(10, arrival="fixed", arrival_rate=4.0, t0=1.0)
    np.testing.assert_allclose(
        fixed.requests["arrival_time"], 1.0 + np.arange(10) / 4.0
    )
    bursty = simulate(20, arrival="bursty", burst_size=8, seed=3)
    counts = bursty.requests.groupby("arrival_time").size().to_numpy()
    np.testing.assert_array_equal(counts, [8, 8, 4])
    poisson = simulate(4000, arrival_rate=50.0, seed=3)
    gaps = np.diff(poisson.requests["arrival_time"].to_numpy())
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.05)


def test_length_distributions():
    result = simulate(
        3000,
        prompt_dist=("lognormal", 400, 0.8, 10, 2000),
        output_dist=("uniform", 3, 9),
        arrival_rate=1000.0,
        seed=8,
    )
    prompt = result.requests["prompt_tokens"]
    assert prompt.min() >= 10 and prompt.max() <= 2000
    assert prompt.median() == pytest.approx(400, rel=0.1)
    out = result.requests["output_tokens"]
    assert set(out) == set(range(3, 10))


# ----------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_requests": 0}, "n_requests"),
        ({"n_requests": 2.5}, "n_requests"),
        ({"n_requests": True}, "n_requests"),
        ({"beta": (0.1, 0.2)}, "beta"),
        ({"beta": (0.1, -1e-5, 0.0)}, "beta[1]"),
        ({"beta": (float("nan"), 1e-5, 1e-5)}, "beta[0]"),
        ({"beta": (0.0, 1e-5, 0.0)}, "beta0 == 0"),
        ({"beta": "abc"}, "beta"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"arrival": "gamma"}, "arrival"),
        ({"arrival_rate": 0.0}, "arrival_rate"),
        ({"arrival_rate": float("inf")}, "arrival_rate"),
        ({"burst_size": 0}, "burst_size"),
        ({"prompt_dist": ("normal", 1, 2)}, "prompt_dist"),
        ({"prompt_dist": ("lognormal", 400, 0.8, 0, 10)}, "prompt_dist"),
        ({"prompt_dist": ("lognormal", -1, 0.8, 1, 10)}, "prompt_dist"),
        ({"output_dist": ("fixed", 0)}, "output_dist"),
        ({"output_dist": ("uniform", 5, 2)}, "output_dist"),
        ({"output_dist": "fixed"}, "output_dist"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_seqs": -3}, "max_num_seqs"),
        ({"max_num_seqs": 300, "max_num_batched_tokens": 256}, "max_num_seqs"),
        ({"noise_sigma": -0.1}, "noise_sigma"),
        ({"first_token_in_prefill": 1}, "first_token_in_prefill"),
        ({"t0": float("nan")}, "t0"),
        ({"seed": -1}, "seed"),
        ({"progress": "yes"}, "progress"),
    ],
)
def test_invalid_arguments(kwargs, needle):
    with pytest.raises(ValueError) as info:
        simulate(**kwargs)
    message = str(info.value)
    assert needle in message
    value = next(iter(kwargs.values()))
    assert repr(value) in message or repr(kwargs.get("max_num_seqs")) in message


def test_epoch_t0_too_coarse_is_rejected():
    with pytest.raises(ValueError, match="t0"):
        simulate(3, t0=1.7e18, **SMALL)


# ----------------------------------------------------------------------------
# command line and bundled data


def parse(argv):
    return add_simulate_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_csv_round_trips_floats(tmp_path):
    out = tmp_path / "trace.csv"
    steps_out = tmp_path / "steps.csv"
    args = parse(
        [
            "--n-requests", "40", "--chunk-size", "128", "--beta0", "0.005",
            "--beta1", "2e-5", "--beta2", "1e-4", "--arrival-rate", "20",
            "--seed", "9", "--out", str(out), "--steps-out", str(steps_out),
            "--prompt-dist", "uniform:10:400", "--output-dist", "lognormal:20:0.5:1:60",
        ]
    )  # fmt: skip
    assert run_simulate(args) == 0
    expected = simulate(
        40,
        chunk_size=128,
        beta=(0.005, 2e-5, 1e-4),
        arrival_rate=20.0,
        seed=9,
        prompt_dist=("uniform", 10, 400),
        output_dist=("lognormal", 20, 0.5, 1, 60),
    )
    written = pd.read_csv(out)
    for column in ("t_start", "t_end"):
        np.testing.assert_array_equal(written[column], expected.phases[column])
    np.testing.assert_array_equal(written["request_id"], expected.phases["request_id"])
    assert len(pd.read_csv(steps_out)) == len(expected.steps)


def test_cli_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "trace.parquet"
    run_simulate(parse(["--n-requests", "15", "--out", str(out)]))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out), simulate(15).phases, check_dtype=False, check_exact=True
    )


def test_cli_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="trace.txt"):
        run_simulate(parse(["--out", str(tmp_path / "trace.txt")]))
    with pytest.raises(SystemExit):
        parse(["--out", "x.csv", "--prompt-dist", "fixed:abc"])


def test_bundled_sample_trace_is_current():
    script = REPO_ROOT / "benchmarks" / "make_sample_trace.py"
    spec = importlib.util.spec_from_file_location("make_sample_trace", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundled = pd.read_csv(REPO_ROOT / "jaxbeta" / "data" / "sample_trace.csv")
    regenerated = module.make_sample_trace().phases
    assert 350 <= len(bundled) <= 450
    assert tuple(bundled.columns) == PHASE_COLUMNS
    pd.testing.assert_frame_equal(
        bundled, regenerated, check_dtype=False, check_exact=True
    )
