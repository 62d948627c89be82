import sys
from pathlib import Path

# Lets tests import the plain-NumPy expectations in tests/spec_loops.py.
sys.path.insert(0, str(Path(__file__).parent))
