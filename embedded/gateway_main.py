"""``python -m embedded.gateway_main``: run the embedded gateway (started by the launcher)."""

from __future__ import annotations

import os

import uvicorn

from embedded.gateway import Gateway


def main() -> None:
    upstreams = dict(item.split("=", 1) for item in os.environ["PACS_GATEWAY_UPSTREAMS"].split(","))
    uvicorn.run(
        Gateway(upstreams, body_idle_timeout=float(os.environ.get("PACS_GATEWAY_BODY_IDLE_TIMEOUT", "60"))),
        host=os.environ.get("PACS_GATEWAY_HOST", "127.0.0.1"),
        port=int(os.environ.get("PACS_GATEWAY_PORT", "8042")),
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
