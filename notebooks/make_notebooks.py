"""Writes the example notebooks of this folder, without outputs.

Run from anywhere: ``python notebooks/make_notebooks.py``. Each notebook is
a list of markdown and code cells below; edit them here and regenerate, so
the committed ``.ipynb`` files stay output-free and reviewable as Python.
``tests/test_notebooks.py`` executes every notebook and checks that it
draws at least one figure.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _cells(parts: list[tuple[str, str]]) -> list:
    """Notebook cells from (kind, source) pairs; kind is "md" or "code".

    Cell ids are numbered rather than random, so regenerating an unchanged
    notebook rewrites the same file.
    """
    makers = {"md": new_markdown_cell, "code": new_code_cell}
    return [
        makers[kind](source.strip("\n"), id=f"cell-{index:02d}")
        for index, (kind, source) in enumerate(parts)
    ]


def _write(name: str, parts: list[tuple[str, str]]) -> Path:
    notebook = new_notebook(
        cells=_cells(parts),
        metadata={
            "kernelspec": KERNELSPEC,
            "language_info": {"name": "python"},
        },
    )
    nbformat.validate(notebook)
    path = HERE / name
    nbformat.write(notebook, path)
    return path


# ---------------------------------------------------------------------------
# 01_batched_fitting.ipynb
# ---------------------------------------------------------------------------

BATCHED_FITTING = [
    (
        "md",
        """
# Fitting many traces at once with `fit_many`

This notebook simulates a family of workloads whose step-time coefficients
are known (`jaxbeta.simulate`), fits all of them in one call of
`jaxbeta.fit_many` (iterative estimator), and compares the fitted
coefficients with the truth and with each other. It then shows what
happens when one trace in the batch is malformed, and times the batched
call against a plain Python loop of `jaxbeta.estimate_betas_iterative`.

The model being fitted: every engine step takes
`beta0 + beta1 * prefill_tokens + beta2 * decode_tokens` seconds, with
beta0 in s/step and beta1, beta2 in s/token.

`SCALE` below is the only size knob: it is the number of copies (different
random seeds) of each workload. At `SCALE = 1` the notebook runs in under
a minute on a 2-core CPU, most of it compiling; on a GPU raise it (say to
50) to see whether batching pays off there.
""",
    ),
    (
        "code",
        """
%matplotlib inline
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import jaxbeta

SCALE = 1  # copies of each workload; the one number to change
""",
    ),
    (
        "md",
        """
## 1. A family of simulated workloads

Every workload runs on the same simulated engine (the same true betas, 5%
step-time noise) but differs in load (arrivals per second), in the mix of
prompt and output lengths, and in the prefill chunk size C. All traces
have the same number of requests, and every request decodes at least one
token, so each trace has exactly twice as many phases as requests. That
keeps every trace in one padded size bucket: `fit_many` compiles one
program per bucket, and compiling is what costs time on a CPU.
""",
    ),
    (
        "code",
        """
TRUE_BETA = (0.006, 3e-5, 1.5e-4)  # s/step, s/prefill token, s/decode token
BETAS = ["beta0", "beta1", "beta2"]
N_REQUESTS = 150  # 300 phases per trace: all in the 512-row bucket
LOADS = {"light": 2.0, "medium": 8.0, "heavy": 24.0}  # arrivals per second
MIXES = {  # (kind, median, sigma, min, max) in tokens
    "chat": dict(
        prompt_dist=("lognormal", 400, 0.8, 16, 4096),
        output_dist=("lognormal", 150, 0.8, 2, 1024),
    ),
    "long-prompt": dict(
        prompt_dist=("lognormal", 1500, 0.5, 64, 8192),
        output_dist=("lognormal", 60, 0.6, 2, 512),
    ),
    "long-output": dict(
        prompt_dist=("lognormal", 150, 0.6, 8, 2048),
        output_dist=("lognormal", 400, 0.6, 2, 2048),
    ),
}
CHUNK_SIZES = (256, 512)

