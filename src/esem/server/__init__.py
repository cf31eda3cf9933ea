"""The esem service: the asyncio daemon around the trusted core."""
