"""Ledger sync between devices over TCP or a serial line (docs/sync-protocol.md).

`frames` (the byte layer: framing, CRCs, a decoder that resynchronises), `messages` (what a
frame's payload means), `link` (pyserial URLs, a TCP listener), `session` (the protocol: handshake,
fork search, pull, serve), `defaults` (line speed, timeout, retries), `testing` (synthetic
ledgers, link pairs, a link that damages what it carries).

The names below are loaded on first use, so that importing one light module of the package (the
command line reads `defaults` for its options) does not load the protocol and the ledger."""

from importlib import import_module

_HOMES = {
    "frames": ("MAX_PAYLOAD", "Decoder", "Frame", "encode"),
    "link": ("Link", "LinkClosed", "LinkError", "Listener", "open_link"),
    "messages": ("PROTOCOL", "T"),
    "session": ("ForkError", "Incomplete", "Options", "PeerError", "Refused", "Result", "SyncError", "serve",
                "serve_session", "sync"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
