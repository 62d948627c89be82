"""Tests for result exports (jaxbeta._export) and plots (jaxbeta._plot)."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

import jaxbeta
from jaxbeta._export import (
    blis_cli_args,
    input_fingerprint,
    to_blis,
    to_record,
    write_blis,
    write_json,
    write_yaml,
)
from jaxbeta._plot import phase_concurrency, plot_fit, predicted_durations
from jaxbeta._results import BaselineResult, IterativeResult, StopReason


def _phases() -> pd.DataFrame:
    """SPEC section 9's worked example, in seconds."""
    return pd.DataFrame(
        {
            "request_id": ["A", "A", "B", "B"],
            "phase_type": ["prefill", "decode", "prefill", "decode"],
            "t_start": [0.0, 2.0, 1.0, 3.0],
            "t_end": [2.0, 6.0, 3.0, 5.0],
            "prefill_tokens": [96, 0, 64, 0],
            "decode_tokens": [0, 4, 0, 2],
        }
    )


def _baseline(features: pd.DataFrame | None = None) -> BaselineResult:
    return BaselineResult(
        beta0=5.752705191348184e-3,
        beta1=1.725086436834028e-5,
        beta2=5.999143920128404e-6,
        diagnostics={
            "n_phases": np.int64(4),
            "r2": np.float64(0.85),
            "rmse_seconds": 0.33,
            "cond_scaled": np.float64(np.inf),
            "mean_A_pf_tokens": float("nan"),
            "warnings": ("beta2 is weakly identified",),
        },
        features=pd.DataFrame() if features is None else features,
        chunk_size=64.0,
        settings={"correction": "end", "min_duration_sec": np.float64(0.0)},
    )


def _iterative(features: pd.DataFrame | None = None) -> IterativeResult:
    history = {
        "beta": [(0.01, 1e-3, 0.0), (0.002, 1.5e-2, 0.5), (0.0, 1.63e-2, 0.566)],
        "delta_beta_l2": [0.5, 0.06],
        "r2": [0.8, 0.87],
        "rmse_seconds": [0.4, 0.3],
    }
    return IterativeResult(
        beta0=0.0,
        beta1=0.016305,
        beta2=0.56623,
        converged=False,
        n_outer_iters=np.int64(2),
        stop_reason=StopReason.MAX_ITERS,
        diagnostics={"final_r2": 0.872478801097554, "final_delta_beta_l2": 0.06},
        history=history,
        features=pd.DataFrame() if features is None else features,
        chunk_size=64,
        settings={"max_outer_iters": 2, "tol": 1e-6, "damping_eta": 1.0},
    )


# --------------------------------------------------------------------------
# Canonical record
# --------------------------------------------------------------------------


def test_record_of_baseline_is_plain_json():
    record = to_record(_baseline(), phases=_phases())
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["jaxbeta_version"] == jaxbeta.__version__
    assert record["algo"] == "baseline"
    assert record["beta"] == {
        "beta0": 5.752705191348184e-3,
        "beta1": 1.725086436834028e-5,
        "beta2": 5.999143920128404e-6,
    }
    assert record["units"]["beta1"] == "s/prefill_token"
    assert record["chunk_size"] == 64.0
    assert record["stop_reason"] == "converged"
    assert record["converged"] is True
    assert "n_outer_iters" not in record
    diag = record["diagnostics"]
    assert diag["n_phases"] == 4 and type(diag["n_phases"]) is int
    assert diag["cond_scaled"] is None  # inf -> null
    assert diag["mean_A_pf_tokens"] is None  # NaN -> null
    assert diag["warnings"] == ["beta2 is weakly identified"]
    assert record["settings"] == {"correction": "end", "min_duration_sec": 0.0}
    assert record["input_fingerprint"] == input_fingerprint(_phases())


