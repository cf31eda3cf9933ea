"""``esem vault ...``: serve a vault, add users, and put/get/ls/rm files.

``register(subparsers)`` adds the ``vault`` command group to the ``esem`` parser and
``run(args)`` executes it, returning ``esem``'s exit statuses: 0 ok, 1 refused by the
vault (wrong password, no such file, too large, no slot, disk full, corrupt), 2 bad
usage, 3 no vault server answers (or it could not start), 4 the server is not the pinned
one (certificate mismatch).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from esem.vault.limits import DEFAULT_PORT, MAX_UPLOAD_BYTES

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTEGRITY = 0, 1, 2, 3, 4
PASSWORD_ENV = "ESEM_VAULT_PASSWORD"
USER_ENV = "ESEM_VAULT_USER"
DIR_ENV = "ESEM_VAULT_DIR"

EPILOG = f"""\
client commands find the server through the vault directory: its cert.pem (the pinned
certificate) and endpoint.json (the port a running server published); --port and --cert
override them. The user comes from --user or ${USER_ENV}, the password from
--password-file or ${PASSWORD_ENV} (else it is asked on the terminal).

examples:
  esem vault adduser --dir /srv/vault alice          # password on stdin or asked
  esem vault serve --dir /srv/vault --sync esem &
  export {USER_ENV}=alice {PASSWORD_ENV}=...
  esem vault put --dir /srv/vault report.pdf < report.pdf
  esem vault get --dir /srv/vault report.pdf > copy.pdf
  esem vault ls --dir /srv/vault
  esem vault rm --dir /srv/vault report.pdf