sims, configs = {}, {}
for copy in range(SCALE):
    for load, rate in LOADS.items():
        for mix, lengths in MIXES.items():
            for chunk in CHUNK_SIZES:
                config = f"{load} / {mix} / C={chunk}"
                name = config if SCALE == 1 else f"{config} #{copy}"
                sims[name] = jaxbeta.simulate(
                    N_REQUESTS,
                    beta=TRUE_BETA,
                    chunk_size=chunk,
                    arrival_rate=rate,
                    noise_sigma=0.05,
                    seed=len(sims),
                    **lengths,
                )
                configs[name] = dict(load=load, mix=mix, chunk_size=chunk)

traces = {name: sim.phases for name, sim in sims.items()}
chunk_sizes = {name: sim.chunk_size for name, sim in sims.items()}
n_phases = pd.Series({name: len(table) for name, table in traces.items()})
buckets = sorted({jaxbeta.bucket_size(n) for n in n_phases})
print(
    f"{len(traces)} traces of {n_phases.min()}-{n_phases.max()} phases; "
    f"padded sizes (one compiled program each): {buckets}"
)
traces[next(iter(traces))].head()
""",
    ),
    (
        "md",
        """
## 2. One call fits them all

`fit_many` takes a mapping name -> phase table and a chunk size per trace
(here each trace's own, known C). It validates and pads every trace on the
host, then fits each bucket in one `jax.vmap`-ed, jit-compiled call. The
first call includes compiling that program; later calls with the same
bucket and batch length reuse it.
""",
    ),
    (
        "code",
        """
start = time.perf_counter()
fits = jaxbeta.fit_many(traces, chunk_size=chunk_sizes, progress=False)
first_call = time.perf_counter() - start
print(f"first fit_many call: {first_call:.1f} s (mostly compiling)")
fits[BETAS + ["n_outer_iters", "stop_reason", "r2", "rmse_seconds"]]
""",
    ),
    (
        "md",
        """
## 3. Fitted betas against the truth

Relative error = (fitted - true) / true, in percent, per coefficient and
workload. With `SCALE > 1` each bar is the median over a workload's copies
and the black line spans their range. Bars beyond +/-30% are cut there and
labelled with their value. Red marks fits whose r2 is below 0.99: a warning
one can see without knowing the truth.
""",
    ),
    (
        "code",
        """
truth = pd.Series(TRUE_BETA, index=BETAS)
rel_err = 100 * (fits[BETAS] - truth) / truth  # percent
config = pd.Series([name.split(" #")[0] for name in fits.index], index=fits.index)
summary = rel_err.groupby(config, sort=False).agg(["median", "min", "max"])
flagged = (fits["r2"] < 0.99).groupby(config, sort=False).any()
colors = np.where(flagged.reindex(summary.index), "tab:red", "tab:blue")
CLIP = 30  # percent: longer bars are cut at this and labelled with their value

fig, axes = plt.subplots(1, 3, figsize=(13, 0.32 * len(summary) + 1.5), sharey=True)
y = np.arange(len(summary))
for ax, beta in zip(axes, BETAS):
    median = summary[(beta, "median")].to_numpy()
    ax.barh(y, np.clip(median, -CLIP, CLIP), color=colors, alpha=0.85)
    low, high = summary[(beta, "min")], summary[(beta, "max")]
    ax.hlines(y, low.clip(-CLIP, CLIP), high.clip(-CLIP, CLIP), color="k", lw=1)
    for yi, value in zip(y, median):
        if abs(value) > CLIP:
            side = "right" if value > 0 else "left"
            ax.text(np.sign(value) * CLIP, yi, f" {value:+.0f}% ", ha=side,
                    va="center", color="white", fontsize=8, fontweight="bold")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1.05 * CLIP, 1.05 * CLIP)
    ax.set_title(f"{beta}: relative error (%)")
    ax.grid(axis="x", alpha=0.3)
