"""Test data shared by the unit and the live suites (see http_verdicts.py)."""
