"""``python -m embedded`` (what ``make run`` does): the whole system on this machine, no external servers."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from embedded.launcher import EmbeddedSystem


def first_admin(system: EmbeddedSystem) -> None:
    """Create the first administrator on first start and show its one-time password (once)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.auth.bootstrap"],
        env=system.environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        print("could not create the first administrator: " + done.stderr.strip(), file=sys.stderr)
    elif "one-time password" in done.stdout:
        print(done.stdout, end="", flush=True)
    else:
        print("first administrator: exists already (reset its password through the admin API)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("PACS_EMBEDDED_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PACS_EMBEDDED_PORT", "8042")))
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("PACS_STATE_DIR", "var")))
    args = parser.parse_args(argv)
    system = EmbeddedSystem(state_dir=args.state_dir.resolve(), host=args.host, port=args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(
        f"starting cloudpacs (state in {system.state_dir}, logs in {system.state_dir / 'logs'}) ...",
        flush=True,
    )
    system.start()
    print(f"cloudpacs is up. DICOMweb base URL: {system.dicomweb_url}", flush=True)
    first_admin(system)
    print("press Ctrl-C to stop", flush=True)
    try:
        while not stop.is_set():
            for name, proc in system.processes.items():
                if proc.poll() is not None:
                    print(f"the {name} process exited (code {proc.returncode}); stopping", file=sys.stderr)
                    stop.set()
            stop.wait(1.0)
    finally:
        system.stop()
        print("cloudpacs stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
