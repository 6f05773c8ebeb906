"""How the `rabbitmq` sink reads what pika and the broker tell it: one sentence per error
(secrets scrubbed), and which answers refuse the relay itself rather than an event."""

from __future__ import annotations

from outbox_relay.events import Failure
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber

_REPLY_NOT_FOUND = 404
_REPLY_PRECONDITION_FAILED = 406
_REPLY_ACCESS_REFUSED = 403
_REPLY_COMMAND_INVALID = 503

# A nack says the broker or a queue cannot take messages now (a full queue lasts as long as its
# consumers are away), not that this event is bad: it must not count toward dead-lettering.
NACKED = Failure(
    "RabbitMQ refused the message (basic.nack: an internal error, or a queue that is full with "
    "overflow: reject-publish)",
    transient=True,
)


def unroutable_reason(exchange: str, routing_key: str, reply_code: int, reply_text: str) -> str:
    if exchange == "":
        where = f"no queue named {routing_key!r} (default exchange)"
    else:
        where = f"no queue bound for routing key {routing_key!r} on exchange {exchange!r}"
    return f"unroutable: {where}; RabbitMQ returned the message ({reply_code} {reply_text})"


class RelayRefused(ConnectorError):
    """The broker refused the relay's permissions while the link was set up (declaring or
    checking the exchange): a setup problem, not an outage."""


def refuses_the_relay(exc: BaseException) -> bool:
    """The broker closed the channel with 403 ACCESS_REFUSED: the relay's user may not
    configure, write to or read the exchange (its permissions on the virtual host), whatever
    the event."""
    from pika import exceptions as pe

    return isinstance(exc, pe.ChannelClosedByBroker) and exc.reply_code == _REPLY_ACCESS_REFUSED


def explain(exc: BaseException, exchange: str) -> str:
    """One sentence for a pika error, secrets scrubbed."""
    return scrubber.scrub(_sentence(_cause(exc), exchange))


def _cause(exc: BaseException) -> BaseException:
    """The real cause: pika wraps it up to three times, a socket error in AMQPConnectionError, in
    the workflow's failure (one error per attempt), in the phase that failed."""
    from pika import exceptions as pe
    from pika.adapters.utils import connection_workflow as cw

    if type(exc) is pe.AMQPConnectionError and exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    if isinstance(exc, cw.AMQPConnectionWorkflowFailed) and exc.exceptions:
        exc = exc.exceptions[-1]
    if isinstance(exc, cw.AMQPConnectorPhaseErrorBase):
        exc = exc.exception
    return exc


def _sentence(exc: BaseException, exchange: str) -> str:
    from pika import exceptions as pe
    from pika.adapters.utils import connection_workflow as cw

    if isinstance(exc, cw.AMQPConnectorStackTimeout):
        return "RabbitMQ did not complete the connection handshake in time (connect_timeout)"
    if isinstance(exc, pe.ChannelClosedByBroker | pe.ConnectionClosedByBroker):
        return _closed_by_broker(exc, exchange)
    if isinstance(exc, pe.ProbableAuthenticationError):
        return f"RabbitMQ refused the login (wrong user or password?): {exc}"
    if isinstance(exc, pe.ProbableAccessDeniedError):
        return f"RabbitMQ refused access to the virtual host: {exc}"
    if isinstance(exc, pe.ConnectionBlockedTimeout):
        return (
            "RabbitMQ blocked the connection (resource alarm: memory or disk) for longer than confirm_timeout"
        )
    if isinstance(exc, pe.AMQPHeartbeatTimeout):
        return "RabbitMQ stopped answering (heartbeat timeout)"
    if isinstance(exc, pe.StreamLostError):
        return f"connection to RabbitMQ lost: {exc}"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    if isinstance(exc, pe.ConnectionClosedByClient | pe.ChannelClosedByClient):
        return "connection closed by the relay"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _closed_by_broker(exc: BaseException, exchange: str) -> str:
    """The broker's reply code and text, with what to do about the common ones."""
    from pika import exceptions as pe

    assert isinstance(exc, pe.ChannelClosedByBroker | pe.ConnectionClosedByBroker)
    code, text = exc.reply_code, exc.reply_text
    scope = "channel" if isinstance(exc, pe.ChannelClosedByBroker) else "connection"
    message = f"RabbitMQ closed the {scope}: {code} {text}"
    if code == _REPLY_NOT_FOUND and "exchange" in text:
        return message + f" (declare: false needs the exchange {exchange!r} to exist already)"
    if code == _REPLY_PRECONDITION_FAILED and "inequivalent arg" in text:
        return message + f" (the exchange {exchange!r} exists with other settings; match them or rename it)"
    if code == _REPLY_COMMAND_INVALID and "x-consistent-hash" in text:
        return message + " (enable it: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
    if code == _REPLY_ACCESS_REFUSED and "Login was refused" in text:
        return f"RabbitMQ refused the login (wrong user or password): {code} {text}"
    if code == _REPLY_ACCESS_REFUSED:
        return message + " (grant the relay's user configure and write permissions on the exchange)"
    return message
