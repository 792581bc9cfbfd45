"""The helper process of a long rebuild (``ledger.rebuild``, ``ledger.replay_aside``):
``python -m queuectl.aside LEDGER SCRATCH PROJECTION...`` replays those projections from
the SQLite ledger into the scratch file and prints what it replayed as JSON."""

from __future__ import annotations

import sys

import msgspec

from queuectl import ledger


def main(argv: list[str]) -> int:
    source, scratch, *names = argv
    sys.stdout.write(msgspec.json.encode(ledger.replay_aside(source, scratch, names)).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
