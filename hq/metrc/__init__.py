"""Metrc at HQ (CONTRACT 9): every stored sale (and plant event) reported once.

- :mod:`.config`: the ``[metrc]`` keys;
- :mod:`.mapping`: events to Metrc request bodies (pure);
- :mod:`.client`: the paced httpx client and its error classes;
- :mod:`.reports`: the ``metrc_*`` tables: claims, leases, states;
- :mod:`.forwarder`: the threads inside ``edge-agent hq`` that report;
- :mod:`.catalog_sync`: Metrc's active packages to each site's catalog;
- :mod:`.status` and :mod:`.cli`: ``edge-agent hq metrc status|retry``.

Imports stay lazy here: agent/config.py imports :mod:`.config`.
"""
