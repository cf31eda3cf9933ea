"""FILE VAULT: a file-sealing server hardened by one flag (esem's case study).

A TLS server on 127.0.0.1 seals users' files with AES-256-GCM inside a 5-slot engine and
indexes them in an on-disk file tree; two semaphores keep it correct, ``sem_service``
(the engine's slots) and ``sem_filetree`` (the tree's read-modify-write). With legacy
POSIX semaphores a same-uid process can raise their counts and lose files or fail
requests; with ``USE_ESEM`` (and a key) it cannot. See docs/vault.md.

Modules: ``server`` (VaultServer), ``client`` (VaultClient), ``store`` (the operations),
``engine``, ``filetree``, ``sync`` (the one-flag switch), ``users``, ``tls``, ``wire``,
``limits``, ``errors``, ``attacks`` (the adversary), ``workload`` (``run_workload``, the
unit of ``esem demo``), ``cli`` (``esem vault ...``). Nothing is imported here, so that
``esem --help`` stays fast.
"""
