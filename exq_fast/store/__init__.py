"""The Redis operations on jobs, grouped by role (layer 2, docs/architecture.md).

* ``store.enqueue``: push jobs (now, at a time, many at once) with Exq's unique
  lock, and release that lock (``unlock``);
* ``store.fetch``: fetch and ack -- move jobs from their queues into this node's
  backup lists, and the ack that removes each from there (a command of the
  batch ``acks.AckWriter`` applies);
* ``store.recovery``: put backup lists back into their queues (at a start, a
  stop, or for a dead node), counting recoveries, and bury poison jobs;
* ``store.scheduled``: move the due members of ``schedule`` and ``retry`` into
  their queues.

Each function takes a client and a ``Keys``; each module's docstring says how
many round trips its functions make and what is atomic.
"""
