"""Test and demo harnesses: the private broker, the loopback site, a private
PostgreSQL, the demo. Never imported by production code.
"""
