"""Container health check: ``python healthcheck.py PORT_VARIABLE PATH`` exits 0 when the local endpoint says 200.

The image's HEALTHCHECK runs it (no curl in the image). ``PORT_VARIABLE`` names the environment variable
holding the listen port (e.g. ``PACS_STORAGE_PORT``), so a changed port keeps the check right.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def check(port: int, path: str) -> bool:
    """True when ``GET http://127.0.0.1:<port><path>`` answers 200."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].startswith("/"):
        print("usage: healthcheck.py PORT_VARIABLE /PATH", file=sys.stderr)
        return 2
    variable, path = argv
    raw = os.environ.get(variable, "")
    if not raw.isdigit():
        print(f"healthcheck: {variable} is not set to a port number", file=sys.stderr)
        return 2
    healthy = check(int(raw), path)
    if not healthy:
        print(f"healthcheck: {path} on port {raw} is not answering 200", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
