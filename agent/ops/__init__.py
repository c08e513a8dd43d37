"""Running the box: status and health, metrics, sd_notify, mDNS advertising,
the hardware inventory, install and check-config.
"""
