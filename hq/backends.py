"""The stores a [hq] store URL names: sqlite:///PATH (embedded) or postgresql://... .

Each backend module imports the shared parts (hq/store.py); only this module
knows them all, so no backend imports another.
"""

from __future__ import annotations

from hq.metrc.reports import ReportStore, SqliteReportStore
from hq.store import (
    PSYCOPG_HINT,
    SqliteStore,
    Store,
    StoreError,
    redact_url,
    sqlite_path,
)


def open_store(url: str, *, create: bool = True) -> Store:
    """The store named by ``[hq] store``: ``sqlite:///PATH`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SqliteStore(sqlite_path(url), create=create)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from hq.pgstore import PgStore
        except ImportError as exc:
            raise StoreError(redact_url(url), f"PostgreSQL needs the psycopg packages, which are "
                                           f"not installed ({exc.name}): {PSYCOPG_HINT}") from None
        return PgStore(url, create=create)
    raise StoreError(redact_url(url), "unknown store URL; use sqlite:///PATH or "
                                   "postgresql://user@host/db")


def open_report_store(url: str) -> ReportStore:
    """The Metrc tables beside ``[hq] store``."""
    if url.startswith("sqlite:///"):
        return SqliteReportStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from hq.metrc.pg_reports import PgReportStore

        return PgReportStore(url)
    raise StoreError(redact_url(url), "unknown store URL; use sqlite:///PATH or "
                                   "postgresql://user@host/db")
