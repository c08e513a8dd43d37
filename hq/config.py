"""The HQ receiver's config file: [mqtt], [hq], [compliance], [metrc] and [log].

The sections it shares with a site's file are agent/config.py's models; the
Metrc keys are hq/metrc/config.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent.config import (
    ENV_PREFIX,
    ComplianceConfig,
    HqConfig,
    LogConfig,
    MqttConfig,
    SettingsBase,
    load_config,
)
from hq.metrc.config import MetrcConfig


class HqReceiverConfig(SettingsBase):
    """The HQ receiver's file: ``[mqtt]`` and ``[hq]``; other sections are ignored."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    hq: HqConfig = Field(default_factory=HqConfig)
    # report_within_h: the deadline the HQ page measures unsent sales against.
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    # CONTRACT 9: the Metrc forwarder (hq/metrc/config.py has the keys).
    metrc: MetrcConfig = Field(default_factory=MetrcConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def client_id(self) -> str:
        """The configured client id; empty means each receiver makes its own."""
        return self.hq.client_id or self.mqtt.client_id


def load_hq_config(path: str,
                   transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                   ) -> HqReceiverConfig:
    return load_config(path, HqReceiverConfig, transform)
