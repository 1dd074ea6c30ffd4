"""A trainer rank's connection to its mask servers, below MaskClient: the DEALER socket's lifecycle
(CURVE keys, ZMQ_MAXMSGSIZE, a socket monitor), failover between the listed servers, and what the
monitor tells about a server that does not answer. Only MaskClient's I/O thread calls it (zmq
sockets are not thread-safe); `diagnosis` only reads flags, so any thread may call it.

A DEALER that cannot complete its handshake gets no error from libzmq: it reconnects forever.
The monitor's events tell the cases apart (tests/test_cluster.py):
    no CONNECTED                        nothing listens at the endpoint
    HANDSHAKE_FAILED_AUTH               CURVE: the server's ZAP handler refused our key (fatal)
    HANDSHAKE_FAILED_PROTOCOL mismatch  one side uses CURVE, the other not (fatal)
    CONNECTED, never HANDSHAKE_SUCCEEDED  CURVE: the wrong server public key (the server drops us)
"""
from __future__ import annotations

import logging

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from mimpipe.maskserver import protocol as P

log = logging.getLogger("mimpipe.maskclient")
_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class LinkError(ValueError):
    """A handshake that cannot succeed by retrying: a refused key, a CURVE/plain mismatch."""


class Link:
    def __init__(self, endpoints: list[str], rank: int, curve: tuple[str, str] | None):
        """endpoints: this rank's server first, then the servers it may fail over to.
        curve: (our .key_secret file, the server's public .key file), or None for plain TCP/ipc."""
        self.endpoints, self.rank, self.curve = list(endpoints), rank, curve
        self.index = 0
        self.refused: set[int] = set()  # servers that said RANKS: they do not serve this rank
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.connected = self.handshake = False  # seen since this endpoint was chosen

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.index]

    def open(self, ctx: zmq.Context) -> zmq.Socket:
        """A new DEALER (and its monitor) connected to the current endpoint."""
        s = ctx.socket(zmq.DEALER)
        try:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, P.MAX_ARRAY_BYTES)
            if self.curve:
                from mimpipe.maskserver.keys import load_secret
                secret_file, server_public_file = self.curve
                s.curve_publickey, s.curve_secretkey = load_secret(secret_file)
                s.curve_serverkey = zmq.auth.load_certificate(server_public_file)[0]
            self.monitor = s.get_monitor_socket(_EVENTS)
            try:
                s.connect(self.endpoint)
            except zmq.ZMQError as e:
                raise ValueError(f"mask server endpoint {self.endpoint!r}: {e.strerror}") from None
        except BaseException:
            self.sock = s
            self.close()
            raise
        self.sock = s
        return s

    def close(self, linger: int = 0) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        if self.sock is not None:
            self.sock.close(linger=linger)
        self.sock = self.monitor = None

    def events(self) -> None:
        """Read the monitor's pending events; raise LinkError for a handshake that retrying cannot fix."""
        while self.monitor is not None and self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)
            kind, value = ev["event"], ev["value"]
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake = True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                key = self.curve[0] if self.curve else "no key"
                raise LinkError(f"rank {self.rank}: {self.endpoint}: CURVE authentication failed: the mask "
                                f"server does not admit this rank's key ({key}; ZAP status {int(value)}): add "
                                f"its public key to the server's --curve DIR/clients and restart the server")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                    value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                raise LinkError(f"rank {self.rank}: {self.endpoint}: " + (
                    "this trainer uses CURVE (--curve) but the mask server does not (started without --curve)"
                    if self.curve else "the mask server expects CURVE (it runs --curve DIR): pass "
                    "`mimpipe train --curve DIR` with the trainer's keys"))

    def next_server(self) -> bool:
        """Move to the next listed server that has not refused this rank; False if there is none."""
        for k in range(1, len(self.endpoints)):
            i = (self.index + k) % len(self.endpoints)
            if i not in self.refused:
                self.index, self.connected, self.handshake = i, False, False
                return True
        return False

    def diagnosis(self) -> str:
        """Why the current server does not answer, as far as the socket can tell."""
        if not self.connected:
            return f"nothing answers at {self.endpoint} (is `mimpipe maskserver` running there?)"
        if not self.handshake:
            return (f"{self.endpoint} accepts connections but the CURVE handshake never completes (is "
                    f"{self.curve[1]} that server's public key?)" if self.curve else
                    f"{self.endpoint} accepts connections but no ZeroMQ handshake completes (is it a mask server?)")
        return f"{self.endpoint} is connected but never answered HELLO (is it a `mimpipe maskserver`?)"
