"""The esem wire protocol, sans-I/O: framing, messages, Noise NK sessions, key-binding
MACs. PROTOCOL.md at the repository root specifies it byte by byte."""

from esem.protocol.constants import MAX_FRAME_BODY, VERSION, Opcode, OpenFlag
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession, RequestIn, ServerSession, State

__all__ = [
    "MAX_FRAME_BODY",
    "VERSION",
    "ClientSession",
    "Opcode",
    "OpenFlag",
    "Reply",
    "Request",
    "RequestIn",
    "ServerSession",
    "State",
    "generate_static_key",
    "public_key_of",
]
