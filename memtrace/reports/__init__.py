"""What is made from recordings (.mtrace): the report (timeline.py gathers the
series and tables, html.py draws them), and the diff and the CI gate."""
