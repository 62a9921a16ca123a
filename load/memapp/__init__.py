"""A small Django app for ``make bench-memory``: the lazy caches a real site builds per process.

Served inside a stock project that load/bench_memory.py generates at bench time
(``django-admin startproject``, never committed). Each request warms what production code
warms on first use: the URL resolver (a few hundred patterns with converters and regexes),
compiled templates (inheritance, includes, filters), ORM model metadata and queries on SQLite,
``reverse()`` caches, and the admin's templates and translations.
"""
