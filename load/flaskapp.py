"""The Flask apps of ``make bench`` (issue 14): what a small real framework costs per request.

    /       "Hello, World!" as Flask returns a string (text/html, Content-Length)
    /json   {"message": "Hello, World!"} through ``flask.jsonify``

The same app object serves both, so every server in the Flask rows runs identical code; the
benchmark asks each path in its own run. Flask lives in the bench venv (load/bench_env.py), not
in the project's dependencies.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify

MESSAGE = "Hello, World!"

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return MESSAGE


@app.get("/json")
def json_message() -> Response:
    return jsonify(message=MESSAGE)
