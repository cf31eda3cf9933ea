"""The ``esem`` command: run the service, inspect it, and the tools around it.

Exit status: 0 success; 1 the service refused the operation (no such name, permission,
key), or for ``esem attack`` an esem row was broken; 2 bad usage (checked before anything
is sent); 3 no service answers (or it failed to start); 4 tampering detected; 141 the
reader of the output went away (``esem ls | head``), as for a tool killed by SIGPIPE.

Keys of key-bound semaphores are read from a file, an environment variable or stdin,
as hex text: a key on the command line (``--key-hex``, deprecated) is visible to every
user through ``ps``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esem import errors
from esem.core.limits import check_name
from esem.core.status import CoreError
from esem.paths import socket_path, state_dir
from esem.safe_text import printable

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTEGRITY = 0, 1, 2, 3, 4
EXIT_PIPE = 128 + 13  # SIGPIPE: what a shell reports for a tool killed by it

EPILOG = """\
exit status: 0 ok, 1 refused by the service, 2 bad usage (a bad name, option or key;
checked before anything is sent), 3 no service (or it could not start), 4 tampering
detected, 141 output pipe closed early (as SIGPIPE).
environment: ESEM_SOCKET (socket path), ESEM_DIR (state directory), ESEM_PUBKEY (hex key
to pin instead of the published one).
"""


class UsageError(ValueError):
    """Bad command-line input found after parsing (a key that does not decode...)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esem")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from esem import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for (the metadata read costs a few ms)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"esem {_version()}")
        parser.exit()


def _sem_name(text: str) -> str:
    """argparse type of a semaphore name: a bad one is a usage error (exit 2) before
    anything is sent."""
    try:
        check_name(text)
    except CoreError as exc:
        raise argparse.ArgumentTypeError(printable(exc.message)) from None
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("seconds must be finite and not negative")
    return value


def _metrics_address(text: str) -> str:
    from esem.server.metrics import parse_address

    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", type=_sem_name, help="semaphore name, e.g. /jobs")


def _add_key(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "key of a key-bound semaphore",
        "hex text (whitespace ignored); from a file, the environment or stdin, never the "
        "command line, where ps shows it to every user")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--key-file", metavar="PATH", help="read the key from PATH")
    m.add_argument("--key-env", metavar="VAR", help="read the key from environment variable VAR")
    m.add_argument("--key-stdin", action="store_true", help="read the key from standard input")
    m.add_argument("--key-hex", metavar="HEX",
                   help="deprecated: the key itself, visible to other users in ps")


