"""Storage's access events: published durably before an answer, or the request is refused (fail closed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from pacslib.errors import ServiceUnavailableError
from pacslib.eventbus import SqliteEventBus
from pacslib.events import TOPIC_AUDIT, Event
from pacslib.tokens import Principal
from services.storage import audit_trail

CLINICIAN = Principal(
    sub="u-1",
    org="org-a",
    roles=frozenset({"clinician", "radiologist"}),
    kind="user",
    session_id="s-1",
    token_id="t-1",
    expires_at=0.0,
)


def _request(bus: SqliteEventBus) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(ctx=SimpleNamespace(bus=bus)))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/dicom-web/studies",
        "headers": [(b"user-agent", b"viewer/1.0 " + b"x" * 1000)],
        "client": ("10.1.2.3", 5555),
        "app": app,
    }
    return Request(scope)


async def test_an_access_is_published_with_who_what_which_and_where(tmp_path: Path) -> None:
    bus = SqliteEventBus(tmp_path / "events.db")
    try:
        sent = await audit_trail.record(
            _request(bus),
            CLINICIAN,
            audit_trail.RETRIEVED,
            "1.2.3",
            study_uid="1.2.3",
            via="share",
            series_uid=None,
        )
        (record,) = await bus.fetch("test", TOPIC_AUDIT)
        event = Event.decode(record.body)
        assert event == sent
        assert record.key == "1.2.3"
        assert event.source == "storage"
        assert event.data["actor"] == {
            "sub": "u-1",
            "org": "org-a",
            "kind": "user",
            "roles": ["clinician", "radiologist"],
        }
        assert event.data["client_ip"] == "10.1.2.3"
        assert len(event.data["user_agent"]) == audit_trail.USER_AGENT_MAX
        assert event.data["via"] == "share"
        assert "series_uid" not in event.data  # None values are left out
    finally:
        await bus.close()


async def test_an_access_that_cannot_be_recorded_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    bus = SqliteEventBus(blocker / "events.db")  # cannot be created, not even by root
    with pytest.raises(ServiceUnavailableError) as refused:
        await audit_trail.record(_request(bus), CLINICIAN, audit_trail.SEARCHED, "u-1", results=3)
    assert refused.value.status_code == 503
    assert "audit trail" in refused.value.message
