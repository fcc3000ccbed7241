"""Stand-ins for the relay's MQTT client (`edge.relay.Publisher`) in the relay tests."""

from __future__ import annotations

from edge.mqtt import Outcome
from edge.protocol import Outgoing


class FakePublisher:
    """Always connected; each message's outcome comes from `outcome(message, request id)`."""

    def is_connected(self) -> bool:
        return True

    def publish_many(self, messages: list[Outgoing], timeout: float) -> list[Outcome | None]:
        return [self.outcome(m, m.topic.rsplit("/", 1)[-1]) for m in messages]

    def outcome(self, message: Outgoing, request_id: str) -> Outcome | None:
        raise NotImplementedError
