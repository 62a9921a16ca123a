"""The built-in demo app, called directly under wsgiref's PEP 3333 validator."""

from __future__ import annotations

import io
import json
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from forkserver.demo import app


def call(path="/", method="GET", query="", body=b"", headers=None, chunked=False):
    """Run the app once; return (status, headers dict, body bytes)."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
               "QUERY_STRING": query}
    if chunked:
        environ["wsgi.input_terminated"] = True
    elif body:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        environ[name] = value
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(body)
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = status
        seen["headers"] = response_headers
        return lambda data: None

    result = validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    header_dict = dict(seen["headers"])
    assert len(header_dict) == len(seen["headers"])  # no duplicate names
    return seen["status"], header_dict, data


def test_index_page():
    status, headers, body = call("/")
    assert status == "200 OK"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert b"<html" in body and b'href="/echo' in body


def test_index_head_and_other_methods():
    assert call("/", method="HEAD")[0] == "200 OK"
    status, headers, body = call("/", method="POST", body=b"x")
    assert status == "405 Method Not Allowed"
    assert headers["Allow"] == "GET, HEAD"
    assert int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize("path", ["/nope", "/echo/", "/index.html", "//"])
def test_unknown_paths_are_404(path):
    status, headers, body = call(path)
    assert status == "404 Not Found"
    assert headers["Content-Type"].startswith("text/plain")
    assert int(headers["Content-Length"]) == len(body) > 0


def test_echo_reflects_the_request():
    status, headers, body = call(
        "/echo", method="PUT", query="a=1&b=%20",
        body='{"x": "\u00e9"}'.encode(),
        headers={"CONTENT_TYPE": "application/json", "HTTP_X_REQUEST_ID": "abc",
                 "HTTP_ACCEPT": "*/*"},
    )
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    doc = json.loads(body)
    assert doc["method"] == "PUT"
    assert doc["path"] == "/echo"
    assert doc["query_string"] == "a=1&b=%20"
    assert doc["body"] == '{"x": "\u00e9"}'
    assert doc["body_length"] == len('{"x": "\u00e9"}'.encode())
    assert doc["headers"]["X-Request-Id"] == "abc"
    assert doc["headers"]["Accept"] == "*/*"
    assert doc["headers"]["Content-Type"] == "application/json"
    assert doc["headers"]["Content-Length"] == str(doc["body_length"])
    assert not any(name.startswith(("Wsgi", "Server", "Request")) for name in doc["headers"])


def test_echo_without_body():
    _, _, body = call("/echo")
    doc = json.loads(body)
    assert doc["body"] == "" and doc["body_length"] == 0 and doc["method"] == "GET"
    assert "Content-Length" not in doc["headers"]


def test_echo_invalid_utf8_is_replaced_and_length_is_in_bytes():
    _, _, body = call("/echo", method="POST", body=b"ok\xff\xfe")
    doc = json.loads(body)
    assert doc["body"] == "ok\ufffd\ufffd"
    assert doc["body_length"] == 4


def test_echo_reads_exactly_content_length():
    environ = {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/echo",
               "CONTENT_LENGTH": "3"}
    setup_testing_defaults(environ)
    stream = io.BytesIO(b"abcNEXT-REQUEST")
    environ["wsgi.input"] = stream
    result = app(environ, lambda status, headers, exc_info=None: None)
    assert json.loads(b"".join(result))["body"] == "abc"
    assert stream.read() == b"NEXT-REQUEST"  # never reads past the declared length


def test_echo_large_body_in_chunks():
    payload = bytes(range(256)) * 1024  # 256 KiB, more than one read
    _, headers, body = call("/echo", method="POST", body=payload)
    doc = json.loads(body)
    assert doc["body_length"] == len(payload)
    assert int(headers["Content-Length"]) == len(body)


def test_echo_chunked_request_reads_until_end_when_server_allows():
    _, _, body = call("/echo", method="POST", body=b"streamed body", chunked=True)
    doc = json.loads(body)
    assert doc["body"] == "streamed body" and doc["body_length"] == 13


def test_echo_decodes_utf8_paths_and_headers():
    query = "q=caf\u00e9".encode().decode("latin-1")  # as a PEP 3333 server passes it
    _, _, body = call("/echo", query=query,
                      headers={"HTTP_X_NAME": "J\u00fcrgen".encode().decode("latin-1")})
    doc = json.loads(body)
    assert doc["query_string"] == "q=caf\u00e9"
    assert doc["headers"]["X-Name"] == "J\u00fcrgen"