exit status: 0 ok, 1 refused by the vault, 2 bad usage, 3 no vault server (or it could
not start), 4 the server's certificate is not the pinned one.
"""


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=os.environ.get(DIR_ENV) or None,
                   help=f"the vault directory (default ${DIR_ENV})")


def _add_client(p: argparse.ArgumentParser) -> None:
    _add_dir(p)
    p.add_argument("--port", type=int, help="server port (default: from DIR/endpoint.json)")
    p.add_argument("--cert", help="the server certificate to pin (default DIR/cert.pem)")
    p.add_argument("--user", default=os.environ.get(USER_ENV) or None,
                   help=f"user name (default ${USER_ENV})")
    p.add_argument("--password-file", metavar="FILE",
                   help=f"read the password from FILE's first line (default ${PASSWORD_ENV})")


def register(subparsers: Any) -> None:
    """Add ``esem vault`` and its subcommands to ``subparsers``."""
    p = subparsers.add_parser(
        "vault", help="FILE VAULT: a file-sealing server hardened by one flag",
        description="FILE VAULT, esem's case study: a TLS server on 127.0.0.1 that seals "
        "users' files with AES-256-GCM in a 5-slot engine and indexes them in an on-disk "
        "file tree. Its two semaphores (sem_service gates the engine, sem_filetree guards "
        "the tree) are legacy POSIX semaphores or e-semaphores, by --sync.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = p.add_subparsers(dest="vault_command", metavar="COMMAND")

    s = vsub.add_parser("serve", help="run a vault server in the foreground",
                        description="Serve the vault in DIR on 127.0.0.1 until SIGTERM or "
                        "SIGINT. On first start it creates DIR (mode 0700), a self-signed "
                        "TLS certificate (cert.pem, key.pem), the master key and an empty "
                        "file tree. It publishes DIR/endpoint.json once it listens.")
    _add_dir(s)
    s.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    s.add_argument("--sync", choices=("legacy", "esem"), default="esem",
                   help="the semaphores: legacy POSIX (/dev/shm) or esem (default esem)")
    s.add_argument("--socket", help="the esem service socket for --sync esem "
                   "(default: $ESEM_SOCKET, else the default location)")
    s.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    a = vsub.add_parser("adduser", help="add a user (or set a new password)",
                        description="Add user NAME to the vault in DIR, storing a scrypt "
                        "hash of the password. The password is read from --password-file, "
                        "else from stdin (first line), else asked twice on the terminal. "
                        "A running server sees the new user at its next login.")
    _add_dir(a)
    a.add_argument("name", help="user name: letters, digits, '_', '.', '-'")
    a.add_argument("--password-file", metavar="FILE", help="read the password from FILE")
    a.add_argument("--replace", action="store_true", help="set a new password for an "
                   "existing user")

    c = vsub.add_parser("put", help="store stdin as NAME",
                        description=f"Seal and store standard input as NAME (at most "
                        f"{MAX_UPLOAD_BYTES} bytes), replacing an older file of that name.")
    c.add_argument("name", help="file name in the vault (any text, '/' included)")
    _add_client(c)
    c = vsub.add_parser("get", help="write file NAME to stdout",
                        description="Unseal NAME and write it to standard output.")
    c.add_argument("name")
    _add_client(c)
    c = vsub.add_parser("ls", help="list your files", description="List your files.")
    _add_client(c)
    c.add_argument("--json", action="store_true", help="print a JSON list")
    c = vsub.add_parser("rm", help="remove file NAME", description="Remove NAME.")
    c.add_argument("name")
    _add_client(c)
    p.set_defaults(vault_parser=p)


def run(args: argparse.Namespace) -> int:
    """Execute ``esem vault ...``; returns the exit status."""
    from esem.vault.errors import CertificateMismatch, VaultError, VaultUnavailable
    from esem.vault.server import StartupError

    command = getattr(args, "vault_command", None)
    if command is None:
        args.vault_parser.print_help()
        return EXIT_USAGE
    try:
        if args.dir is None:
            raise ValueError(f"give the vault directory with --dir (or ${DIR_ENV})")
        if command == "serve":
            return _serve(args)
        if command == "adduser":
            return _adduser(args)
        return _client_command(command, args)
    except StartupError as exc:
        print(f"esem vault serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CertificateMismatch as exc:
        print(f"esem vault: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except VaultUnavailable as exc:
        print(f"esem vault: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except VaultError as exc:
        print(f"esem vault: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (ValueError, OSError) as exc:
        print(f"esem vault: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    import logging

    from esem.vault.server import VaultServer

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s esem-vault[%(process)d] %(message)s")
    if args.socket is not None:
        os.environ["ESEM_SOCKET"] = args.socket  # where sem_open(..., USE_ESEM) looks
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = VaultServer(Path(args.dir), port=args.port, sync=args.sync).start()
    print(f"esem vault: serving {args.dir} on 127.0.0.1:{server.port} (sync={args.sync}); "
          f"certificate sha256 {server.fingerprint}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
    return EXIT_OK


def _read_first_line(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def _adduser(args: argparse.Namespace) -> int:
    from esem.vault.users import add_user, check_user_name

    check_user_name(args.name)
    if args.password_file:
        password = _read_first_line(args.password_file)
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    add_user(Path(args.dir), args.name, password, replace=args.replace)
    print(f"{'updated' if args.replace else 'added'} user {args.name} in {args.dir}",
          file=sys.stderr)
    return EXIT_OK


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        return _read_first_line(args.password_file)
    env = os.environ.get(PASSWORD_ENV)
    if env is not None:
        return env
    if sys.stderr.isatty():
        return getpass.getpass(f"vault password for {args.user}: ")
    raise ValueError(f"no password: set ${PASSWORD_ENV} or give --password-file")


def _client_command(command: str, args: argparse.Namespace) -> int:
    from esem.vault.client import VaultClient
    from esem.vault.errors import TooLarge

    if not args.user:
        raise ValueError(f"give the user with --user (or ${USER_ENV})")
    data = b""
    if command == "put":
        if sys.stdin.isatty():
            raise ValueError("put reads the file from stdin: esem vault put NAME < FILE")
        data = sys.stdin.buffer.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLarge(f"the input exceeds the vault's limit of {MAX_UPLOAD_BYTES} bytes")
    with VaultClient.for_directory(args.dir, args.user, _password(args), port=args.port,
                                   cert=args.cert) as vc:
        if command == "put":
            vc.put(args.name, data)
            print(f"stored {args.name} ({len(data)} bytes)", file=sys.stderr)
        elif command == "get":
            out = vc.get(args.name)
            sys.stdout.buffer.write(out)
            sys.stdout.buffer.flush()
        elif command == "rm":
            vc.rm(args.name)
            print(f"removed {args.name}", file=sys.stderr)
        elif command == "ls":
            files = vc.ls()
            if args.json:
                print(json.dumps([{"name": f.name, "size": f.size, "created": f.created}
                                  for f in files], indent=2))
            else:
                _print_listing(files)
    return EXIT_OK


def _print_listing(files: list[Any]) -> None:
    from esem.tables import print_table

    if not files:
        print("(no files)")
        return
    print_table(["NAME", "SIZE", "CREATED"],
                [[f.name, str(f.size),
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.created))]
                 for f in files], right=[1])
