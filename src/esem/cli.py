"""The ``esem`` command: run the service, inspect it, and the tools around it.

Exit status: 0 success; 1 the service refused the operation (no such name, permission,
key), or for ``esem attack`` an esem row was broken; 2 bad usage; 3 no service answers
(or it failed to start); 4 tampering detected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from esem import errors
from esem.paths import socket_path, state_dir

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTEGRITY = 0, 1, 2, 3, 4

EPILOG = """\
exit status: 0 ok, 1 refused by the service, 2 bad usage, 3 no service (or it could not
start), 4 tampering detected.
environment: ESEM_SOCKET (socket path), ESEM_DIR (state directory), ESEM_PUBKEY (hex key
to pin instead of the published one).
"""


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="service socket (default: $ESEM_SOCKET, else "
                   "$ESEM_DIR/esem.sock, else /run/esem or $XDG_RUNTIME_DIR/esem)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esem",
        description="esem: a hardened semaphore service. POSIX named semaphores kept in "
        "one trusted process, reached over an authenticated, encrypted channel.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the service in the foreground",
                       description="Run the esem service in the foreground until SIGTERM or "
                       "SIGINT. Creates the service key on first start (mode 0600) and "
                       "publishes the public key beside the socket as SOCKET.pub.")
    p.add_argument("--dir", help="state directory holding the service key "
                   "(default: $ESEM_DIR, else /run/esem as root, $XDG_RUNTIME_DIR/esem)")
    _add_socket(p)
    p.add_argument("--quota-semaphores", type=int, metavar="N",
                   help="semaphores one uid may own (default 1024)")
    p.add_argument("--quota-sessions", type=int, metavar="N",
                   help="concurrent sessions of one uid (default 128)")
    p.add_argument("--quota-handles", type=int, metavar="N",
                   help="open handles per session (default 1024)")
    p.add_argument("--quota-waiters", type=int, metavar="N",
                   help="queued waits per session (default 256)")
    p.add_argument("--quota-uid-waiters", type=int, metavar="N",
                   help="queued waits across a uid's sessions (default 4096)")
    p.add_argument("--switchless", action="store_true",
                   help="offer sessions the shared-memory fast path (clients ask for it with "
                   "esem.connect(switchless=True) or ESEM_SWITCHLESS=1)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    p = sub.add_parser("ls", help="list the service's semaphores")
    _add_socket(p)
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("stat", help="show one semaphore, its holders and waiters")
    p.add_argument("name", help="semaphore name, e.g. /jobs")
    _add_socket(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = sub.add_parser("unlink", help="remove a semaphore's name")
    p.add_argument("name", help="semaphore name, e.g. /jobs")
    _add_socket(p)
    p.add_argument("--key-hex", help="key of a key-bound semaphore, in hex")

    p = sub.add_parser("demo", help="the FILE VAULT case study: legacy vs esem, under attack",
                       description="Start an embedded esem service and, for each backend "
                       "(legacy POSIX semaphores, esem) and each attack (none, filetree-race, "
                       "service-blocking), a fresh FILE VAULT server (TLS on 127.0.0.1) in a "
                       "temporary directory. N concurrent clients each store M files of "
                       "random bytes and read them back; then every file is verified byte "
                       "for byte. A same-uid adversary process raises the count of the "
                       "vault's sem_filetree or sem_service (rewriting /dev/shm and posting "
                       "without a key). Prints files written, intact, lost or corrupt, "
                       "engine slot failures and requests per second. Exit status 0 when "
                       "every esem row kept every file and had no slot failure.")
    p.add_argument("--clients", type=int, default=8, metavar="N",
                   help="concurrent clients (default 8; more than the engine's 5 slots)")
    p.add_argument("--files", type=int, default=12, metavar="M",
                   help="files each client stores (default 12)")
    p.add_argument("--size", type=int, default=4096, metavar="BYTES",
                   help="bytes per file (default 4096)")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")

    from esem.vault.cli import register as register_vault

    register_vault(sub)  # esem vault ...: its options and handlers live in esem/vault/cli.py

    p = sub.add_parser("attack", help="play every adversary of the threat model",
                       description="Run the attack suite (DESIGN.md section 2, adversaries "
                       "A1-A7) on an embedded service in a temporary directory, or on a "
                       "running one with --socket, legacy POSIX semaphores beside esem. "
                       "Exit status 0 when every esem row is 'defended' or 'n/a'.")
    p.add_argument("--only", action="append", metavar="ID",
                   help="run only this attack (A1..A7, A2-RING); repeatable")
    _add_socket(p)
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for CI)")

    p = sub.add_parser("run", help="run a program with its semaphores in esem (LD_PRELOAD)",
                       description="Run CMD with the esem preload library, so its POSIX "
                       "semaphores live in the esem service without changing it. By default "
                       "only sem_open(name, oflag | USE_ESEM, ...) (native/include/esem.h) "
                       "moves; with --all every semaphore, named and unnamed. The service "
                       "is found as for every client (ESEM_SOCKET, ESEM_DIR, the default). "
                       "Statically linked programs are refused: nothing can be preloaded "
                       "into them. The exit status is CMD's.",
                       usage="esem run [-h] [--all] -- CMD [ARGS ...]")
    p.add_argument("--all", action="store_true",
                   help="move every semaphore, not only those opened with USE_ESEM "
                   "(sets ESEM_PRELOAD_ALL=1)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD", help="program and arguments")

    p = sub.add_parser("preload", help="print the path of the preload library",
                       description="Print where libesem_preload.so is, for "
                       "LD_PRELOAD=$(esem preload) CMD, and with --json the header too.")
    p.add_argument("--json", action="store_true", help="print {library, header} as JSON")

    from esem.bench.cli import register as register_bench

    register_bench(sub)  # esem bench ...: its options live in esem/bench/cli.py
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "ls":
            return _ls(args)
        if args.command == "stat":
            return _stat(args)
        if args.command == "unlink":
            return _unlink(args)
        if args.command == "demo":
            from esem.demo import run_demo

            return run_demo(clients=args.clients, files=args.files, size=args.size,
                            as_json=args.json)
        if args.command == "vault":
            from esem.vault.cli import run as run_vault

            return run_vault(args)
        if args.command == "attack":
            from esem.attack.runner import main as attack_main

            only = [a.upper() for a in args.only] if args.only else None
            return attack_main(only, args.socket, args.json, args.quick)
        if args.command in ("run", "preload"):
            return _native(args)
        if args.command == "bench":
            from esem.bench.cli import run as run_bench

            return run_bench(args)
    except errors.IntegrityError as exc:
        print(f"esem: tampering detected: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except errors.ServiceUnavailable as exc:
        print(f"esem: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.EsemError as exc:
        print(f"esem: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:
        print(f"esem: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from esem.core import Quotas
    from esem.server.daemon import ServeConfig, StartupError, serve

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s esem[%(process)d] %(message)s")
    quotas = Quotas()
    for flag, field in (("quota_semaphores", "semaphores_per_uid"),
                        ("quota_sessions", "sessions_per_uid"),
                        ("quota_handles", "handles_per_session"),
                        ("quota_waiters", "waiters_per_session"),
                        ("quota_uid_waiters", "waiters_per_uid")):
        if getattr(args, flag) is not None:
            quotas = replace(quotas, **{field: getattr(args, flag)})
    directory = state_dir(args.dir)
    config = ServeConfig(state_dir=directory, socket_path=socket_path(args.socket, directory),
                         quotas=quotas, switchless=args.switchless)
    try:
        serve(config)
    except StartupError as exc:
        print(f"esem serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _native(args: argparse.Namespace) -> int:
    from esem.native import HEADER, NativeError, exec_under_preload, library_path

    try:
        if args.command == "preload":
            lib = library_path()
            if args.json:
                print(json.dumps({"library": str(lib), "header": str(HEADER)}))
            else:
                print(lib)
            return EXIT_OK
        argv = list(args.argv)
        if argv[:1] == ["--"]:
            argv = argv[1:]
        exec_under_preload(argv, args.all)
    except NativeError as exc:
        print(f"esem {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"esem run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE  # not reached: exec replaced the process


def _client(args: argparse.Namespace) -> Any:
    from esem.client.blocking import Client

    return Client(args.socket)


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ls(args: argparse.Namespace) -> int:
    from esem.client.admin import list_semaphores

    client = _client(args)
    try:
        entries = list_semaphores(client)
    finally:
        client.close()
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    header = ("NAME", "VALUE", "WAITERS", "HANDLES", "OWNER", "MODE", "KEY", "CREATED")
    def shown(v: object) -> str:
        return "-" if v is None else str(v)  # None: no read permission

    rows = [(e["name"], shown(e["value"]), shown(e["waiters"]), shown(e["handles"]),
             f"{e['owner_uid']}:{e['owner_gid']}", f"{e['mode']:04o}",
             "yes" if e["key_bound"] else "no", _fmt_time(e["created"])) for e in entries]
    _table(header, rows)
    if not rows:
        print("(no semaphores)")
    return EXIT_OK


def _stat(args: argparse.Namespace) -> int:
    from esem.client.admin import stat_semaphore

    client = _client(args)
    try:
        info = stat_semaphore(client, args.name)
    finally:
        client.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    lines = [
        ("name", info["name"]), ("value", info["value"]), ("initial", info["initial"]),
        ("waiters", info["waiters"]), ("open handles", info["handles"]),
        ("owner", f"uid {info['owner_uid']} gid {info['owner_gid']}"),
        ("mode", f"{info['mode']:04o}"), ("key-bound", "yes" if info["key_bound"] else "no"),
        ("robust", "yes" if info["robust"] else "no"), ("created", _fmt_time(info["created"])),
        ("posts", info["posts"]), ("granted waits", info["waits"]),
        ("holders", ", ".join(f"pid {p} x{n}" for p, n in info["holders"]) or "-"),
        ("dead holders", ", ".join(f"pid {p} x{n}" for p, n in info["dead_holders"]) or "-"),
        ("waiter queue", ", ".join(
            f"pid {p}" + (f" (deadline in {d - time.monotonic():.1f}s)" if d else "")
            for p, _, d in info["queue"]) or "-"),
    ]
    for k, v in lines:
        print(f"{k:>14}: {v}")
    return EXIT_OK


def _unlink(args: argparse.Namespace) -> int:
    from esem.api import USE_ESEM, sem_unlink
    from esem.client.blocking import Client

    key = bytes.fromhex(args.key_hex) if args.key_hex else None
    client = Client(args.socket)
    try:
        sem_unlink(args.name, flags=USE_ESEM, key=key, client=client)
    finally:
        client.close()
    print(f"unlinked {args.name}")
    return EXIT_OK


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
