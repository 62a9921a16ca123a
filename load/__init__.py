"""Load tests and benchmarks for forkserver (locust scenarios, wrk side-by-side runs).

A package so that servers started from the repository root can import ``load.apps:app``.
Nothing here is imported by forkserver itself.
"""