def test_record_of_iterative_keeps_iterations_and_history():
    record = to_record(_iterative())
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["algo"] == "iterative"
    assert record["stop_reason"] == "max_iters"
    assert record["converged"] is False
    assert record["n_outer_iters"] == 2
    assert record["history"]["beta"][2] == [0.0, 1.63e-2, 0.566]
    assert record["input_fingerprint"] is None


def test_write_json_and_yaml_round_trip(tmp_path):
    yaml = pytest.importorskip("yaml")
    result, phases = _iterative(), _phases()
    expected = to_record(result, phases=phases)
    path = write_json(result, tmp_path / "fit.json", phases=phases)
    assert json.loads(path.read_text()) == expected
    path = write_yaml(result, tmp_path / "fit.yaml", phases=phases)
    assert yaml.safe_load(path.read_text()) == expected


def test_yaml_writers_explain_missing_pyyaml(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(ImportError, match=r"write_yaml needs PyYAML"):
        write_yaml(_baseline(), tmp_path / "fit.yaml")
    with pytest.raises(ImportError, match=r"write_blis needs PyYAML"):
        write_blis(_baseline(), tmp_path / "blis.yaml", model_id="m")


def test_fingerprint_follows_its_documented_recipe():
    phases = _phases().iloc[[2, 0]]  # B prefill, A prefill: sorting puts A first
    header = "request_id\tphase_type\tt_start\tt_end\tprefill_tokens\tdecode_tokens"
    text = "\n".join(
        [header, "'A'\t'prefill'\t0.0\t2.0\t96\t0", "'B'\t'prefill'\t1.0\t3.0\t64\t0"]
    )
    assert input_fingerprint(phases) == hashlib.sha256(text.encode()).hexdigest()


def test_fingerprint_ignores_order_extras_and_case_but_not_values():
    phases = _phases()
    reference = input_fingerprint(phases)
    shuffled = phases.sample(frac=1.0, random_state=3).assign(extra=1)
    shuffled["phase_type"] = shuffled["phase_type"].str.upper()
    assert input_fingerprint(shuffled) == reference
    nudged = phases.copy()
    nudged.loc[1, "t_end"] = np.nextafter(6.0, 7.0)
    assert input_fingerprint(nudged) != reference
    with_steps = phases.assign(N_steps=[2, 4, 1, 2])
    assert input_fingerprint(with_steps) != reference
    mixed = phases.assign(request_id=["A", "A", 2, 2])
    assert len(input_fingerprint(mixed)) == 64
    with pytest.raises(ValueError, match=r"missing column\(s\) \['t_end'\]"):
        input_fingerprint(phases.drop(columns="t_end"))


# --------------------------------------------------------------------------
# BLIS
# --------------------------------------------------------------------------


def test_blis_entry_is_in_microseconds():
    result = _baseline()
    entry = to_blis(
        result,
        model_id="meta-llama/llama-3.1-8b-instruct",
        gpu="H100",
        tensor_parallelism=2,
        vllm_version="vllm/vllm-openai:v0.8.4",
        alpha_coeffs=(232.5, 1.75, 3357.4),
    )
    assert entry == {
        "id": "meta-llama/llama-3.1-8b-instruct",
        "GPU": "H100",
        "tensor_parallelism": 2,
        "vllm_version": "vllm/vllm-openai:v0.8.4",
        "alpha_coeffs": [232.5, 1.75, 3357.4],
        "beta_coeffs": [
            result.beta0 * 1e6,
            result.beta1 * 1e6,
            result.beta2 * 1e6,
        ],
    }
    # 5.75 ms per step is 5752.7 microseconds.
    assert entry["beta_coeffs"][0] == pytest.approx(5752.705191348184, rel=1e-15)
    assert entry["beta_coeffs"][1] == pytest.approx(17.25086436834028, rel=1e-15)


def test_write_blis_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    result = _baseline()
    path = write_blis(result, tmp_path / "blis.yaml", model_id="m", gpu="A100-80")
    loaded = yaml.safe_load(path.read_text())
    assert loaded == {"models": [to_blis(result, model_id="m", gpu="A100-80")]}


def test_blis_cli_args_full_precision():
    result = _baseline()
    args = blis_cli_args(result, alpha_coeffs=(1.0, 2.5, 0.0))
    b = [result.beta0 * 1e6, result.beta1 * 1e6, result.beta2 * 1e6]
    assert args == (
        "--latency-model blackbox --alpha-coeffs 1.0,2.5,0.0 "
        f"--beta-coeffs {b[0]!r},{b[1]!r},{b[2]!r}"
    )
    betas = [float(v) for v in args.split("--beta-coeffs ")[1].split(",")]
    assert betas == to_blis(result, model_id="m")["beta_coeffs"]


def test_blis_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite betas"):
        to_blis(BaselineResult(math.nan, 0.0, 0.0, {}, pd.DataFrame()), model_id="m")
    with pytest.raises(ValueError, match="alpha_coeffs must be three"):
        blis_cli_args(_baseline(), alpha_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="tensor_parallelism"):
        to_blis(_baseline(), model_id="m", tensor_parallelism=0)
    with pytest.raises(ValueError, match="model_id"):
        to_blis(_baseline(), model_id="")


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    return matplotlib


def _baseline_features() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "N_i": [2.0, 4.0, 1.0, 2.0],
            "T_i": [2.0, 4.0, 2.0, 2.0],
            "A_pf_i": [96.0, 64.0, 112.0, 0.0],
            "A_dec_i": [0.0, 4.0, 2.0, 3.0],
        }
    )


