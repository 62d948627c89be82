import sys
from pathlib import Path

# Lets tests import the plain-NumPy expectations in tests/spec_loops.py.
sys.path.insert(0, str(Path(__file__).parent))

# Deterministic property tests in CI (CI=true): the same examples every run.
try:
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra
    pass
