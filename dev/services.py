"""``make services-up`` / ``make services-down``: the embedded SeaweedFS S3 server, data under .services/."""

from __future__ import annotations

import sys
from pathlib import Path

from requant.testing import seaweed

STATE = Path(".services/seaweed.json")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    server = seaweed.load_state(STATE)
    if command == "up":
        if server is None:
            server = seaweed.start(Path(".services/seaweed-data"))
            seaweed.save_state(server, STATE)
        print(f"SeaweedFS S3 at {server.endpoint} (pid {server.pid}); for boto3/aws CLI:")
        for key, value in server.env().items():
            print(f"export {key}={value}")
    elif command == "down":
        if server is not None:
            seaweed.stop(server)
        STATE.unlink(missing_ok=True)
        print("SeaweedFS stopped")
    else:
        print("usage: python -m dev.services up|down", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
