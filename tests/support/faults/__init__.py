"""Tools for the fault-injection tests (``tests/test_faults_*.py``): a bridge process
you can SIGKILL, a link you can cut on one side only, a witness of every presence
message, storms, database outages, and the checks that decide whether anything was lost.
"""

from tests.support.faults.bridge_process import (
    BRIDGE_TEST_ENV,
    BridgeFactory,
    BridgeProcess,
    bridge_processes,
    run_cli,
)
from tests.support.faults.cms_watch import StatusSampler, install_status_audit, status_audit
from tests.support.faults.half_open import HalfOpenProxy
from tests.support.faults.kiosks import CleanSessionKiosk
from tests.support.faults.outages import ConnectionKiller, sqlite_write_lock, via_proxy
from tests.support.faults.storm import (
    Storm,
    connect_fleet,
    executions,
    fleet_settled,
    fleet_truth,
    make_fleet,
    storming,
)
from tests.support.faults.tables import (
    consistent,
    differences,
    history_keys,
    history_rows,
    session_regressions,
    table_matches,
    table_states,
)
from tests.support.faults.timing import SETTLE_S
from tests.support.faults.witness import PresenceKey, PresenceWitness

__all__ = [
    "BRIDGE_TEST_ENV",
    "SETTLE_S",
    "BridgeFactory",
    "BridgeProcess",
    "CleanSessionKiosk",
    "ConnectionKiller",
    "HalfOpenProxy",
    "PresenceKey",
    "PresenceWitness",
    "StatusSampler",
    "Storm",
    "bridge_processes",
    "connect_fleet",
    "consistent",
    "differences",
    "executions",
    "fleet_settled",
    "fleet_truth",
    "history_keys",
    "history_rows",
    "install_status_audit",
    "make_fleet",
    "run_cli",
    "session_regressions",
    "sqlite_write_lock",
    "status_audit",
    "storming",
    "table_matches",
    "table_states",
    "via_proxy",
]
