"""Fault-injection scenarios for the fleet simulator, from flags or a YAML/JSON file.

# scenario.yaml
devices: 2000
duration_s: 300
keepalive: 10
churn_per_s: 0.5          # unannounced drops per second, fleet-wide (they come back)
reboot_per_s: 0.1         # announced reboots per second, fleet-wide
reboot_delay_s: 5
steps:                    # times are seconds after the whole fleet is online
  - {at_s: 10, kill: 0.01}                          # power loss: Will, never back
  - {at_s: 20, blackhole: 0.01, blackhole_for_s: 60} # only broker keepalive notices
  - {at_s: 0, slow: 0.05, slow_delay_ms: 400}        # slow downlink
  - {at_s: 30, drop: 0.1}                            # mass Wi-Fi blip, they return
  - {at_s: 40, reboot: 0.05}                         # announced reboots at once
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Rate = Annotated[float, Field(ge=0.0, le=10_000.0)]


class FaultStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at_s: Annotated[float, Field(ge=0.0)] = 0.0
    kill: Fraction = 0.0
    blackhole: Fraction = 0.0
    #: None: black-holed until the end.
    blackhole_for_s: Annotated[float, Field(gt=0.0)] | None = None
    slow: Fraction = 0.0
    slow_delay_ms: Annotated[int, Field(ge=0, le=60_000)] = 300
    drop: Fraction = 0.0
    reboot: Fraction = 0.0


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: Annotated[int, Field(ge=1, le=100_000)] | None = None
    duration_s: Annotated[float, Field(gt=0.0)] | None = None
    keepalive: Annotated[int, Field(ge=1, le=65_535)] | None = None
    churn_per_s: Rate = 0.0
    reboot_per_s: Rate = 0.0
    reboot_delay_s: Annotated[float, Field(ge=0.0, le=3_600.0)] = 5.0
    steps: list[FaultStep] = Field(default_factory=list)


class ScenarioError(ValueError):
    """The scenario file is missing, unparsable or invalid; the message says where."""


def load_scenario(path: Path | str) -> Scenario:
    """Read a scenario from YAML or JSON (YAML is a superset, one parser serves both)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"scenario {path} is not valid YAML/JSON: {exc}") from None
    try:
        return Scenario.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "scenario"
        raise ScenarioError(f"scenario {path}: {where}: {first['msg']}") from None
