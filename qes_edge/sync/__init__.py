"""Ledger sync between devices over TCP or a serial line (docs/sync-protocol.md).

`frames` (the byte layer: framing, CRCs, a decoder that resynchronises), `messages` (what a
frame's payload means), `link` (pyserial URLs, a TCP listener), `session` (the protocol: handshake,
fork search, pull, serve), `testing` (synthetic ledgers, link pairs, a link that damages what
it carries)."""

from qes_edge.sync.frames import MAX_PAYLOAD, Decoder, Frame, encode
from qes_edge.sync.link import Link, LinkClosed, LinkError, Listener, open_link
from qes_edge.sync.messages import PROTOCOL, T
from qes_edge.sync.session import (ForkError, Incomplete, Options, PeerError, Refused, Result, SyncError, serve, serve_session,
                   sync)

__all__ = ["MAX_PAYLOAD", "Decoder", "Frame", "encode", "Link", "LinkClosed", "LinkError", "Listener", "open_link",
           "PROTOCOL", "T", "ForkError", "Incomplete", "Options", "PeerError", "Refused", "Result", "SyncError",
           "serve", "serve_session", "sync"]
