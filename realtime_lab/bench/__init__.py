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
- :mod:`.naive` - the tutorial handler ``--baseline naive`` compares with;
- :mod:`.publisher` and :mod:`.fleet` - ``--publisher http``: the external publisher and the
  subscribers it feeds; :mod:`.scale` - the scale scenario (many source addresses);
- ``floor.c`` and :mod:`.floor` - the bare C broadcaster ``--baseline floor`` compares the scale
  scenario's subscribers with;
- :mod:`.redisproc` and :mod:`.buses` - ``--bus redis,cluster``: private redis-server and Redis
  Cluster processes, several server processes on one bus, Redis's CPU;
- :mod:`.proxy` and :mod:`.h2client` - ``--via h1,h2``: nginx with TLS in front, and the HTTP/2
  client (the ``h2`` library) that reads through it;
- :mod:`.target` - what a run is pointed at (its settings, the server it starts);
- :mod:`.runner` - the sweep: points, warm-up, measurement windows, repeats, the slow-subscriber
  scenario;
- :mod:`.report` and :mod:`.plots` - results.json, results.md and one PNG per measure;
- :mod:`.cli` - the ``bench`` subcommand.
"""

from __future__ import annotations
