"""The engine: BPF probes, their events, /proc and page-table readers, the
address-space model, attribution and the per-process tracker."""
