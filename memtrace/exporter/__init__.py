"""Prometheus: metric definitions, the collector and text path, and the /metrics web server."""