axes[0].set_yticks(y, summary.index)
axes[0].invert_yaxis()
fig.suptitle(
    f"fit_many, iterative estimator, {len(fits)} traces vs the truth "
    "(red: a fit with r2 < 0.99)"
)
fig.tight_layout()
plt.show()

print("median |relative error| over workloads (%):")
print(rel_err.abs().median().round(2).to_string())
""",
    ),
    (
        "md",
        """
**Reading it.** beta0 and beta2 (seconds per step and per decode token)
come out within a few percent on almost every workload. beta1 (per prefill
token) is the least well pinned down, off by up to about 20% where prefill
is a small share of the engine's time (the long-output and chat mixes).

The exception is heavy load with long prompts. These simulations put no
token budget on a step, so at 24 requests/s dozens of long prompts prefill
at the same time, a step carries thousands of prefill tokens and lasts up
to about 0.3 s, and the estimator's picture of how the steps spread over
each phase breaks down: beta0 comes out far off (two to four times too
large here; with other seeds it can also stick at 0). That is
a limit of the estimator, not of batching (section 5 checks that one fit
at a time gives the same numbers). Its low r2 and its `cycle` stop reason
give it away. On the other traces `cycle` means that the MM iterates ended
up alternating between two very close points; like the reference
implementation, jaxbeta returns the last of them.

The same fits seen the other way: each coefficient across workloads, by
load, mix and chunk size, on a log scale; the dashed line is the truth.
One engine should give one set of betas whatever the workload, so the
spread across workloads is a rough gauge of how far a fit from any single
trace can be trusted.
""",
    ),
    (
        "code",
        """
table = fits[BETAS].join(pd.DataFrame.from_dict(configs, orient="index"))
load_x = {load: i for i, load in enumerate(LOADS)}
kinds = [(mix, chunk) for mix in MIXES for chunk in CHUNK_SIZES]
offsets = dict(zip(kinds, np.linspace(-0.3, 0.3, len(kinds))))
markers = dict(zip(MIXES, "os^"))
chunk_colors = dict(zip(CHUNK_SIZES, ["tab:blue", "tab:orange"]))

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, beta in zip(axes, BETAS):
    for (mix, chunk), group in table.groupby(["mix", "chunk_size"], sort=False):
        x = group["load"].map(load_x) + offsets[(mix, chunk)]
        ax.scatter(x, group[beta], marker=markers[mix], color=chunk_colors[chunk],
                   label=f"{mix}, C={chunk}")
    ax.axhline(truth[beta], color="k", ls="--", lw=1, label="true")
    ax.set_yscale("log")
    ax.set_xticks(list(load_x.values()), list(load_x))
    ax.set_xlabel("load")
    ax.set_title(beta + (" (s/step)" if beta == "beta0" else " (s/token)"))
