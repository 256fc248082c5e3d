"""RFC 6455 framing of what the server writes: a text frame, the frames of one message in
parts, a close frame. Bytes only; the transport is the caller's."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

def text_frame(text: str) -> bytes:
    """`text` as one unfragmented, unmasked WebSocket text frame (RFC 6455 section 5.2),
    which is how a server sends a message."""
    return data_frame(text.encode())


def data_frame(payload: bytes, *, first: bool = True, last: bool = True) -> bytes:
    """A frame of a text message (RFC 6455 section 5.4): a message written in parts is a
    text frame then continuation frames, the last one marked final."""
    head = (0x80 if last else 0) | (0x1 if first else 0x0)
    size = len(payload)
    if size < 126:
        header = bytes((head, size))
    elif size < 65536:
        header = struct.pack("!BBH", head, 126, size)
    else:
        header = struct.pack("!BBQ", head, 127, size)
    return header + payload


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked close frame (RFC 6455 section 5.5.1); the reason is cut to fit the
    125-byte limit of a control frame."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload
