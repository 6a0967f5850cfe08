"""Helpers used only by the benchmarks: the JSON report line and the drift benchmark's shifts."""
