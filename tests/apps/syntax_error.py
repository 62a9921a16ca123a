"""Fixture: a deliberate syntax error on line 3 (test_loader checks the line)."""

def app(environ, start_response:
    return []
