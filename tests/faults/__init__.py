"""Fault-injection suite: real ``exq-fast run`` processes against private redis-servers.

Every scenario starts its own ``redis-server`` (never the shared one on 6379),
its own worker processes and, where the network is the fault, a ``TcpProxy``;
``harness.py`` stops all of them at teardown. See ``RESULTS.md`` for figures.
"""
