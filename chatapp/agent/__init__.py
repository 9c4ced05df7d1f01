"""The agent the turns call, one concern a module:

- contract.py: what every agent is (AgentRunner, ReplyStream) and its reply (AgentReply);
- transport.py: calls within a deadline: the kinds of failure, attempts, retries, Retry-After;
- openai_http.py: the OpenAI-compatible chat-completions client;
- sse.py: a streamed answer, OpenAI's server-sent chunks;
- local.py: agents in this process (the development echo).

The package imports requests, chatapp.errors and chatapp.values only: no Flask, no database. Its
settings come through build_agent(), from config.py, which holds their defaults."""
from collections.abc import Mapping

from chatapp.agent.contract import AgentReply, AgentRunner, ReplyStream
from chatapp.agent.local import EchoAgent, ReadyStream
from chatapp.agent.openai_http import OpenAIChatAgent
from chatapp.agent.sse import AgentStream
from chatapp.agent.transport import FailureKind

__all__ = ["AgentReply", "AgentRunner", "AgentStream", "EchoAgent", "FailureKind", "OpenAIChatAgent",
           "ReadyStream", "ReplyStream", "build_agent"]


def build_agent(config: Mapping) -> AgentRunner:
    """The HTTP agent when AGENT_URL is set, else the echo agent; settings as config.py parsed them."""
    if not config["AGENT_URL"]:
        return EchoAgent()
    return OpenAIChatAgent(
        config["AGENT_URL"],
        api_key=config["AGENT_API_KEY"],
        connect_timeout=config["AGENT_CONNECT_TIMEOUT"],
        timeout=config["AGENT_TIMEOUT"],
        max_retries=config["AGENT_MAX_RETRIES"],
        max_response_bytes=config["AGENT_MAX_RESPONSE_BYTES"],
        stream_timeout=config["AGENT_STREAM_TIMEOUT"],
    )
