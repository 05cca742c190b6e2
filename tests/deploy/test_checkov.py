"""checkov finds nothing in the rendered chart (every value set) or the Dockerfile beyond accepted findings.

checkov runs once per session. It lives in its own virtualenv (its pins clash with ours); the path is
``.venv/tools/checkov/bin/checkov`` or ``$CLOUDPACS_CHECKOV``. A missing checkov is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import HELM_DIR, REPO_ROOT, Manifest

CONFIG = HELM_DIR / "checkov.yaml"
README = HELM_DIR / "README.md"
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"


def checkov_executable() -> Path:
    path = Path(
        os.environ.get("CLOUDPACS_CHECKOV", REPO_ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov")
    )
    assert os.access(path, os.X_OK), (
        f"checkov is not installed at {path}: python3.11 -m venv .venv/tools/checkov && "
        ".venv/tools/checkov/bin/pip install -r deploy/helm/checkov-requirements.txt"
    )
    return path


@pytest.fixture(scope="session")
def checkov_reports(
    rendered_sets: dict[str, list[Manifest]], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """One checkov run over every value set's manifests and the Dockerfile."""
    executable = checkov_executable()
    root = tmp_path_factory.mktemp("checkov")
    for name, docs in rendered_sets.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (root / "Dockerfile").write_text(DOCKERFILE.read_text())
    result = subprocess.run(
        [str(executable), "--config-file", str(CONFIG), "--directory", str(root), "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.stdout.strip(), (
        f"checkov printed nothing (exit {result.returncode}): {result.stderr[-2000:]}"
    )
    parsed = json.loads(result.stdout)
    return parsed if isinstance(parsed, list) else [parsed]


def test_checkov_scanned_the_manifests_and_the_dockerfile(checkov_reports: list[dict[str, Any]]) -> None:
    by_type = {r["check_type"]: r for r in checkov_reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}
    assert by_type["kubernetes"]["summary"]["resource_count"] > 100
    for report in checkov_reports:
        assert report["summary"]["passed"] > 0
        assert report["summary"]["parsing_errors"] == 0


def test_checkov_finds_nothing_unaccepted(checkov_reports: list[dict[str, Any]]) -> None:
    failed = [
        f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})"
        for report in checkov_reports
        for check in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)


def accepted_in_readme() -> dict[str, str]:
    """Check id -> reason from the README's "Accepted findings" table."""
    text = README.read_text()
    section = text.split("## Accepted findings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (CKV\w+) \| [^|]+ \| ([^|]+) \|$", section, flags=re.MULTILINE)
    return {check: reason.strip() for check, reason in rows}


def test_every_skipped_check_is_documented_with_a_reason() -> None:
    skipped = yaml.safe_load(CONFIG.read_text())["skip-check"]
    documented = accepted_in_readme()
    assert sorted(skipped) == sorted(documented)
    for check, reason in documented.items():
        assert len(reason) > 40, f"{check} needs a real reason in {README}"
