"""`python -m tests.bench.drain_child '[dsn, sink, events]'`: one timed drain (see
`tests.bench.bench_polling_file.drain_in_child`), printed as one JSON line."""

from __future__ import annotations

import dataclasses
import json
import sys

from tests.bench.bench_polling_file import drain_in_process

if __name__ == "__main__":
    dsn, sink, events, *reading = json.loads(sys.argv[1])
    print(json.dumps(dataclasses.asdict(drain_in_process(dsn, sink, events, *reading))))
