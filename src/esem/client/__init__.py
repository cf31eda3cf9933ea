"""Clients of the esem service (I/O shells over ``esem.protocol.ClientSession``)."""

from esem.client.blocking import Client, get_client

__all__ = ["Client", "get_client"]
