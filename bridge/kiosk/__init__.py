"""The kiosk side of the contract: a reference agent and a fleet simulator.

* :class:`KioskAgent`: one device on paho's own network thread, as an Android app runs.
* :class:`Fleet`: thousands of devices in one process on a shared asyncio loop.

Both run the same protocol logic, :class:`KioskCore`.
"""

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
