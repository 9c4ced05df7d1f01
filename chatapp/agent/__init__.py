"""The agent the turns call, one concern a module:

- contract.py: what every agent is (AgentRunner, ReplyStream) and its reply (AgentReply);
- transport.py: calls within a deadline: the kinds of failure, attempts, retries, Retry-After;
- openai_http.py: the OpenAI-compatible chat-completions client;
- sse.py: a streamed answer, OpenAI's server-sent chunks;
- local.py: agents in this process (the development echo);
- guard.py: what guards the calls: a circuit breaker per agent, the fallback agent, the cap on
  calls in flight (GuardedAgent, the runner the turns call).

The package imports requests, chatapp.errors and chatapp.values only: no Flask, no database. Its
settings come through build_agent(), from config.py, which holds their defaults."""
from collections.abc import Callable, Mapping

from chatapp.agent.contract import AgentReply, AgentRunner, ReplyStream
from chatapp.agent.guard import GuardedAgent
from chatapp.agent.local import EchoAgent, ReadyStream
from chatapp.agent.openai_http import OpenAIChatAgent
from chatapp.agent.sse import AgentStream
from chatapp.agent.transport import FailureKind

__all__ = ["AgentReply", "AgentRunner", "AgentStream", "EchoAgent", "FailureKind", "GuardedAgent",
           "OpenAIChatAgent", "ReadyStream", "ReplyStream", "build_agent"]


def build_agent(config: Mapping, on_breaker: Callable[[str, bool], None] = lambda agent, is_open: None) -> GuardedAgent:
    """The agent the turns call, with settings as config.py parsed them: the HTTP agent at
    AGENT_URL (unset: the echo agent), the fallback at AGENT_FALLBACK_URL if any, their breakers
    and the cap on calls in flight. `on_breaker` hears of a breaker opening and closing."""
    primary = _http_agent(config, config["AGENT_URL"], config["AGENT_API_KEY"]) if config["AGENT_URL"] else EchoAgent()
    fallback = None
    if config["AGENT_FALLBACK_URL"]:
        fallback = _http_agent(config, config["AGENT_FALLBACK_URL"], config["AGENT_FALLBACK_API_KEY"])
    return GuardedAgent(
        primary,
        timeout=config["AGENT_TIMEOUT"],
        breaker_failures=config["AGENT_BREAKER_FAILURES"],
        breaker_seconds=config["AGENT_BREAKER_SECONDS"],
        fallback=fallback,
        fallback_model=config["AGENT_FALLBACK_MODEL"],
        max_concurrency=config["AGENT_MAX_CONCURRENCY"],
        on_breaker=on_breaker,
    )


def _http_agent(config: Mapping, url: str, api_key: str | None) -> OpenAIChatAgent:
    return OpenAIChatAgent(
        url,
        api_key=api_key,
        connect_timeout=config["AGENT_CONNECT_TIMEOUT"],
        timeout=config["AGENT_TIMEOUT"],
        max_retries=config["AGENT_MAX_RETRIES"],
        max_response_bytes=config["AGENT_MAX_RESPONSE_BYTES"],
        stream_timeout=config["AGENT_STREAM_TIMEOUT"],
    )
