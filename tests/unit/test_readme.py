"""The README's configuration tables stay true to the settings classes."""

from __future__ import annotations

from pathlib import Path

from pacslib.settings import ServiceSettings
from services.audit.settings import AuditSettings
from services.auth.settings import AuthSettings
from services.ingest.settings import IngestSettings
from services.render.settings import RenderSettings
from services.storage.settings import StorageSettings

README = (Path(__file__).parents[2] / "README.md").read_text()
SERVICES = (AuthSettings, IngestSettings, StorageSettings, RenderSettings, AuditSettings)


def test_every_setting_is_documented() -> None:
    common = set(ServiceSettings.model_fields)
    for name in common:
        assert f"`PACS_<SERVICE>_{name.upper()}`" in README, name
    for cls in SERVICES:
        prefix = cls.model_config["env_prefix"]
        for name in set(cls.model_fields) - common:
            assert f"`{prefix}{name.upper()}`" in README, f"{prefix}{name.upper()}"


def test_no_documented_setting_is_stale() -> None:
    known = {f"PACS_<SERVICE>_{n.upper()}" for n in ServiceSettings.model_fields}
    for cls in SERVICES:
        known |= {f"{cls.model_config['env_prefix']}{n.upper()}" for n in cls.model_fields}
    known |= {"PACS_EMBEDDED_HOST", "PACS_EMBEDDED_PORT", "PACS_STATE_DIR"}
    for line in README.splitlines():
        if line.startswith("| `PACS_"):
            assert line.split("`")[1] in known, line
