-- Version 3: the Metrc forwarder's tables (hq/metrc/reports.py), as in the
-- SQLite store, and how the forwarder takes new events in on PostgreSQL: a flag on
-- each event (``metrc_taken``) with a partial index over the rows not taken yet,
-- claimed with FOR UPDATE SKIP LOCKED. (SQLite walks a rowid cursor instead; on
-- PostgreSQL a sequence is not committed in order, so a cursor could miss a row.)
-- lease_until is in the database server's clock (epoch seconds, from now()).

ALTER TABLE events ADD COLUMN metrc_taken boolean NOT NULL DEFAULT false;
CREATE INDEX events_metrc_untaken ON events (kind) WHERE NOT metrc_taken;

CREATE TABLE metrc_reports (
    event_id text PRIMARY KEY,
    site text NOT NULL,
    kind text NOT NULL,
    seq bigint NOT NULL,
    number text,                      -- sale: the receipt number (ExternalReceiptNumber)
    local_day text NOT NULL,          -- YYYY-MM-DD, the site's local day of the event
    happened_at double precision NOT NULL,
    deadline double precision NOT NULL,
    state text NOT NULL,              -- pending | reported | failed | skipped
    attempts integer NOT NULL DEFAULT 0,
    posted integer NOT NULL DEFAULT 0,   -- a call left whose outcome is unknown
    next_at double precision NOT NULL,
    lease_owner text,
    lease_until double precision NOT NULL DEFAULT 0,
    error text,
    failed_since double precision,
    metrc_id text,
    reported_at double precision,
    received_at text NOT NULL
);
CREATE INDEX metrc_reports_due ON metrc_reports (state, next_at);
CREATE INDEX metrc_reports_day ON metrc_reports (site, local_day);

CREATE TABLE metrc_catalog (
    site text NOT NULL,
    tag text NOT NULL,
    PRIMARY KEY (site, tag)
);

CREATE TABLE metrc_sync (
    site text PRIMARY KEY,
    lease_owner text,
    lease_until double precision NOT NULL DEFAULT 0,
    synced_at double precision,
    packages integer,
    error text
);
