"""The README's worked sensitivity example prints what the README says."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pandas as pd

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_blocks() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("A worked example on the bundled sample trace") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return code, printed


def test_worked_sensitivity_example_prints_what_the_readme_shows():
    code, printed = _example_blocks()
    output = io.StringIO()
    # The example sets a pandas display option: restore it afterwards.
    precision = pd.option_context(
        "display.precision", pd.get_option("display.precision")
    )
    with contextlib.redirect_stdout(output), warnings.catch_warnings(), precision:
        warnings.simplefilter("ignore")  # progress bars and notes go to stderr
        exec(compile(code, str(README), "exec"), {})
    got = [line.rstrip() for line in output.getvalue().splitlines()]
    assert got == [line.rstrip() for line in printed.splitlines()]
