"""forkserver: a preforking WSGI HTTP/1.1 server."""

__version__ = "0.1.0"
