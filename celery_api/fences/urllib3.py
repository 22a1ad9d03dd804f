"""urllib3 internals this service relies on (tests/test_fences.py checks it).

- ``urllib3.connection.HTTPConnection.sock``: the socket a connection's ``connect()``
  opened (http.client's attribute, which urllib3 2 keeps; for https, the TLS socket).
  :func:`deadline_connection` subclasses a pool's ``ConnectionCls`` to hand that
  socket to a deadline, which shuts it down when the whole attempt has taken too long
  (urllib3's timeouts bound the connect and each read, not their sum).
"""

from __future__ import annotations

import socket


def deadline_connection(base: type, watch) -> type:
    """``base`` (a pool's ConnectionCls) whose connections pass their socket to
    ``watch`` as soon as it is connected."""

    class DeadlineConnection(base):
        def connect(self):
            super().connect()
            sock = getattr(self, "sock", None)
            if isinstance(sock, socket.socket):
                watch(sock)

    return DeadlineConnection
