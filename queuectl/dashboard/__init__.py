"""``queuectl dashboard``: a local web dashboard, a thin client of ``reads`` and
``decisions`` like the CLI. Only the ``dashboard`` command imports it (it needs the
``dashboard`` extra)."""
