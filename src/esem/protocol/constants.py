"""Wire constants of the esem protocol, version 1. PROTOCOL.md is their specification.

Every limit is named here with its unit and the reason for its value.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

VERSION = 1
NOISE_PROTOCOL_NAME = b"Noise_NK_25519_ChaChaPoly_BLAKE2s"
NOISE_PROLOGUE = b"esem/1"  # binds the protocol version into the handshake hash

LENGTH_BYTES = 4  # frame length prefix: unsigned 32-bit big-endian
# Largest frame body in bytes. An operation needs < 400; the bound is set by admin
# listings (paged to fit) and keeps a hostile peer from making us buffer much.
MAX_FRAME_BODY = 16384
AEAD_TAG_BYTES = 16  # ChaCha20-Poly1305 tag appended by every Noise transport message
MAX_PLAINTEXT = MAX_FRAME_BODY - AEAD_TAG_BYTES
HANDSHAKE_HEADER_BYTES = 2  # version, kind
NOISE_MSG_BYTES = 48  # NK message 1 (empty payload): ephemeral key + tag
# WELCOME's payload: the resumption secret R of the session the connection creates
# (PROTOCOL.md 16); NK message 2 is ephemeral key + R + tag.
RESUME_SECRET_BYTES = 32
NOISE_WELCOME_BYTES = 32 + RESUME_SECRET_BYTES + 16
SESSION_ID_BYTES = 32  # the handshake hash h: a session's id for its whole life
RESUME_MAX_AWAITED = 1024  # req_ids a RESUME may list (more is EINVAL)

HANDLE_BYTES = 16  # handle capability tokens, 128 random bits
MAC_BYTES = 32  # key-binding MAC: keyed BLAKE2s-256
MAX_MESSAGE_BYTES = 512  # error text in a refusal, UTF-8
MAX_TIMEOUT_NS = 2**63 - 1  # timed waits: relative timeout, nanoseconds
MAC_DOMAIN = b"esem-keybind-v1"  # separates key-binding MACs from any other use of K


class FrameKind(IntEnum):
    """Second byte of a plaintext handshake frame."""

    HELLO = 1  # client -> service: Noise NK message 1
    WELCOME = 2  # service -> client: Noise NK message 2
    REFUSED = 3  # service -> client: unauthenticated refusal text (quota, version)


class Direction(IntEnum):
    TO_SERVICE = 0
    TO_CLIENT = 1


class Opcode(IntEnum):
    OPEN = 1
    CLOSE = 2
    UNLINK = 3
    WAIT = 4
    POST = 5
    GETVALUE = 6
    CANCEL = 7
    ATTACH = 8
    LIST = 9
    STAT = 10
    PING = 11
    SWITCHLESS = 12  # move this session's frames to shared-memory rings (PROTOCOL.md 15)
    RECLAIM = 13  # release a semaphore's dead holders' units (owner or root)
    RESUME = 14  # first request on a connection: carry on a detached session (PROTOCOL.md 16)
    END = 15  # end this session on purpose (no grace period)


class MsgFlag(IntFlag):
    NONE = 0
    HAS_MAC = 1  # the message ends with a MAC_BYTES key-binding MAC


class OpenFlag(IntFlag):
    NONE = 0
    CREAT = 1
    EXCL = 2
    ROBUST = 4  # esem extension: a dead holder's units are released
    FOREIGN = 8  # esem extension: CREAT may open an existing semaphore of another uid


REQUEST_HEADER = ">BBBQ"  # version, opcode, flags, request id
REPLY_HEADER = ">BBBQH"  # version, opcode, flags, request id, status
