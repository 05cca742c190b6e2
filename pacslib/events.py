"""The one versioned event envelope every service publishes (modelled on CloudEvents 1.0).

Event payloads carry identifiers (UIDs, object ids), never patient demographics.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENVELOPE_VERSION = "1"

# Topics (Kafka topic names in cluster mode; streams of the embedded log).
TOPIC_INSTANCES = "pacs.instances"
TOPIC_AUDIT = "pacs.audit"  # security and access events, consumed by the audit service
TOPIC_ALERTS = "pacs.alerts"  # alerts the audit service raises (break-glass, mass viewing, ...)

# Event types.
INSTANCE_STORED = "pacs.instance.stored"


class Event(BaseModel):
    """A fact that happened, published after the state change that it describes was committed."""

    model_config = ConfigDict(frozen=True)

    envelope_version: str = Field(ENVELOPE_VERSION, description="Version of this envelope schema.")
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, description="Unique id; consumers dedupe on it."
    )
    type: str = Field(description="What happened, e.g. pacs.instance.stored.")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When, in UTC.")
    source: str = Field(description="The service that published it.")
    subject: str = Field(description="What it is about (e.g. the study UID); also the partition key.")
    traceparent: str | None = Field(None, description="W3C trace context of the request that caused it.")
    data_version: str = Field("1", description="Version of the payload schema for this type.")
    data: dict[str, Any] = Field(default_factory=dict)

    def encode(self) -> bytes:
        """Serialize to compact JSON bytes."""
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, body: bytes) -> Event:
        """Parse an event; raises pydantic.ValidationError on a malformed body."""
        return cls.model_validate(json.loads(body))
