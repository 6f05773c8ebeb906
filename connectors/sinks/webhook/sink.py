"""The `webhook` sink itself: one POST per event (up to `max_concurrency` at once) or one per
batch, narrowing a refused batch down to the events refused (see the package's docstring)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sinks.webhook.config import WebhookSinkConfig
from outbox_relay.connectors.sinks.webhook.messages import batch_body, batch_headers, event_headers
from outbox_relay.connectors.sinks.webhook.outcomes import (
    Pause,
    answer_reason,
    explain,
    is_transient,
    refusal,
)
from outbox_relay.connectors.sinks.webhook.redaction import (
    is_secret_header,
    redact_webhook_url,
    remember_header_secrets,
    remember_url_secrets,
)
from outbox_relay.events import LEASE_ENDED, Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink
from outbox_relay.logs import get_logger


class WebhookSink(Sink):
    kind = "webhook"

    def __init__(self, config: WebhookSinkConfig) -> None:
        self.config = config
        remember_url_secrets(config.url)
        remember_header_secrets(config.headers)
        self._display_url = redact_webhook_url(config.url)
        self._client: Any = None
        self._pause = Pause(config.max_retry_after)
        #: As many as the pool has connections: a request that holds one never waits in httpx
        #: for a connection after it was allowed to go (see `_post`).
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._log = get_logger(sink="webhook", url=self._display_url)

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = self._new_client()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if not events:
            return []
        if self._client is None:
            await self.start()
        waiting = self._pause.still_waiting()
        if waiting is not None:
            return [waiting] * len(events)
        if self.config.mode == "batch":
            result, status = await self._post_batch(events)
            return await self._narrow(events, result, status)
        return await self._post_each(events)

    async def check(self) -> None:
        """Send a HEAD request to url: any HTTP answer (even 404 or 405) shows the receiver is
        reachable; a network error or timeout raises ConnectorError."""
        import httpx

        client = self._new_client()
        try:
            async with asyncio.timeout(self.config.timeout):  # (the whole answer, as in _post)
                await client.head(self.config.url)
        except TimeoutError:
            raise ConnectorError(
                f"webhook {self._display_url}: no complete answer within {self.config.timeout:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise ConnectorError(f"webhook {self._display_url}: {explain(exc)}") from None
        finally:
            await client.aclose()

    async def close(self) -> None:
        """Every call already waited for its responses; close only releases the connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def describe(self) -> dict[str, object]:
        config = self.config
        return {
            "url": self._display_url,
            "mode": config.mode,
            "headers": {k: "***" if is_secret_header(k) else v for k, v in config.headers.items()},
            "timeout": config.timeout,
            "max_concurrency": config.max_concurrency,
            "max_retry_after": config.max_retry_after,
            "idempotency_key": "event_id" if config.mode == "event" else "batch-<sha256 of the event ids>",
            "event_headers": "X-Outbox-* (standard), X-Outbox-Header-<name> (row headers)",
        }

    # --- requests -----------------------------------------------------------------------------

    def _new_client(self) -> Any:
        import httpx

        config = self.config
        return httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(
                max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
            ),
            headers={"User-Agent": "outbox-relay", **config.headers},
            follow_redirects=False,
        )

    async def _post_each(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = [None] * len(events)
        pending = iter(range(len(events)))

        async def worker() -> None:
            for index in pending:
                waiting = self._pause.still_waiting()
                if waiting is not None:
                    results[index] = waiting
                    continue
                event = events[index]
                headers = event_headers(event)
                if isinstance(headers, str):
                    results[index] = Failure(f"not sent: {headers}", permanent=True)
                    continue
                results[index], _status = await self._post(event.payload, headers)

        await asyncio.gather(*(worker() for _ in range(min(len(events), self.config.max_concurrency))))
        return results

    async def _post_batch(self, events: Sequence[OutboxEvent]) -> tuple[PublishResult, int | None]:
        return await self._post(batch_body(events), batch_headers(events))

    async def _narrow(
        self, events: Sequence[OutboxEvent], result: PublishResult, status: int | None
    ) -> list[PublishResult]:
        """The results of a batch, narrowing a refusal (4xx) down to the events it is about.

        A refused batch of several events is split in halves, each sent again: a half that is
        accepted is acknowledged, a refused half is split again, so one refused event costs about
        2*log2(n) more requests and its 999 neighbours are not dead-lettered with it. When both
        halves are refused too, the receiver refuses the batch as such (a bad token, a wrong
        URL), and every event gets the refusal without more requests. A 413 (too large) always
        splits, down to single events if need be."""
        if result is None or not result.permanent or len(events) == 1:
            return [result] * len(events)
        middle = len(events) // 2
        halves = (events[:middle], events[middle:])
        answers = await asyncio.gather(*(self._post_batch(half) for half in halves))
        if status != 413 and all(r is not None and r.permanent for r, _ in answers):
            return [result] * len(events)
        results: list[PublishResult] = []
        for half, (half_result, half_status) in zip(halves, answers, strict=True):
            results += await self._narrow(half, half_result, half_status)
        return results

    async def _post(self, body: bytes, headers: dict[str, bytes]) -> tuple[PublishResult, int | None]:
        """One request: its outcome, and the status code when the receiver answered."""
        import httpx

        try:
            # httpx's timeout bounds each read; a receiver that answers a byte at a time would
            # hold the call (and readiness) forever: the whole request gets the same bound.
            async with asyncio.timeout(self.config.timeout), self._slots:
                # Asked with a connection free for it, right before it goes: a relay that froze
                # while this request waited its turn and woke after its lease ended sends nothing.
                if not self.may_send():
                    return LEASE_ENDED, None
                response = await self._client.post(self.config.url, content=body, headers=headers)
        except (httpx.TimeoutException, TimeoutError):
            return Failure(
                f"webhook {self._display_url}: no response within {self.config.timeout:g}s (timeout)",
                transient=True,
            ), None
        except httpx.HTTPError as exc:
            return Failure(f"webhook {self._display_url}: {explain(exc)}", transient=True), None
        return self._outcome(response), response.status_code

    def _outcome(self, response: Any) -> PublishResult:
        """What the receiver's answer means for the events of the request (see `outcomes`)."""
        status = response.status_code
        if 200 <= status < 300:
            return None
        reason = answer_reason(self._display_url, status, response.reason_phrase, response.text)
        if is_transient(status):
            return Failure(reason + self._pause.honour(response.headers.get("Retry-After")), transient=True)
        return refusal(status, reason)
