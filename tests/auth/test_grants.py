"""Share and break-glass grants, their review, and the access API other services query."""

from __future__ import annotations

from typing import Any

from tests.auth.conftest import Harness, make_settings, start_harness
from tests.auth.test_no_secrets_at_rest import database_bytes

STUDY = "1.2.826.0.1.3680043.10.7.1"
OTHER_STUDY = "1.2.826.0.1.3680043.10.7.2"
SECRET = "storage-secret-0123456789abcdef"


async def service_headers(h: Harness) -> dict[str, str]:
    r = await h.client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=("storage", SECRET)
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def test_shares_break_glass_and_the_access_api(tmp_path: Any) -> None:
    settings = make_settings(tmp_path / "s", service_clients={"storage": SECRET})
    async with start_harness(settings) as h:
        org_a, org_b = await h.org("Hospital A"), await h.org("Hospital B")
        rad_a = await h.user(org_a, "rad-a", ["radiologist"])
        admin_a = await h.user(org_a, "admin-a", ["admin"])
        auditor_a = await h.user(org_a, "aud-a", ["auditor"])
        ref_b = await h.user(org_b, "ref-b", ["referring_physician"])

        async def access(user_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
            headers = headers or await service_headers(h)
            r = await h.client.get(f"/auth/internal/access/{user_id}", headers=headers)
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body

        assert (await access(ref_b.id))["studies"] == []
        assert (await access(ref_b.id))["org"] == org_b

        # A radiologist of A shares one study with the referring physician of B, for a day.
        rad_auth = await h.bearer(rad_a)
        r = await h.client.post(
            "/auth/grants",
            headers=rad_auth,
            json={"study_uid": STUDY, "grantee_user": ref_b.id, "expires_at": h.clock() + 86400},
        )
        assert r.status_code == 201, r.text
        share = r.json()
        studies = (await access(ref_b.id))["studies"]
        assert [(s["study_uid"], s["org"], s["via"]) for s in studies] == [(STUDY, org_a, "share")]
        svc = await service_headers(h)
        check = await h.client.get(
            f"/auth/internal/access/{ref_b.id}/check", params={"org": org_a, "study_uid": STUDY}, headers=svc
        )
        assert check.json()["allowed"] is True
        check = await h.client.get(
            f"/auth/internal/access/{ref_b.id}/check",
            params={"org": org_a, "study_uid": OTHER_STUDY},
            headers=svc,
        )
        assert check.json() == {"allowed": False, "via": None}
        # A user's token is refused on the internal API, and so is no token at all.
        r = await h.client.get(f"/auth/internal/access/{ref_b.id}", headers=rad_auth)
        assert r.status_code == 403
        assert (await h.client.get(f"/auth/internal/access/{ref_b.id}")).status_code == 401

        # Clinicians cannot share every study of the organization; administrators can.
        r = await h.client.post("/auth/grants", headers=rad_auth, json={"grantee_org": org_b})
        assert r.status_code == 403
        admin_auth = await h.bearer(admin_a)
        r = await h.client.post("/auth/grants", headers=admin_auth, json={"grantee_org": org_b})
        assert r.status_code == 201
        whole = r.json()
        assert (await access(ref_b.id))["orgs"] == [org_a]

        # Expiry and revocation end access.
        h.clock.advance(86401)
        assert (await access(ref_b.id))["studies"] == []
        r = await h.client.delete(f"/auth/grants/{whole['id']}", headers=await h.bearer(admin_a))
        assert r.status_code == 200
        assert (await access(ref_b.id))["orgs"] == []

        # Break-glass: a clinician of B opens a study of A with a stated reason.
        ref_auth = await h.bearer(ref_b)
        r = await h.client.post(
            "/auth/break-glass",
            headers=ref_auth,
            json={"owner_org": org_a, "study_uid": STUDY, "reason": "urgent"},
        )
        assert r.status_code == 400  # the reason is too short
        r = await h.client.post(
            "/auth/break-glass",
            headers=ref_auth,
            json={"owner_org": org_a, "study_uid": STUDY, "reason": "patient in ER, prior CT needed now"},
        )
        assert r.status_code == 201
        glass = r.json()
        assert glass["review_status"] == "pending"
        assert glass["expires_at"] == h.clock() + h.settings.break_glass_seconds
        assert [s["via"] for s in (await access(ref_b.id))["studies"]] == ["break_glass"]

        # A's auditor sees it pending review, with the reason, and rules on it.
        aud_auth = await h.bearer(auditor_a)
        pending = (await h.client.get("/auth/break-glass?pending_review=true", headers=aud_auth)).json()[
            "grants"
        ]
        assert [(g["id"], g["reason"]) for g in pending] == [
            (glass["id"], "patient in ER, prior CT needed now")
        ]
        # The reason is free text (it may name a patient): sealed at rest, never in the store in clear.
        assert b"prior CT needed now" not in database_bytes(h)
        r = await h.client.post(
            f"/auth/break-glass/{glass['id']}/review", headers=aud_auth, json={"outcome": "unjustified"}
        )
        assert r.status_code == 200
        assert r.json()["review_status"] == "unjustified"
        assert (await access(ref_b.id))["studies"] == []  # unjustified access is cut off at once
        assert (await h.client.get("/auth/break-glass?pending_review=true", headers=aud_auth)).json()[
            "grants"
        ] == []

        # Break-glass also expires on its own.
        r = await h.client.post(
            "/auth/break-glass",
            headers=await h.bearer(ref_b),
            json={"owner_org": org_a, "study_uid": OTHER_STUDY, "reason": "night shift emergency consult"},
        )
        assert r.status_code == 201
        h.clock.advance(h.settings.break_glass_seconds + 1)
        assert (await access(ref_b.id))["studies"] == []

        # A user token cannot use the internal API; an unknown user is a 404.
        assert (await h.client.get(f"/auth/internal/access/{ref_b.id}", headers=admin_auth)).status_code in (
            401,
            403,
        )
        assert (
            await h.client.get("/auth/internal/access/nobody", headers=await service_headers(h))
        ).status_code == 404

        types = await h.event_types()
        for expected in (
            "pacs.auth.grant.created",
            "pacs.auth.grant.revoked",
            "pacs.auth.break_glass.opened",
            "pacs.auth.break_glass.reviewed",
            "pacs.auth.service_token.issued",
        ):
            assert expected in types
        events = await h.events()
        glass_event = next(e for e in events if e.type == "pacs.auth.break_glass.opened")
        assert "reason" not in glass_event.data  # free text stays in the auth store
        assert glass_event.data["actor"]["sub"] == ref_b.id
        assert share["id"] in {e.subject for e in events}
