"""When the serving worker's main loop holds a whole request (chatapp/serving.py's request_state)."""
from types import SimpleNamespace

import pytest

from chatapp.serving import COMPLETE, GUNICORN_DECIDES, MORE, RequestLimits, request_state

LIMITS = RequestLimits(SimpleNamespace(limit_request_line=8190, limit_request_fields=100, limit_request_field_size=8190),
                       max_body=1000)
POST = b"POST /x HTTP/1.1\r\nHost: h\r\n"

CASES = {
    "nothing yet": (b"", MORE),
    "a request line": (b"GET / HTTP/1.1\r\n", MORE),
    "a GET": (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", COMPLETE),
    "a GET, lines ended by LF": (b"GET / HTTP/1.1\nHost: h\n\n", COMPLETE),
    "a GET and the start of the next": (b"GET / HTTP/1.1\r\n\r\nGET /b HT", COMPLETE),
    "a body on its way": (POST + b"Content-Length: 5\r\n\r\nabc", MORE),
    "a whole body": (POST + b"Content-Length: 5\r\n\r\nabcde", COMPLETE),
    "an empty body": (POST + b"Content-Length: 0\r\n\r\n", COMPLETE),
    "a declared body past the limit": (POST + b"Content-Length: 1001\r\n\r\n", GUNICORN_DECIDES),
    "a length that is not a number": (POST + b"Content-Length: 5x\r\n\r\n", GUNICORN_DECIDES),
    "two lengths": (POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", GUNICORN_DECIDES),
    "a length and chunked": (POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", GUNICORN_DECIDES),
    "another coding": (POST + b"Transfer-Encoding: gzip\r\n\r\n", GUNICORN_DECIDES),
    "chunks on their way": (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", MORE),
    "chunks, the last one": (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", COMPLETE),
    "chunks with an extension and trailers": (
        POST + b"Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n", COMPLETE),
    "chunks, a trailer on its way": (POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nT: v\r\n", MORE),
    "chunks past the limit": (POST + b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"a" * 1001, GUNICORN_DECIDES),
    "a chunk size that is not hex": (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", GUNICORN_DECIDES),
    "a chunk without its line end": (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", GUNICORN_DECIDES),
    "a request line past its limit": (b"GET /" + b"a" * 9000, GUNICORN_DECIDES),
    "a head past its limit": (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 900_000, GUNICORN_DECIDES),
}


@pytest.mark.parametrize("data, state", CASES.values(), ids=CASES.keys())
def test_request_state(data, state):
    assert request_state(data, LIMITS)[0] == state


def test_a_client_that_expects_100_continue_is_told_to_send_its_body():
    head = POST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    assert request_state(head, LIMITS) == (MORE, True)
    assert request_state(head + b"ab", LIMITS) == (MORE, False)  # sending already
    assert request_state(b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", LIMITS) == (MORE, False)
