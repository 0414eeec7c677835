"""The kiosk side of the contract: a reference agent and a fleet simulator.

* :class:`KioskAgent`: one device on paho's own network thread, as an Android app runs.
* :class:`Fleet`: thousands of devices in one process on a shared asyncio loop.

Both run the same protocol logic, :class:`KioskCore`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.kiosk.agent import KioskAgent
    from bridge.kiosk.commands import CommandHandler, ReplyRoute
    from bridge.kiosk.core import KioskCore, Mode
    from bridge.kiosk.options import AgentOptions, MqttProtocol
    from bridge.kiosk.scenario import FaultStep, Scenario, ScenarioError, load_scenario
    from bridge.kiosk.simulator import Fleet, FleetStats
    from bridge.kiosk.state import AgentState, default_state_dir

__all__ = [
    "AgentOptions",
    "AgentState",
    "CommandHandler",
    "FaultStep",
    "Fleet",
    "FleetStats",
    "KioskAgent",
    "KioskCore",
    "Mode",
    "MqttProtocol",
    "ReplyRoute",
    "Scenario",
    "ScenarioError",
    "default_state_dir",
    "load_scenario",
]

# Loaded on first use (PEP 562): the CLI imports ``bridge.kiosk.options`` for its option
# types at every start-up, which must not start paho, the agent and the simulator.
_LAZY = {
    "KioskAgent": "bridge.kiosk.agent",
    "CommandHandler": "bridge.kiosk.commands",
    "ReplyRoute": "bridge.kiosk.commands",
    "KioskCore": "bridge.kiosk.core",
    "Mode": "bridge.kiosk.core",
    "AgentOptions": "bridge.kiosk.options",
    "MqttProtocol": "bridge.kiosk.options",
    "FaultStep": "bridge.kiosk.scenario",
    "Scenario": "bridge.kiosk.scenario",
    "ScenarioError": "bridge.kiosk.scenario",
    "load_scenario": "bridge.kiosk.scenario",
    "Fleet": "bridge.kiosk.simulator",
    "FleetStats": "bridge.kiosk.simulator",
    "AgentState": "bridge.kiosk.state",
    "default_state_dir": "bridge.kiosk.state",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
