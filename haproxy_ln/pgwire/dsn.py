"""Where a PostgreSQL server is and who we are there: `postgresql://user@host:port/db`.

Passwords never live in the URL (the config keeps them as secrets of their
own), so a target can be logged and shown as it is; `with_password` attaches
one for connecting, and `__repr__` never shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

DEFAULT_PORT = 5432
_SCHEMES = ("postgresql", "postgres")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# The query parameters we act on, as libpq reads them: TLS and its files.
OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


@dataclass(frozen=True, slots=True)
class PgTarget:
    host: str
    port: int
    user: str
    database: str
    options: tuple[tuple[str, str], ...] = ()  # query parameters: OPTIONS only
    password: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, url: str) -> PgTarget:
        """Parse a postgresql:// URL. Raises ValueError saying what is wrong; a
        password in the URL is an error, so that it cannot leak through logs, and
        so is a query parameter that is not one of OPTIONS or a bad sslmode."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError("expected a URL like postgresql://user@host:5432/dbname")
        if parts.password is not None:
            raise ValueError("put the password in the *_password setting, not in the URL")
        if not parts.hostname or not parts.username:
            raise ValueError("the URL must name a user and a host (postgresql://user@host/db)")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ValueError(f"bad port: {e}") from None
        database = unquote(parts.path.lstrip("/")) or unquote(parts.username)
        options = tuple(parse_qsl(parts.query, strict_parsing=False))
        for key, value in options:
            if key not in OPTIONS:
                raise ValueError(f"unknown parameter {key!r}: the URL may set {', '.join(OPTIONS)}")
            if key == "sslmode" and value not in SSL_MODES:
                raise ValueError(f"sslmode {value!r} is not one of {', '.join(SSL_MODES)}")
        return cls(parts.hostname, port, unquote(parts.username), database, options)

    def with_password(self, password: str | None) -> PgTarget:
        return replace(self, password=password)

    def with_database(self, database: str) -> PgTarget:
        return replace(self, database=database)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "&".join(f"{k}={quote(v)}" for k, v in self.options)
        url = f"postgresql://{quote(self.user)}@{host}:{self.port}/{quote(self.database)}"
        return f"{url}?{query}" if query else url

    def asyncpg_kwargs(self) -> dict[str, Any]:
        """Arguments for asyncpg.connect()/create_pool()."""
        return {"dsn": str(self), "password": self.password}
