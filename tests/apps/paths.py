"""Echoes PATH_INFO re-encoded the PEP 3333 way (latin-1 bytes, decoded as UTF-8 by the app)."""


def app(environ, start_response):
    body = environ["PATH_INFO"].encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
