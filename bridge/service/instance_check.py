"""Is a bridge of this instance name online on the broker already?

The database's heartbeats (:mod:`bridge.service.leadership`) catch a second bridge with
the same name on the same database. One on *another* database, sharing the broker,
would still take the running bridge's MQTT client ids and kick it off: before anything
of this bridge connects, its name's retained presence is read, and an ``online`` one
of another database (or of an unknown one) refuses the start.
"""

from __future__ import annotations

import logging

from bridge.broker_url import BrokerAddress
from bridge.service.leadership import InstanceInUse
from schemas import BridgePresence, ContractError, PresenceState, decode
from schemas.topics import bridge_instance_topic

log = logging.getLogger(__name__)

#: The check must not hold up a start when the broker is slow or away: the links then
#: connect (and retry) as usual.
CHECK_TIMEOUT_S = 3.0


async def refuse_if_online_elsewhere(
    address: BrokerAddress, instance: str, database_id: str | None, prefix: str, protocol: str
) -> None:
    """Raise :class:`InstanceInUse` if ``instance`` announces itself online on the
    broker for a database other than ``database_id``; quietly nothing if the broker
    cannot be asked."""
    import aiomqtt

    from bridge.ops.errors import OpsError
    from bridge.ops.mqtt import connect, read_retained

    topic = bridge_instance_topic(instance, prefix)
    try:
        async with connect(
            address,
            protocol="3.1.1" if protocol == "3.1.1" else "auto",
            connect_timeout_s=CHECK_TIMEOUT_S,
            name="instance-check",
        ) as client:
            snapshot = await read_retained(
                client, [topic], prefix=prefix, marker_wait_s=CHECK_TIMEOUT_S
            )
    except (OpsError, OSError, TimeoutError, aiomqtt.MqttError) as exc:
        # Unanswered (a broker busy rebuilding after a node's death times the SUBSCRIBE
        # out): the start goes on; the heartbeats still catch a twin of this database.
        log.info("could not ask the broker whether %s is online elsewhere: %s", instance, exc)
        return
    for message in snapshot.messages:
        if message.topic != topic:
            continue
        try:
            presence = decode(BridgePresence, message.payload)
        except ContractError:
            return
        if presence.state is PresenceState.ONLINE and presence.database != database_id:
            where = f"database {presence.database}" if presence.database else "an unknown database"
            raise InstanceInUse(
                f"bridge instance {instance!r} is online on this broker for {where}: "
                "start this one with another --instance, or without one (a unique name "
                "is made)"
            )
