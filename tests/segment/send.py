#!/usr/bin/env python3
"""Sends Segment calls to nudge with Segment's own Python library
(segment-analytics-python), as a shop's backend would: queued, batched to
/v1/batch, gzip-compressed, with the write key as the basic-auth user.

Usage: send.py HOST WRITE_KEY < calls.json
calls.json is a list of {"call": "track" | "identify" | "page", "args": {...}},
the args as the library's methods take them (timestamps as ISO strings).
Prints the number of calls sent; exits 1 if the library reported an error
(nudge refused a batch, or could not be reached after its retries).
"""
import json
import sys
from datetime import datetime

try:
    from segment.analytics.client import Client
except ImportError:
    sys.exit("segment-analytics-python is not installed for this python (see .ci/run)")

host, write_key = sys.argv[1], sys.argv[2]
calls = json.load(sys.stdin)
errors = []
client = Client(
    write_key,
    host=host,
    gzip=True,
    max_retries=3,
    upload_interval=0.1,
    on_error=lambda e, batch: errors.append(f"{e} ({len(batch)} messages)"),
)
for c in calls:
    args = dict(c["args"])
    if "timestamp" in args:
        args["timestamp"] = datetime.fromisoformat(args["timestamp"].replace("Z", "+00:00"))
    ok, _ = getattr(client, c["call"])(**args)
    if not ok:
        errors.append(f"could not queue {c}")
client.shutdown()
if errors:
    sys.exit("segment library errors: " + "; ".join(errors))
print("sent", len(calls))
