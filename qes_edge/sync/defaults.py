"""The defaults of a sync link, one home each: read by the links, the protocol's Options and the
command line's options (this module imports nothing, so the command line reads them for free)."""

#: the line speed of a serial link unless the user names one (--baud)
DEFAULT_BAUD = 115200
#: seconds without a frame from the peer before a message is sent again
TIMEOUT_S = 3.0
#: such timeouts in a row (and, for the client, reconnections) before giving up
RETRIES = 5
