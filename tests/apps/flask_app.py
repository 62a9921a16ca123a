"""A real Flask application served through forkserver."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/hello/<name>")
def hello(name: str):
    return jsonify(hello=name)


@app.post("/upload")
def upload():
    upload = request.files["f"]
    return jsonify(name=upload.filename, size=len(upload.read()))
