"""What every event passes on its way to the outbox: wire payload schemas,
idempotency keys, alarms from conditions.
"""
