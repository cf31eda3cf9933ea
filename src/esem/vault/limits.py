"""Every limit and deliberate delay of the file vault, with its unit and its reason.

One place, so that the protocol, the server, the client and the tests agree, and so that
a reviewer sees at a glance which numbers are policy (sizes, counts) and which are the
case study's deliberate windows (``ENGINE_WORK_S``, ``TREE_WINDOW_S``) that make the
races of a tampered semaphore observable instead of merely possible.
"""

from __future__ import annotations

# --- the sealing engine (the stand-in for an enclave with fixed thread slots)
ENGINE_SLOTS = 5  # threads the engine admits at once; sem_service starts at this value
ENGINE_WORK_S = 0.008  # seconds a seal/unseal stays inside: enclave entry + sealing cost

# --- the file tree (the on-disk index)
TREE_SLOTS = 4096  # node slots in the tree: the most files one vault holds
TREE_WINDOW_S = 0.010  # seconds between reading the tree and persisting it (add / remove)

# --- names, users, passwords
MAX_NAME_BYTES = 255  # a file name, UTF-8 (a POSIX NAME_MAX)
MAX_USER_CHARS = 32  # user names: [A-Za-z0-9_.-], like a login name
MIN_PASSWORD_CHARS = 8  # refuse trivially short passwords at adduser
MAX_PASSWORD_BYTES = 1024  # scrypt takes any length; a bound keeps a request small

# --- scrypt (RFC 7914): about 50 ms and 16 MiB per verification, once per connection
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_HASH_BYTES = 32

# --- the wire protocol
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # one file; the server holds it in memory to seal it
MAX_HEADER_BYTES = 4096  # the JSON header of one frame (op, name, user, password)
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024  # a get reply, or an ls listing
MAX_LISTING_BYTES = MAX_BODY_BYTES  # TREE_SLOTS entries of MAX_NAME_BYTES fit in it

# --- the server
DEFAULT_PORT = 7443  # 127.0.0.1 only; 0 picks a free port (published in endpoint.json)
MAX_CONNECTIONS = 64  # one thread each; more are closed at once (logged), not queued
HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake (and the auth request) must finish in this
IO_TIMEOUT_S = 60.0  # silence on a connection (between or inside frames) before closing

# --- the client
CONNECT_TIMEOUT_S = 10.0  # TCP connect + TLS handshake + authentication
