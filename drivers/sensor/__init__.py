"""Environmental sensors for grow rooms: sans-I/O cores, thin transports, pure climate logic.

- ``reading``      Sample (what a transport measured) and Reading (GET /v1/sensors shape)
- ``derived``      VPD (air, leaf), dew point, absolute humidity: pure formulas
- ``registers``    Modbus register maps as data, presets, pure decoding
- ``modbus``       modbus-rtu[+pyserial]:// transport (pymodbus, device_id=)
- ``scd4x``        Sensirion SCD4x protocol (CRC-8) and its smbus2 transport
- ``scd4x_fake``   a fake SCD4x at the i2c_msg boundary (tests, demo)
- ``sim``          sim://climate, a simulated room
- ``plausibility`` range, spike, flat-line, stale, warm-up, calibration
- ``rooms``        stages, target bands, alarms that fire once and clear once
- ``reader``       one poller per sensor: transport -> checks -> derived -> Reading
- ``history``      24-hour per-minute history in SQLite for the site page
- ``config``       pydantic models for [[devices]] sensors and [[rooms]]

Never imports ``agent``; the daemon wires these together.
"""