axes[0].legend(fontsize=7, loc="upper left")
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        """
## 4. A bad trace does not sink the batch

Real collections of traces contain broken files. Here we add a copy of one
trace in which one decode phase has zero duration (its end equals its
start), which the estimators reject. `fit_many` does not raise: the broken
trace's row gets the validation message in its `error` column and NaN
betas, and every other trace is fitted exactly as before.
""",
    ),
    (
        "code",
        """
source = next(iter(traces))
broken = traces[source].copy()
row = broken.index[broken["phase_type"] == "decode"][0]
broken.loc[row, "t_end"] = broken.loc[row, "t_start"]

with_broken = {**traces, "broken copy": broken}
chunks_with_broken = {**chunk_sizes, "broken copy": chunk_sizes[source]}
mixed = jaxbeta.fit_many(with_broken, chunk_size=chunks_with_broken, progress=False)

print("error column of the broken trace:")
print(mixed.loc["broken copy", "error"])
same = np.array_equal(mixed.drop(index="broken copy")[BETAS], fits[BETAS])
print(f"\\nthe other {len(fits)} traces: same betas as before: {same}")
mixed.loc[[source, "broken copy"], BETAS + ["converged", "n_phases", "error"]]
""",
    ),
    (
        "md",
        """
## 5. Batch against a loop: timing, honestly

We time a warm `fit_many` call (its program already compiled above)
against a Python loop of `estimate_betas_iterative`, one trace at a time
(after one untimed call, which compiles the single-trace program). Both
give the same betas; only the speed differs. With `SCALE > 1` the loop is
timed on the first 18 traces only and scaled up linearly, which the
printout says.
""",
    ),
    (
        "code",
        """
LOOP_TRACES = 18  # the loop is timed on at most this many traces


def run_batch():
    return jaxbeta.fit_many(traces, chunk_size=chunk_sizes, progress=False)


def run_loop():
    fits = {}
    for name in list(traces)[:LOOP_TRACES]:
        fits[name] = jaxbeta.estimate_betas_iterative(
            traces[name], chunk_size=chunk_sizes[name]
        )
    return fits


def best_time(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


jaxbeta.estimate_betas_iterative(traces[source], chunk_size=chunk_sizes[source])
batch_s, batch_fits = best_time(run_batch)
loop_s, loop_fits = best_time(run_loop)
loop_all_s = loop_s * len(traces) / len(loop_fits)

loop_betas = pd.DataFrame({n: r.beta for n, r in loop_fits.items()}, index=BETAS).T
max_diff = ((batch_fits.loc[loop_betas.index, BETAS] - loop_betas) / loop_betas).abs()
iters = batch_fits["n_outer_iters"].astype(int)
print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
print(f"{len(traces)} traces, best of 3 warm runs:")
print(f"  fit_many (vmapped): {batch_s:.3f} s")
if len(loop_fits) == len(traces):
    print(f"  loop of estimate_betas_iterative: {loop_s:.3f} s")
else:
    print(
        f"  loop of estimate_betas_iterative: {loop_s:.3f} s for {len(loop_fits)} "
        f"traces, so about {loop_all_s:.3f} s for all (extrapolated, not measured)"
    )
print(f"  loop / batch: {loop_all_s / batch_s:.2f}x")
print(f"largest relative difference between the two fits: {max_diff.max().max():.1e}")
print(
    f"MM outer iterations per trace: mean {iters.mean():.1f}, max {iters.max()}; "
    "a batch runs all its traces as long as its slowest one"
)
""",
    ),
    (
        "md",
        """
**What these numbers mean.** On a CPU, expect the batch to be about as
fast as the loop, or slower; it is not a speed-up there, because:

- vmap removes per-call overhead (dispatch, Python), not arithmetic. An MM
  iteration costs a trace 2-3x less CPU time inside a batch than alone, but
  the CPU still does every trace's arithmetic, and that is most of the
  time.
- A vmapped `while_loop` runs as long as its slowest member: a trace that
  converged after 4 iterations keeps being carried (masked) until the last
  one in its batch stops. The loop does only the iterations each trace
  needs.
- The batch length is padded to a power of two by repeating a trace (here
  18 traces run as 32), so that batches of nearby lengths share one compiled
  program; on a CPU the repeats cost time.

The batched call is built for accelerators, where one step over a whole
batch of traces should cost about as much as a step over one trace, and
`fit_many` also spreads the batch over every visible device. That gain is
expected, not shown here: no GPU was at hand when this notebook was
written. To measure it, run the notebook on a GPU with `SCALE` raised,
say to 50 (900 traces): the number of traces grows but not their size, so
it is still one compiled program per batch length.
""",
    ),
]


# ---------------------------------------------------------------------------
# 03_sweeps.ipynb
# ---------------------------------------------------------------------------