def _read_key(args: argparse.Namespace) -> bytes | None:
    """The key the options name, or None; ``UsageError`` for one that cannot be read or
    is not hex (its length is checked by the API, also before anything is sent)."""
    if args.key_file is not None:
        where = f"--key-file {args.key_file}"
        try:
            with open(args.key_file, encoding="ascii", errors="replace") as f:
                text = f.read(4096)
        except OSError as exc:
            raise UsageError(f"{where}: {exc.strerror}") from None
    elif args.key_env is not None:
        where = f"--key-env {args.key_env}"
        if args.key_env not in os.environ:
            raise UsageError(f"{where}: no such environment variable")
        text = os.environ[args.key_env]
    elif args.key_stdin:
        where = "--key-stdin"
        text = sys.stdin.read(4096)
    elif args.key_hex is not None:
        where = "--key-hex"
        print("esem: warning: --key-hex puts the key on the command line, where other users "
              "see it (ps); use --key-file, --key-env or --key-stdin", file=sys.stderr)
        text = args.key_hex
    else:
        return None
    try:
        return bytes.fromhex("".join(text.split()))
    except ValueError:
        raise UsageError(f"{where}: the key is not hex text") from None



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
    parser.add_argument("--version", action=_VersionAction, help="print esem's version")
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
                   help="concurrent sessions of one uid (default 512)")
    p.add_argument("--quota-handles", type=int, metavar="N",
                   help="open handles per session (default 1024)")
    p.add_argument("--quota-waiters", type=int, metavar="N",
                   help="queued waits per session (default 256)")
    p.add_argument("--quota-uid-waiters", type=int, metavar="N",
                   help="queued waits across a uid's sessions (default 4096)")
    p.add_argument("--switchless", action="store_true",
                   help="offer sessions the shared-memory fast path (clients ask for it with "
                   "esem.connect(switchless=True) or ESEM_SWITCHLESS=1)")
    p.add_argument("--user", metavar="NAME",
                   help="as root: drop to this user (and its group, no supplementary groups) "
                   "once the key is read and the socket bound; refused if it does not exist")
    p.add_argument("--print-systemd-unit", action="store_true",
                   help="print the systemd unit shipped with esem (ExecStart set to this "
                   "installation) and exit; see README, Running the service")
    p.add_argument("--metrics", metavar="HOST:PORT", type=_metrics_address,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST "
                   "defaults to 127.0.0.1: ':9464'; needs pip install 'esem[metrics]')")
    p.add_argument("--resume-grace", type=_seconds, metavar="SECONDS", default=5.0,
                   help="how long a session whose connection was lost (its process still "
                   "running) waits for its client to reconnect and resume it (default 5; "
                   "0: sessions end with their connection)")
    p.add_argument("--journal", metavar="DIR",
                   help="keep the journal (every acknowledged change, so a restarted "
                   "service restores every semaphore and session) in DIR instead of the "
                   "state directory (which is on tmpfs under /run: until reboot)")
    p.add_argument("--fsync", action="store_true",
                   help="fsync the journal before replies are sent (group-committed per "
                   "event-loop turn): for a --journal on disk that must survive a reboot")
    p.add_argument("--no-journal", action="store_true",
                   help="keep state only in memory: a restart loses every semaphore")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    p = sub.add_parser("ls", help="list the service's semaphores")
    _add_socket(p)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--wide", action="store_true",
                   help=f"never shorten names (on a terminal, names longer than "
                   f"{NAME_COLUMN} characters are shortened in the middle)")

    p = sub.add_parser("stat", help="show one semaphore, its holders and waiters",
                       description="Show one semaphore. A key-bound semaphore shows its "
                       "count, holders and queue only to a STAT that proves its key "
                       "(give it with --key-file, --key-env or --key-stdin).")
    _add_name(p)
    _add_socket(p)
    _add_key(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = sub.add_parser("unlink", help="remove a semaphore's name")
    _add_name(p)
    _add_socket(p)
    _add_key(p)

    p = sub.add_parser("reclaim", help="release the units a dead process held",
                       description="Release the units of a semaphore that processes held "
                       "when they died (its 'dead holders' in esem stat; a robust semaphore "
                       "releases them by itself) to its waiters and count, without "
                       "restarting the service. Only the owner or root may. The service "
                       "logs it; esem stat shows the total as 'reclaimed'.")
    _add_name(p)
    _add_socket(p)
    _add_key(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

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
                       description="Run the attack suite (docs/design.md section 2, adversaries "
                       "A1-A7) on an embedded service in a temporary directory, or on a "
                       "running one with --socket, legacy POSIX semaphores beside esem. "
                       "Exit status 0 when every esem row is 'defended' or 'n/a'.")
    p.add_argument("--only", action="append", metavar="ID",
                   help="run only this attack (A1..A7, A2-RING, A3-SQUAT, A3-ROBUST); repeatable")
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
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return status
    except BrokenPipeError:
        # The reader went away (esem ls | head -1): stop quietly, as a C tool killed by
        # SIGPIPE would, and keep the interpreter's final flush from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
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
        if args.command == "reclaim":
            return _reclaim(args)
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
        print(f"esem: {printable(str(exc))}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:
        print(f"esem: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from esem.core import Quotas
    from esem.server.daemon import ServeConfig, StartupError, serve

    if args.print_systemd_unit:
        from esem.server.unit import systemd_unit

        sys.stdout.write(systemd_unit())
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s esem[%(process)d] %(levelname)s %(message)s")
    quotas = Quotas()
    for flag, field in (("quota_semaphores", "semaphores_per_uid"),
                        ("quota_sessions", "sessions_per_uid"),
                        ("quota_handles", "handles_per_session"),
                        ("quota_waiters", "waiters_per_session"),
                        ("quota_uid_waiters", "waiters_per_uid")):
        if getattr(args, flag) is not None:
            quotas = replace(quotas, **{field: getattr(args, flag)})
    directory = state_dir(args.dir)
    if args.no_journal and (args.journal or args.fsync):
        print("esem serve: --no-journal excludes --journal and --fsync", file=sys.stderr)
        return EXIT_USAGE
    journal = None if args.no_journal else Path(args.journal) if args.journal else directory
    config = ServeConfig(state_dir=directory, socket_path=socket_path(args.socket, directory),
                         quotas=quotas, switchless=args.switchless, user=args.user,
                         metrics=args.metrics, resume_grace=args.resume_grace,
                         journal_dir=journal, fsync=args.fsync)
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

    # Names are other tenants' text: the table renderer escapes every cell, so a newline
    # or an escape sequence in one cannot forge rows or rewrite the operator's terminal.
    rows = [(_shown_name(e["name"], args.wide), shown(e["value"]), shown(e["waiters"]),
             shown(e["handles"]),
             f"{e['owner_uid']}:{e['owner_gid']}", f"{e['mode']:04o}",
             "yes" if e["key_bound"] else "no", _fmt_time(e["created"])) for e in entries]
    _table(header, rows, fit=not args.wide)
    if not rows:
        print("(no semaphores)")
    return EXIT_OK


def _stat(args: argparse.Namespace) -> int:
    from collections.abc import Callable

    from esem.client.admin import stat_semaphore
    from esem.safe_text import printable

    key = _read_key(args)
    client = _client(args)
    try:
        info = stat_semaphore(client, args.name, key=key)
    finally:
        client.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    hidden = "-" if info["key_bound"] else "- (no read permission)"
    if info["key_bound"] and info["value"] is None:
        hidden = "- (key-bound: shown only with its key)"

    def shown(v: object) -> object:
        return hidden if v is None else v

    def listed(field: str, fmt: Callable[[list[Any]], str]) -> str:
        items = info.get(field)
        if items is None:
            return str(hidden)
        text = ", ".join(fmt(x) for x in items) or "-"
        total = info.get(f"{field}_total")
        if isinstance(total, int) and total > len(items):
            text += f" ... ({len(items)} of {total} shown)"
        return text

    lines = [
        ("name", printable(info["name"])), ("value", shown(info["value"])),
        ("initial", shown(info["initial"])),
        ("waiters", shown(info["waiters"])), ("open handles", shown(info["handles"])),
        ("owner", f"uid {info['owner_uid']} gid {info['owner_gid']}"),
        ("mode", f"{info['mode']:04o}"), ("key-bound", "yes" if info["key_bound"] else "no"),
        ("robust", f"yes ({shown(info['robust_releases'])} released, "
                   f"{shown(info['robust_forgiven'])} forgiven)" if info["robust"] else "no"),
        ("created", _fmt_time(info["created"])),
        ("posts", shown(info["posts"])), ("granted waits", shown(info["waits"])),
        ("reclaimed", shown(info.get("reclaimed"))),
        ("holders", listed("holders", lambda x: f"pid {x[0]} x{x[1]}")),
        ("dead holders", listed("dead_holders", lambda x: f"pid {x[0]} x{x[1]}")),
        ("waiter queue", listed("queue", lambda x: f"pid {x[0]}" + (
            f" (deadline in {x[2] - time.monotonic():.1f}s)" if x[2] else ""))),
    ]
    for k, v in lines:
        print(f"{k:>14}: {v}")
    return EXIT_OK


def _unlink(args: argparse.Namespace) -> int:
    from esem.api import USE_ESEM, sem_unlink
    from esem.client.blocking import Client

    key = _read_key(args)
    client = Client(args.socket)
    try:
        sem_unlink(args.name, flags=USE_ESEM, key=key, client=client)
    finally:
        client.close()
    print(f"unlinked {printable(args.name)}")
    return EXIT_OK


def _reclaim(args: argparse.Namespace) -> int:
    from esem.core.limits import check_key
    from esem.protocol.constants import Opcode
    from esem.protocol.messages import Request

    key = _read_key(args)
    try:
        check_key(key)
    except CoreError as exc:
        raise UsageError(exc.message) from None
    client = _client(args)
    try:
        reply = client.call(Request(Opcode.RECLAIM, 0, name=args.name), key=key)
    finally:
        client.close()
    if args.json:
        print(json.dumps({"name": args.name, "reclaimed": reply.value}))
    else:
        print(f"reclaimed {reply.value} unit(s) of {printable(args.name)}")
    return EXIT_OK


NAME_COLUMN = 40  # widest name esem ls prints on a terminal without --wide


def _shown_name(name: str, wide: bool) -> str:
    """A name for the terminal: on a terminal shortened in the middle (both ends stay:
    prefixes and unique suffixes) unless ``--wide``; a pipe gets it whole. Not escaped
    here: the table renderer escapes every cell (``esem.safe_text.printable``)."""
    if wide or len(printable(name)) <= NAME_COLUMN or not sys.stdout.isatty():
        return name
    keep = NAME_COLUMN - 3
    return name[: keep - keep // 2] + "..." + name[-(keep // 2):]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, fit: bool = True) -> None:
    from esem.tables import print_table

    print_table(header, rows, fit=fit)
