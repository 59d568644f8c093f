"""What is made from recordings (.mtrace) and live runs: the report
(timeline.py gathers the series and tables, build.py the report object, html.py
draws it), the budget gate (gate.py) and its results (results.py), the diff of
two runs (diff.py, diffhtml.py), the check of a recording against a baseline
(baseline.py); reading a recording as ticks (ticks.py) and one pass over it
(profile.py)."""
