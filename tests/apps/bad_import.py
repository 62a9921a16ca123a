"""Fixture: an app whose import fails because a dependency is missing."""

import module_that_does_not_exist_xyz  # noqa: F401


def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]
