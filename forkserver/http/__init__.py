"""The sans-IO HTTP/1.1 layer: request parsing (``parser``), response framing (``response``)
and protocol errors that carry their status (``errors``).

Nothing here performs I/O or imports the rest of forkserver, so the worker, the metrics
listener and the tests all drive it the same way: feed bytes, take events or bytes back.
The package initialiser stays empty on purpose (the module table gives it no imports): import
from the submodules, e.g. ``from forkserver.http.parser import RequestParser``.
"""