def test_predicted_durations():
    result = _baseline(_baseline_features())
    observed, predicted = predicted_durations(result)
    np.testing.assert_array_equal(observed, [2.0, 4.0, 2.0, 2.0])
    n, a_pf, a_dec = 4.0, 64.0, 4.0
    expected = n * result.beta0 + a_pf * result.beta1 + a_dec * result.beta2
    assert predicted[1] == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match=r"lacks column\(s\)"):
        predicted_durations(_baseline())


def test_phase_concurrency_on_worked_example():
    edges, n_pf, n_dec = phase_concurrency(_phases())
    np.testing.assert_array_equal(edges, [0.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    np.testing.assert_array_equal(n_pf, [1, 2, 1, 0, 0])
    np.testing.assert_array_equal(n_dec, [0, 0, 1, 2, 1])


def test_phase_concurrency_matches_brute_force():
    rng = np.random.default_rng(1)
    start = np.round(rng.uniform(0, 10, 60), 1)
    phases = pd.DataFrame(
        {
            "phase_type": rng.choice(["prefill", "Decode"], 60),
            "t_start": start,
            "t_end": start + np.round(rng.uniform(0.1, 3, 60), 1),
        }
    )
    edges, n_pf, n_dec = phase_concurrency(phases)
    kind = phases["phase_type"].str.lower().to_numpy()
    t0, t1 = phases["t_start"].to_numpy(), phases["t_end"].to_numpy()
    for j, g in enumerate(edges[:-1]):
        on = (t0 <= g) & (g < t1)
        assert n_pf[j] == np.sum(on & (kind == "prefill"))
        assert n_dec[j] == np.sum(on & (kind == "decode"))


def test_plot_baseline_writes_png(agg, tmp_path):
    path = tmp_path / "fit.png"
    fig = plot_fit(_baseline(_baseline_features()), _phases(), path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3  # fit, concurrency, intervals


def test_plot_iterative_shows_beta_history(agg, tmp_path):
    features = _baseline_features().rename(
        columns={"A_pf_i": "exp_pf", "A_dec_i": "exp_dec"}
    )
    fig = plot_fit(_iterative(features), path=tmp_path / "it.png")
    assert len(fig.axes) == 4  # fit + three beta histories
    assert (tmp_path / "it.png").stat().st_size > 0


def test_plot_explains_missing_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"jaxbeta\[plot\]"):
        plot_fit(_baseline(_baseline_features()))
