"""``realtime-lab bench``: load-test the five transports and report what each one costs.

The ticker workload compares the four that read a channel; the chats workload compares all five
(fetch streaming starts its chat with the request that streams it).

Layout:

- :mod:`.wire` - sans-I/O fast parsers for what the load clients read (HTTP heads, chunked
  bodies, SSE blocks, WebSocket frames, envelope fields);
- :mod:`.stats` - percentiles and median/min/max summaries;
- :mod:`.server` - the server under test as a separate process, with its CPU time and RSS read
  from ``/proc``;
- :mod:`.loadgen` - the light load clients, run in worker processes (one asyncio loop each);
- ``loadclient.c`` and :mod:`.native` - the native load client that reads SSE, WebSocket and
  fetch streams for the workers (one epoll loop, one ``recv`` per event), built once with ``cc``;
- :mod:`.runner` - the sweep: points, warm-up, measurement windows, repeats, the slow-subscriber
  scenario;
- :mod:`.report` and :mod:`.plots` - results.json, results.md and one PNG per measure;
- :mod:`.cli` - the ``bench`` subcommand.
"""

from __future__ import annotations
