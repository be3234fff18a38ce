"""Building plans: torch code traced into a ``PlanIR`` (never imports ``producer.remote``)."""
