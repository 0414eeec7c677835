"""The broker as the security boundary: ACL model, credentials, provisioning by claim,
token rotation and revocation (issue 6). See ``mosquitto/README.md``.

Modules, by concern:

* :mod:`~bridge.security.acl` - who may publish/subscribe/receive what (one model for
  Mosquitto's pattern file, its dynsec roles and the embedded broker's plugin);
* :mod:`~bridge.security.dynsec` - the dynamic-security plugin's command API;
* :mod:`~bridge.security.bootstrap` - the broker's first credential file;
* :mod:`~bridge.db.security_store` / :mod:`~bridge.db.security_models` - SQL;
* :mod:`~bridge.security.provisioning`, :mod:`~bridge.security.rotation`,
  :mod:`~bridge.security.operations` - what happens to a device's credential;
* :mod:`~bridge.security.runtime` - all of it inside the running bridge;
* :mod:`~bridge.security.amqtt_plugins` - the same rules in the embedded broker;
* :mod:`~bridge.security.embedded` - the embedded broker's fixed credentials.

The kiosk's side (claim, token file, rotation) is part of the reference agent:
:mod:`bridge.kiosk.credentials`.
"""