SWEEPS = [
    (
        "md",
        """
# Sweeping estimator settings and choosing the chunk size

A trace does not say which prefill chunk size C the engine used, and the
estimator has options (damping, how the last partial prefill chunk is
accounted for). This notebook fits one simulated trace under a whole grid
of settings with `jaxbeta.sweep`, uses `jaxbeta.best_chunk_size` to find
the C that explains the trace best (and checks that it recovers the C the
trace was simulated with), then repeats that over several traces.

A sweep is one `jax.vmap`-ed call per correction mode: chunk size,
damping, tolerance and minimum duration are traced values, so all their
combinations run as one batch, on whatever device JAX finds.

`SCALE` is the only size knob: it multiplies the requests per trace and
the number of traces in section 5. At `SCALE = 1` the notebook runs in
under a minute on a 2-core CPU, most of it compiling.
""",
    ),
    (
        "code",
        """
%matplotlib inline
import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import jaxbeta

SCALE = 1  # the one number to change
""",
    ),
    (
        "md",
        """
## 1. Which device runs it

`sweep`, `best_chunk_size` and `fit_many` split their batch over every
device in `jax.devices()`; on a machine with one GPU that is the GPU, here
perhaps just the CPU.
""",
    ),
    (
        "code",
        """
print("default backend:", jax.default_backend())
print("devices:", jax.devices())
""",
    ),
    (
        "md",
        """
## 2. A trace with a known chunk size

The simulated engine uses C = 256 tokens per prefill step and the betas
below, with 5% step-time noise. Prompts are long enough (median 800
tokens) that most take several prefill steps, so C matters for the fit.
""",
    ),
    (
        "code",
        """
TRUE_BETA = (0.006, 3e-5, 1.5e-4)  # s/step, s/prefill token, s/decode token
TRUE_C = 256
BETAS = ["beta0", "beta1", "beta2"]
N_REQUESTS = 150 * SCALE  # 2 phases per request: 300 phases at SCALE = 1
WORKLOAD = dict(
    prompt_dist=("lognormal", 800, 0.7, 16, 4096),
    output_dist=("lognormal", 100, 0.8, 2, 1024),  # >= 2: every request decodes
    noise_sigma=0.05,
)

sim = jaxbeta.simulate(
    N_REQUESTS, beta=TRUE_BETA, chunk_size=TRUE_C, arrival_rate=8.0, seed=3,
    **WORKLOAD,
)
trace = sim.phases
print(f"{len(trace)} phases, padded to {jaxbeta.bucket_size(len(trace))} rows")
""",
    ),
    (
        "md",
        """
## 3. Sweep chunk size and correction mode

Sixteen candidate chunk sizes times two prefill-correction modes
(`beta_informed`, the default, and `uniform`): 32 fits. A mode is a
compile-time constant, so each mode is one compiled, vmapped call over the
16 chunk sizes. `rmse_seconds` is the root-mean-square error of the
fitted phase durations; since the durations themselves do not depend on
C, it can be compared across chunk sizes.
""",
    ),
    (
        "code",
        """
CANDIDATES = [32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
              640, 768, 1024]
MODES = ["beta_informed", "uniform"]

grid = jaxbeta.sweep(trace, chunk_size=CANDIDATES, prefill_correction_mode=MODES)
columns = ["prefill_correction_mode", "chunk_size", *BETAS, "n_outer_iters",
           "stop_reason", "rmse_seconds"]
grid[columns].head(len(CANDIDATES))
""",
    ),
    (
        "code",
        """
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
units = {"beta0": "s/step", "beta1": "s/token", "beta2": "s/token"}
for mode, style in zip(MODES, ["o-", "x--"]):
    rows = grid[grid["prefill_correction_mode"] == mode]
    axes[0].plot(rows["chunk_size"], rows["rmse_seconds"], style, label=mode)
    for ax, beta in zip(axes[1:], BETAS):
        ax.plot(rows["chunk_size"], rows[beta], style, label=mode)
axes[0].set_title("rmse of phase durations (s)")
axes[0].set_yscale("log")
for ax, beta, true in zip(axes[1:], BETAS, TRUE_BETA):
    ax.axhline(true, color="k", ls=":", lw=1, label="true beta")
    ax.set_title(f"{beta} ({units[beta]})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
for ax in axes:
    ax.axvline(TRUE_C, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size C (tokens)")
axes[0].legend(fontsize=8)
axes[1].legend(fontsize=8)
fig.suptitle(f"one trace simulated with C = {TRUE_C} (grey line), fitted at each C")
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        """
The rmse has a sharp minimum at the true C, where all three betas are
close to the truth; a few candidates away they are not. A wrong C
miscounts the prefill steps (too small: too many; too large: too few) and
the fit makes up for it by moving all three coefficients; beta1 is the
most sensitive and keeps falling as C grows past the truth. The two
correction modes differ only in how the last, partial prefill chunk of
each request is placed, and here they barely differ at all.

## 4. Damping, and choosing C automatically

`damping_eta` < 1 moves each MM iterate only part of the way to the next
solution. On this trace it only costs iterations; the betas move by well
under 1% (the loop stops once a step is shorter than `tol`, and damped
steps are shorter, so it stops a little farther from the fixed point).
The grid below is 4 damping values times 4 chunk sizes, again one vmapped
call.
""",
    ),
    (
        "code",
        """
damped = jaxbeta.sweep(
    trace, chunk_size=[128, 256, 512, 1024], damping_eta=[1.0, 0.75, 0.5, 0.25]
)
print("outer MM iterations (rows: chunk size, columns: damping_eta)")
print(damped.pivot(index="chunk_size", columns="damping_eta",
                   values="n_outer_iters").to_string())
print("\\nbeta1 (s/token):")
print(damped.pivot(index="chunk_size", columns="damping_eta",
                   values="beta1").to_string(float_format="{:.3e}".format))
print("\\nstop reasons:", damped["stop_reason"].value_counts().to_dict())
""",
    ),
    (
        "md",
        """
`best_chunk_size` runs that sweep over the candidates and returns the one
with the lowest rmse, along with the whole table (look at it: with few
long prompts, several candidates can fit about equally well).
""",
    ),
    (
        "code",
        """
choice = jaxbeta.best_chunk_size(trace, candidates=CANDIDATES)
print(f"simulated with C = {TRUE_C}; best candidate: C = {choice.chunk_size:g}")
best = choice.table.loc[choice.table["chunk_size"] == choice.chunk_size].iloc[0]
print("betas at that C:", best[BETAS].to_dict())
ranked = choice.table.sort_values("rmse_seconds")
ranked[["chunk_size", *BETAS, "rmse_seconds"]].head(4)
""",
    ),
    (
        "md",
        """
## 5. Several traces

The same question over a set of traces simulated with different chunk
sizes and loads: one `best_chunk_size` sweep per trace. All traces have
the same size and the same candidate list, so every sweep reuses the
program compiled above. The figure shows, for each trace, the rmse at
each candidate relative to that trace's best, with the true C marked.
""",
    ),
    (
        "code",
        """
sims = {}
for copy in range(SCALE):
    for true_c in (128, 256, 512):
        for rate in (4.0, 16.0):
            name = f"C={true_c}, {rate:g} req/s" + (f" #{copy}" if SCALE > 1 else "")
            sims[name] = jaxbeta.simulate(
                N_REQUESTS, beta=TRUE_BETA, chunk_size=true_c, arrival_rate=rate,
                seed=100 + len(sims), **WORKLOAD,
            )

choices = {
    name: jaxbeta.best_chunk_size(s.phases, candidates=CANDIDATES)
    for name, s in sims.items()
}
recovered = pd.DataFrame(
    {
        "true C": [s.chunk_size for s in sims.values()],
        "best C": [c.chunk_size for c in choices.values()],
        "rmse at best C (s)": [c.table["rmse_seconds"].min() for c in choices.values()],
    },
    index=list(sims),
)
recovered["recovered"] = recovered["true C"] == recovered["best C"]
print(f"recovered the true C in {recovered['recovered'].sum()} of {len(recovered)}")
recovered
""",
    ),
    (
        "code",
        """
fig, ax = plt.subplots(figsize=(8, 4.2))
colors = {128: "tab:blue", 256: "tab:orange", 512: "tab:green"}
styles = {4.0: "-", 16.0: "--"}
for name, choice in choices.items():
    table = choice.table
    true_c = sims[name].chunk_size
    rate = sims[name].params["arrival_rate"]
    ratio = table["rmse_seconds"] / table["rmse_seconds"].min()
    ax.plot(table["chunk_size"], ratio, styles[rate], color=colors[true_c],
            alpha=0.8, label=name)
    ax.plot([true_c], [ratio[table["chunk_size"] == true_c].iloc[0]], "o",
            color=colors[true_c])
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("candidate chunk size C (tokens)")
ax.set_ylabel("rmse / best rmse of the trace")
ax.set_title("each trace's rmse across candidates (dot: the true C)")
if len(choices) <= 12:
    ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()
""",
    ),
]

# ---------------------------------------------------------------------------
# 02_sensitivity.ipynb
# ---------------------------------------------------------------------------

SENSITIVITY = [
    (
        "md",
        """
# Which requests drive an estimate: sensitivities and bootstrap intervals

The fitted betas are differentiable functions of the trace. This notebook
fits one simulated trace with the iterative estimator, asks how each phase's
timestamps and weight move each beta (`jaxbeta.sensitivity`, implicit
derivatives at the MM fixed point), ranks the phases that matter most
(`jaxbeta.top_influences`), checks one derivative against a finite
difference, and puts percentile intervals on the betas with a request-level
bootstrap (`jaxbeta.bootstrap`, all resamples in one vmapped call).

`SCALE` multiplies the trace size and the number of resamples: 1 runs in
well under a minute on a laptop CPU; raise it on a GPU.
""",
    ),
    (
        "code",
        """
%matplotlib inline
import warnings

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxbeta

SCALE = 1
CHUNK = 256
TRUE_BETA = (0.006, 3e-5, 1.5e-4)
sim = jaxbeta.simulate(
    120 * SCALE,
    beta=TRUE_BETA,
    chunk_size=CHUNK,
    arrival_rate=8.0,
    prompt_dist=("lognormal", 600, 0.7, 16, 4096),
    output_dist=("lognormal", 60, 0.7, 2, 400),
    noise_sigma=0.03,
    seed=7,
)
phases = sim.phases
fit = jaxbeta.estimate_betas_iterative(phases, chunk_size=CHUNK)
print(f"{len(phases)} phases; stop reason {fit.stop_reason}")
print("fitted:", fit.beta, "true:", np.array(TRUE_BETA))
print("backend:", jax.default_backend())
""",
    ),
    (
        "md",
        """
## The sensitivity table

One row per phase, in input order. `dbeta{j}_dt_start` / `dbeta{j}_dt_end`:
how beta_j moves per second that this boundary moves (every other timestamp
fixed); `dbeta{j}_dweight`: the phase's influence, i.e. the change of beta_j
per unit of its weight in the least-squares objective (dropping the phase
moves beta_j by about minus this).
""",
    ),
    (
        "code",
        """
sens = jaxbeta.sensitivity(phases, chunk_size=CHUNK)
columns = [c for c in sens.columns if c.startswith("dbeta")]
sens[["request_id", "phase_type"] + columns[:6]].head()
""",
    ),
    (
        "code",
        """
top = jaxbeta.top_influences(sens, beta="beta1", by="weight", k=8)
top
""",
    ),
    (
        "code",
        """
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for j, ax in enumerate(axes):
    influence = sens[f"dbeta{j}_dweight"].to_numpy() / fit.beta[j]
    colors = np.where(sens["phase_type"] == "prefill", "tab:blue", "tab:orange")
    ax.scatter(sens["t_start"], influence, s=8, c=colors)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"relative influence on beta{j}")
    ax.set_xlabel("phase start (s)")
axes[0].set_ylabel("(dbeta/dweight) / beta")
fig.suptitle("influence of each phase (blue: prefill, orange: decode)")
fig.tight_layout()
plt.show()
""",
    ),
    (
        "md",
        """
## A finite-difference spot check

Move the end of an influential phase by a tiny step in both directions,
refit, and compare the central difference with the derivative in the table.
The step is far below the gap to the nearest other timestamp, so no
boundary crosses another. A timestamp shared by several boundaries is a kink
of the fit (there the per-phase derivative is one-sided and
`jaxbeta.boundary_sensitivity` gives the derivative of moving the shared
timestamp as a whole), so the check uses an end that no other phase shares.
""",
    ),
    (
        "code",
        """
# Only a boundary that no other phase shares has a two-sided derivative
# (simulated traces are step-aligned, like real ones): pick the most
# influential such end.
all_times = np.r_[phases["t_start"], phases["t_end"]]
values, counts = np.unique(all_times, return_counts=True)
unshared = np.isin(phases["t_end"], values[counts == 1])
candidates = np.where(unshared, np.abs(sens["dbeta1_dt_end"].to_numpy()), -1.0)
row = int(np.argmax(candidates))
end = phases["t_end"].iloc[row]
gap = np.min(np.abs(values[values != end] - end))
step = min(1e-7, gap / 10)


def beta1_with_end(shift):
    moved = phases.copy()
    moved.loc[moved.index[row], "t_end"] = end + shift
    return jaxbeta.estimate_betas_iterative(
        moved, chunk_size=CHUNK, tol=1e-13, max_outer_iters=200
    ).beta1


finite_difference = (beta1_with_end(step) - beta1_with_end(-step)) / (2 * step)
print("row", row, "derivative", sens["dbeta1_dt_end"].iloc[row])
print("central difference", finite_difference)
""",
    ),
    (
        "md",
        """
The two agree (to about four digits here) when the fit has converged to its fixed
point. (If the loop stopped in a cycle, `sensitivity` warns and sets
`gradient_valid` to False: the derivative of a point that is not a fixed
point is only indicative.)

## Bootstrap intervals

Resample whole requests (a prefill and its decode together) with
replacement, as multinomial weights, and refit every resample in one
vmapped call.
""",
    ),
    (
        "code",
        """
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    boot = jaxbeta.bootstrap(
        phases, chunk_size=CHUNK, n_resamples=100 * SCALE, seed=0, progress=False
    )
print(f"converged share: {boot.converged_share:.2f}")
boot.intervals
""",
    ),
    (
        "code",
        """
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for j, ax in enumerate(axes):
    ax.hist(boot.betas[:, j], bins=20, color="tab:gray")
    ax.axvline(TRUE_BETA[j], color="tab:green", label="true")
    ax.axvline(fit.beta[j], color="tab:red", label="fit")
    low, high = boot.intervals.iloc[j][["low", "high"]]
    ax.axvspan(low, high, alpha=0.15, color="tab:blue", label="interval")
    ax.set_title(f"beta{j}")
axes[0].legend()
fig.tight_layout()
plt.show()
""",
    ),
]


NOTEBOOKS = {
    "01_batched_fitting.ipynb": BATCHED_FITTING,
    "02_sensitivity.ipynb": SENSITIVITY,
    "03_sweeps.ipynb": SWEEPS,
}


def main() -> None:
    for name, parts in NOTEBOOKS.items():
        print("wrote", _write(name, parts))


if __name__ == "__main__":
    main()
