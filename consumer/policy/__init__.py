"""The device owner's control over its data: tenancy, the policy file, the audit log.

``tenancy``: every stored object, plan and reply belongs to the producer that created it.
``rules``: the operator's policy (admitted producers, public tags, approved plans, budgets).
``audit``: an append-only record of every command the device ran or refused.
"""
