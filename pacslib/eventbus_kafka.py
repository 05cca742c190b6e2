"""The cluster adapter of the event bus port: Kafka, through aiokafka.

* Publishing: one idempotent producer (``enable_idempotence``, ``acks="all"``); a record's key (the
  study UID for instance events) picks its partition, so one study's events stay in order. ``publish``
  returns only when the brokers acknowledged every record, and raises otherwise (the outbox relay keeps
  the events and retries; a retry may publish some records twice).
* Consuming: one consumer per (group, topic), created on first use, in the Kafka consumer group of that
  name, without auto-commit. ``fetch`` returns the records after the group's committed offsets: records
  handed out but not committed are handed out again by the next ``fetch`` (the partitions are rewound),
  exactly like the embedded log. ``commit`` stores offset + 1 per partition and never moves a partition
  back. A partition taken away by a rebalance is not committed here: its new owner resumes from the last
  commit (at least once; consumers deduplicate by event id, see pacslib/consumer.py).
* Topics: created when first used, when missing, with the configured partitions, replication factor and
  retention (existing topics are left as they are: changing the partition count of a keyed topic would
  break the order of a study's events). Topic and group names carry the configured prefix.

Record bodies are never logged: they are events whose payloads are identifiers, but logs stay free of
them anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import for_code  # type: ignore[import-untyped]
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]

from pacslib.eventbus import BusRecord

log = logging.getLogger("pacs.eventbus.kafka")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_TOPIC_ALREADY_EXISTS = 36
_CLOSE_TIMEOUT = 10.0
_DROP_TIMEOUT = 2.0  # stopping a producer that just failed (its undelivered records are given up)


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """Everything the Kafka adapter needs; built from the service settings by pacslib/eventbus_factory.py."""

    bootstrap_servers: str
    security_protocol: SecurityProtocol = "SASL_SSL"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    client_id: str = "cloudpacs"
    topic_prefix: str = ""
    partitions: int = 6
    replication_factor: int = 3
    retention_ms: int = 7 * 24 * 3600 * 1000
    request_timeout_ms: int = 30_000
    # How long a publish or a commit may wait for the brokers before it raises (the producer and the
    # group coordinator would otherwise retry for as long as the brokers are unreachable).
    delivery_timeout_ms: int = 60_000
    session_timeout_ms: int = 10_000
    poll_timeout_ms: int = 500
    ping_timeout: float = 5.0
    # Static group membership (KIP-345): a stable id per replica (e.g. its pod name). A restarted
    # consumer with the same id takes its partitions back at once instead of after the session timeout
    # of its dead predecessor. Never share an id between live replicas: they would fence each other.
    group_instance_id: str | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("the Kafka event bus needs bootstrap servers")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"Kafka security protocol {self.security_protocol} needs a SASL user and password"
            )
        if self.partitions < 1 or self.replication_factor < 1:
            raise ValueError("Kafka topics need at least one partition and one replica")

    def connection(self) -> dict[str, Any]:
        """Keyword arguments shared by the producer, the consumers and the admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile is not None else None
            )
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def topic_configs(self) -> dict[str, str]:
        """Configuration of the topics this adapter creates."""
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": "delete",
            # acks=all waits for the in-sync replicas; with three replicas, two must have every record.
            "min.insync.replicas": str(max(1, self.replication_factor - 1)),
        }


