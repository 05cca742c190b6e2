"""Builds the event bus adapter a service's settings ask for: the embedded SQLite log or Kafka."""

from __future__ import annotations

from pacslib.eventbus import EventBus, SqliteEventBus
from pacslib.settings import ServiceSettings


def kafka_client_id(settings: ServiceSettings) -> str:
    """The Kafka client id of a service (``cloudpacs-storage`` for ``PACS_STORAGE_``): broker logs, quotas."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    service = prefix.removeprefix("PACS_").strip("_").lower()
    return f"cloudpacs-{service}" if service else "cloudpacs"


def build_event_bus(settings: ServiceSettings) -> EventBus:
    """The event bus adapter of ``settings.event_bus``; raises ValueError on incomplete Kafka settings."""
    if settings.event_bus == "kafka":
        from pacslib.eventbus_kafka import KafkaConfig, KafkaEventBus

        prefix = str(settings.model_config.get("env_prefix", "PACS_<SERVICE>_"))
        if not settings.kafka_bootstrap_servers:
            raise ValueError(f"event_bus=kafka needs {prefix}KAFKA_BOOTSTRAP_SERVERS")
        password = settings.kafka_sasl_password
        if settings.kafka_security_protocol.startswith("SASL") and not (
            settings.kafka_sasl_username and password is not None and password.get_secret_value()
        ):
            raise ValueError(
                f"{prefix}KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} needs "
                f"{prefix}KAFKA_SASL_USERNAME and {prefix}KAFKA_SASL_PASSWORD"
            )
        return KafkaEventBus(
            KafkaConfig(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                security_protocol=settings.kafka_security_protocol,
                sasl_mechanism=settings.kafka_sasl_mechanism,
                sasl_username=settings.kafka_sasl_username,
                sasl_password=password.get_secret_value() if password is not None else None,
                ssl_cafile=settings.kafka_ssl_cafile,
                client_id=kafka_client_id(settings),
                topic_prefix=settings.kafka_topic_prefix,
                partitions=settings.kafka_topic_partitions,
                replication_factor=settings.kafka_topic_replication_factor,
                retention_ms=settings.kafka_topic_retention_ms,
                delivery_timeout_ms=settings.kafka_delivery_timeout_ms,
            )
        )
    return SqliteEventBus(settings.resolved_event_log_path())
