"""Thin command-line jobs over the `vitbirds` library, and the `bench_*` benchmarks.

A package so that one job can reuse another's parser (`jobs.tune` builds on `jobs.train`) and
tests can import them; each module still runs as a script (`python jobs/train.py`)."""