class _Offsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """What one group consumer handed out and committed, per partition it owns."""

    def __init__(self) -> None:
        self.rewind: dict[Any, int] = {}  # partition -> first offset handed out and not committed
        self.handed_end: dict[Any, int] = {}  # partition -> offset after the last record handed out
        self.committed: dict[Any, int] = {}  # partition -> committed offset (the next to read)

    def forget(self, partitions: Iterable[Any]) -> None:
        for tp in partitions:
            self.rewind.pop(tp, None)
            self.handed_end.pop(tp, None)
            self.committed.pop(tp, None)

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        # Another member may own these next and commit them; start afresh if they come back.
        self.forget(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        return None


@dataclass
class _GroupConsumer:
    consumer: Any  # AIOKafkaConsumer
    offsets: _Offsets
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class KafkaEventBus:
    """EventBus on a Kafka cluster (see the module docstring for the guarantees)."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._setup_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._admin: Any = None
        self._producer: Any = None
        self._topics_ready: set[str] = set()
        self._consumers: dict[tuple[str, str], _GroupConsumer] = {}
        self._consumer_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._closed = False

    @property
    def config(self) -> KafkaConfig:
        return self._config

    def topic_name(self, topic: str) -> str:
        """The Kafka topic behind a bus topic."""
        return self._config.topic_prefix + topic

    def group_name(self, group: str) -> str:
        """The Kafka consumer group behind a bus group."""
        return self._config.topic_prefix + group

    # -- clients -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the Kafka event bus is closed")

    async def _admin_client(self) -> Any:
        async with self._setup_lock:
            self._check_open()
            if self._admin is None:
                admin = AIOKafkaAdminClient(**self._config.connection())
                try:
                    await admin.start()
                except BaseException:
                    await _quietly(admin.close())
                    raise
                self._admin = admin
            return self._admin

    async def _drop_admin(self) -> None:
        async with self._setup_lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            await _quietly(admin.close())

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the Kafka topics of these bus topics when they do not exist yet."""
        wanted = sorted({t for t in topics if t not in self._topics_ready})
        if not wanted:
            return
        admin = await self._admin_client()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if self.topic_name(t) not in existing]
            if missing:
                response = await admin.create_topics(
                    [
                        NewTopic(
                            self.topic_name(t),
                            self._config.partitions,
                            self._config.replication_factor,
                            topic_configs=self._config.topic_configs(),
                        )
                        for t in missing
                    ]
                )
                for result in response.topic_errors:
                    name, code = result[0], result[1]
                    if code not in (0, _TOPIC_ALREADY_EXISTS):
                        raise for_code(code)(f"cannot create Kafka topic {name}")
                    if code == 0:
                        log.info(
                            "created Kafka topic %s (%d partitions, replication %d)",
                            name,
                            self._config.partitions,
                            self._config.replication_factor,
                        )
        except Exception:
            await self._drop_admin()  # reconnect from scratch next time
            raise
        self._topics_ready.update(wanted)

    async def _started_producer(self) -> Any:
        async with self._setup_lock:
            self._check_open()
            if self._producer is None:
                producer = AIOKafkaProducer(
                    **self._config.connection(),
                    enable_idempotence=True,
                    acks="all",
                    linger_ms=5,
                )
                try:
                    await producer.start()
                except BaseException:
                    await _quietly(producer.stop())
                    raise
                self._producer = producer
            return self._producer

    async def _drop_producer(self) -> None:
        async with self._setup_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await _quietly(producer.stop(), _DROP_TIMEOUT)

    async def _group_consumer(self, group: str, topic: str) -> _GroupConsumer:
        existing = self._consumers.get((group, topic))
        if existing is not None:
            return existing
        async with self._consumer_locks.setdefault((group, topic), asyncio.Lock()):
            existing = self._consumers.get((group, topic))
            if existing is not None:
                return existing
            self._check_open()
            await self.ensure_topics([topic])
            offsets = _Offsets()
            consumer = AIOKafkaConsumer(
                **self._config.connection(),
                group_id=self.group_name(group),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self._config.session_timeout_ms,
                heartbeat_interval_ms=max(100, self._config.session_timeout_ms // 3),
                isolation_level="read_committed",
                group_instance_id=(
                    f"{self._config.group_instance_id}.{topic}" if self._config.group_instance_id else None
                ),
            )
            consumer.subscribe([self.topic_name(topic)], listener=offsets)
            try:
                # start() joins the group; a member that died without leaving holds its partitions
                # until its session times out, so allow for that.
                timeout = (self._config.session_timeout_ms + self._config.request_timeout_ms) / 1000
                await asyncio.wait_for(consumer.start(), timeout)
                self._check_open()
            except BaseException:
                await _quietly(consumer.stop())
                raise
            created = _GroupConsumer(consumer, offsets)
            self._consumers[(group, topic)] = created
            return created

    async def _drop_consumer(self, group: str, topic: str, gc: _GroupConsumer) -> None:
        if self._consumers.get((group, topic)) is gc:
            del self._consumers[(group, topic)]
        await _quietly(gc.consumer.stop(), _DROP_TIMEOUT)

    # -- the port ----------------------------------------------------------------------------------

    async def publish(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        if not records:
            return
        await self.ensure_topics(topic for topic, _, _ in records)
        async with self._publish_lock:
            producer = await self._started_producer()
            try:
                await asyncio.wait_for(self._send_all(producer, records), self._timeout)
            except BaseException:
                # A fresh producer (new producer id) next time: a failed idempotent producer may be
                # left with sequence numbers the brokers no longer accept.
                await self._drop_producer()
                raise

    async def _send_all(self, producer: Any, records: Sequence[tuple[str, str, bytes]]) -> None:
        """Queue every record, then wait until the brokers acknowledged each of them."""
        deliveries = [
            await producer.send(self.topic_name(topic), value=body, key=key.encode())
            for topic, key, body in records
        ]
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @property
    def _timeout(self) -> float:
        return self._config.delivery_timeout_ms / 1000

    async def fetch(self, group: str, topic: str, limit: int = 100) -> list[BusRecord]:
        if limit < 1:
            return []
        gc = await self._group_consumer(group, topic)
        consumer, offsets = gc.consumer, gc.offsets
        async with gc.lock:
            assigned = consumer.assignment()
            for tp, offset in offsets.rewind.items():
                if tp in assigned:
                    consumer.seek(tp, offset)
            offsets.rewind.clear()
            offsets.handed_end.clear()
            try:
                batches = await consumer.getmany(timeout_ms=self._config.poll_timeout_ms, max_records=limit)
            except Exception:
                # A consumer whose group coordination failed starts afresh (from the committed offsets).
                await self._drop_consumer(group, topic, gc)
                raise
            out: list[BusRecord] = []
            for tp, messages in batches.items():
                if not messages:
                    continue
                offsets.rewind[tp] = messages[0].offset
                offsets.handed_end[tp] = messages[-1].offset + 1
                for m in messages:
                    key = m.key.decode("utf-8", "replace") if m.key is not None else ""
                    out.append(BusRecord(topic, m.offset, key, bytes(m.value or b""), tp.partition))
            return out

    async def commit(self, group: str, records: Sequence[BusRecord]) -> None:
        by_topic: dict[str, dict[int, int]] = {}
        for record in records:
            latest = by_topic.setdefault(record.topic, {})
            latest[record.partition] = max(latest.get(record.partition, -1), record.offset + 1)
        for topic, latest in by_topic.items():
            gc = await self._group_consumer(group, topic)
            async with gc.lock:
                await self._commit_partitions(gc, topic, latest)

    async def _commit_partitions(self, gc: _GroupConsumer, topic: str, latest: dict[int, int]) -> None:
        consumer, offsets = gc.consumer, gc.offsets
        assigned = consumer.assignment()
        to_commit: dict[Any, int] = {}
        for partition, offset in latest.items():
            tp = TopicPartition(self.topic_name(topic), partition)
            if tp not in assigned:
                # Rebalanced away: the new owner resumes from the last commit (at least once).
                log.info("not committing %s partition %d: no longer assigned", tp.topic, partition)
                continue
            known = offsets.committed.get(tp)
            if known is None:
                known = await asyncio.wait_for(consumer.committed(tp), self._timeout)
                known = -1 if known is None else int(known)
            if offset > known:
                to_commit[tp] = offset
            done = max(offset, known)
            start = offsets.rewind.get(tp)
            if start is not None and start < done:
                if offsets.handed_end.get(tp, 0) > done:
                    offsets.rewind[tp] = done
                else:
                    offsets.rewind.pop(tp, None)
                    offsets.handed_end.pop(tp, None)
            offsets.committed[tp] = done
        if to_commit:
            try:
                await asyncio.wait_for(consumer.commit(to_commit), self._timeout)
            except BaseException:
                offsets.forget(to_commit)  # ask the broker again next time
                raise

    async def ping(self) -> None:
        """Raise unless a broker answers a metadata request in time."""
        admin = await asyncio.wait_for(self._admin_client(), self._config.ping_timeout)
        try:
            await asyncio.wait_for(admin.describe_cluster(), self._config.ping_timeout)
        except Exception:
            await self._drop_admin()
            raise

    async def close(self) -> None:
        """Leave the consumer groups (without committing), flush and stop the producer."""
        async with self._setup_lock:
            self._closed = True
            consumers = list(self._consumers.values())
            self._consumers.clear()
            producer, self._producer = self._producer, None
            admin, self._admin = self._admin, None
        for gc in consumers:
            await _quietly(gc.consumer.stop())
        if producer is not None:
            await _quietly(producer.stop())
        if admin is not None:
            await _quietly(admin.close())


async def _quietly(step: Any, seconds: float = _CLOSE_TIMEOUT) -> None:
    """Await a shutdown step, bounded in time; a broker that is gone must not block a shutdown."""
    try:
        await asyncio.wait_for(step, seconds)
    except Exception as exc:
        log.warning("Kafka client shutdown step failed: %s", type(exc).__name__)
