"""The OpenAI-compatible chat-completions client: POST {base_url}/chat/completions, whole or streamed,
with retries, backoff and deadlines (chatapp/agent/transport.py)."""
import json
import time
import weakref

import requests
from requests.adapters import HTTPAdapter

from chatapp.agent.cancel import WATCHED_POOLS
from chatapp.agent.contract import AgentReply, finish_reason
from chatapp.agent.sse import AgentStream
from chatapp.agent.transport import (
    RETRY_STATUSES,
    AttemptFailed,
    FailureKind,
    declared_too_large,
    parse_retry_after,
    read_some,
    remaining,
    with_retries,
)
from chatapp.values import reject_json_constant, storable_json, unstorable

# Enough connections for every gunicorn thread waiting on the agent at once.
POOL_MAXSIZE = 128


class OpenAIChatAgent:
    """Calls POST {base_url}/chat/completions with retries, backoff and deadlines, whole or streamed.
    Its settings are the app's (config.py holds their defaults, build_agent passes them)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, connect_timeout: float, timeout: float,
                 max_retries: int, max_response_bytes: int, stream_timeout: float):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        # Stands in for requests.Session: requests go straight to a pooled urllib3 adapter,
        # prepared from a template. A Session merged settings, ran hooks and kept cookies on every
        # call (a tenth of a turn's CPU in bench/turn_cost.py), and no cookie may carry over
        # between users' turns anyway; measured again with requests 2.34.2, a Session cost 2-18%
        # of the turns a second (bench/results/2026-12-02-libraries.md). max_retries=0: retries
        # are ours, within the deadline.
        self._adapter = HTTPAdapter(pool_maxsize=POOL_MAXSIZE, max_retries=0)
        # Pools whose connections a user's stop can shut down (chatapp/agent/cancel.py).
        self._adapter.poolmanager.pool_classes_by_scheme = WATCHED_POOLS
        self._template = requests.Request("POST", self._url).prepare()
        # Proxy settings are read from the environment once, not on every call.
        self._proxies = requests.utils.get_environ_proxies(self._url)
        # Apps that never call close() still close their sockets when the agent is collected.
        self._close = weakref.finalize(self, self._adapter.close)

    def __repr__(self) -> str:
        # Never show the URL or the key, even in a debugger or a log line.
        return f"<OpenAIChatAgent timeout={self.timeout} max_retries={self.max_retries}>"

    def close(self) -> None:
        """Close the pooled connections."""
        self._close()

    def run(self, messages: list[dict], model: str, request_id: str | None = None,
            deadline: float | None = None) -> AgentReply:
        """Ask the agent for the next assistant message; raise AgentUnavailable on any failure."""
        deadline = min(time.monotonic() + self.timeout, deadline or float("inf"))
        body = json.dumps({"model": model, "messages": messages}).encode()
        headers = self._headers(request_id)
        (content, usage, reason), attempts = with_retries(
            lambda: self._attempt(body, headers, deadline), deadline, self.max_retries, request_id
        )
        return AgentReply(content, usage, attempts, finish_reason=reason)

    def stream(self, messages: list[dict], model: str, request_id: str | None = None,
               deadline: float | None = None) -> AgentStream:
        """Ask the agent for the next assistant message as a stream of pieces; raise AgentUnavailable
        when it cannot start (connection, status), and from the stream when it fails later."""
        started = time.monotonic()
        # Connecting, retries and the status all count against the first-token deadline.
        first_deadline = min(started + min(self.timeout, self.stream_timeout), deadline or float("inf"))
        body = json.dumps(
            {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        ).encode()
        headers = self._headers(request_id)
        response, attempts = with_retries(
            lambda: self._open_stream(body, headers, first_deadline), first_deadline, self.max_retries, request_id
        )
        return AgentStream(
            response,
            attempts=attempts,
            first_deadline=first_deadline,
            gap=self.timeout,
            end=started + self.stream_timeout,
            max_bytes=self.max_response_bytes,
            request_id=request_id,
        )

    def _headers(self, request_id: str | None) -> dict:
        """The request headers: JSON, the key when there is one, and the request's id for tracing."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _attempt(self, body: bytes, headers: dict, deadline: float) -> tuple[str, dict | None, str]:
        """One POST: the content, usage and finish_reason of a good answer, else AttemptFailed."""
        # Closing a response that is not fully read drops its connection instead of pooling it.
        with self._post(body, headers, deadline) as response:
            raw = self._read_body(response, deadline)
        return parse_completion(raw)

    def _open_stream(self, body: bytes, headers: dict, deadline: float) -> requests.Response:
        """One POST asking for a stream: the response, its events still unread, else AttemptFailed."""
        response = self._post(body, headers, deadline)
        if declared_too_large(response, self.max_response_bytes):
            response.close()
            raise AttemptFailed(FailureKind.TOO_LARGE)
        return response

    def _post(self, body: bytes, headers: dict, deadline: float) -> requests.Response:
        """One POST whose answer has a 2xx status, its body unread; else AttemptFailed."""
        left = remaining(deadline)
        request = self._template.copy()
        request.prepare_headers(headers)
        request.prepare_body(body, None)
        try:
            response = self._adapter.send(
                request,
                stream=True,
                # The read timeout is the rest of the deadline: one that fires means time is up.
                timeout=(min(self.connect_timeout, left), left),
                proxies=self._proxies,
            )
        except requests.exceptions.ConnectTimeout:
            raise AttemptFailed(FailureKind.TIMEOUT, retryable=True) from None
        except requests.exceptions.Timeout:
            raise AttemptFailed(FailureKind.TIMEOUT) from None
        except requests.exceptions.SSLError:
            raise AttemptFailed(FailureKind.CONNECTION) from None  # a bad certificate does not heal in 0.1 s
        except requests.exceptions.ConnectionError:
            raise AttemptFailed(FailureKind.CONNECTION, retryable=True) from None
        except requests.exceptions.RequestException:
            raise AttemptFailed(FailureKind.CONNECTION) from None  # a bad URL or header: configuration, not chance
        status = response.status_code
        if not 200 <= status < 300:
            failure = AttemptFailed(
                FailureKind.HTTP_STATUS,
                status=status,
                retryable=status in RETRY_STATUSES,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
            response.close()
            raise failure
        return response

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        """The whole body, read in chunks so that neither the size cap nor the deadline is overrun."""
        if declared_too_large(response, self.max_response_bytes):
            raise AttemptFailed(FailureKind.TOO_LARGE)
        body = bytearray()
        while chunk := read_some(response, deadline):
            body += chunk
            if len(body) > self.max_response_bytes:
                raise AttemptFailed(FailureKind.TOO_LARGE)
        return bytes(body)


def parse_completion(raw: bytes) -> tuple[str, dict | None, str]:
    """`choices[0].message.content`, `usage` and the finish_reason of a chat completion, else
    AttemptFailed."""
    try:
        data = json.loads(raw, parse_constant=reject_json_constant)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, RecursionError, LookupError, TypeError):
        raise AttemptFailed(FailureKind.MALFORMED) from None
    if not isinstance(data, dict) or not isinstance(content, str) or unstorable(content):
        raise AttemptFailed(FailureKind.MALFORMED)
    usage = data.get("usage")
    return content, usage if isinstance(usage, dict) and storable_json(usage) else None, finish_reason(choice.get("finish_reason"))
