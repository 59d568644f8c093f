"""What is made from recordings and live runs: the budget gate (gate.py) and its
results (results.py), the diff of two runs (diff.py, diffhtml.py), the check of
a recording against a baseline (baseline.py); reading a recording as ticks
(ticks.py) and one pass over it (profile.py)."""
