-- The HQ store on PostgreSQL, version 2: the SQLite store's schema version 2
-- (hq/store.py). Rows are keyed (site, kind, epoch, seq, id): one stream
-- (site, kind, epoch) per run of an outbox, each with its own watermark; the
-- same (site, kind, seq) under another id is kept and recorded in "conflicts";
-- messages that could not be stored are kept in "rejects". A version-1 database
-- is migrated in place: its rows become epoch '' (an agent without epochs).
-- "rowid" on marks and rejects is the order rows were written in, as SQLite's.

ALTER TABLE events ADD COLUMN epoch text NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN unproven integer NOT NULL DEFAULT 0;  -- 1: claims unproven
ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD PRIMARY KEY (site, kind, epoch, seq, id);
CREATE INDEX events_by_seq ON events (site, kind, seq);

ALTER TABLE marks ADD COLUMN epoch text NOT NULL DEFAULT '';
ALTER TABLE marks ADD COLUMN heard_at text NOT NULL DEFAULT '';  -- a batch last touched it
ALTER TABLE marks ADD COLUMN rowid bigserial;
ALTER TABLE marks DROP CONSTRAINT marks_pkey;
ALTER TABLE marks ADD PRIMARY KEY (site, kind, epoch);

ALTER TABLE lost ADD COLUMN epoch text NOT NULL DEFAULT '';
ALTER TABLE lost DROP CONSTRAINT lost_pkey;
ALTER TABLE lost ADD PRIMARY KEY (site, kind, epoch, from_seq, to_seq);

ALTER TABLE skipped ADD COLUMN epoch text NOT NULL DEFAULT '';
ALTER TABLE skipped DROP CONSTRAINT skipped_pkey;
ALTER TABLE skipped ADD PRIMARY KEY (site, kind, epoch, from_seq, to_seq);

CREATE TABLE conflicts (
    site text NOT NULL,
    kind text NOT NULL,
    seq bigint NOT NULL,               -- one (site, kind, seq) held under two ids
    epoch text NOT NULL,               -- the event that came second
    id text NOT NULL,
    other_epoch text NOT NULL,         -- the one already held
    other_id text NOT NULL,
    ts text NOT NULL,                  -- the second event's ts
    received_at text NOT NULL,
    PRIMARY KEY (site, kind, seq, epoch, id, other_epoch, other_id)
);

CREATE TABLE rejects (
    rowid bigserial PRIMARY KEY,
    received_at text NOT NULL,
    topic text NOT NULL,
    site text NOT NULL,                -- the topic's site level ('' if none)
    kind text NOT NULL,                -- the topic's kind level ('' if none)
    reason text NOT NULL,
    size bigint NOT NULL,              -- the message's length in bytes
    head bytea NOT NULL                -- its first bytes (REJECT_HEAD_BYTES)
);
CREATE INDEX rejects_by_site ON rejects (site, kind, received_at);

-- The walk over contiguous coverage, now per stream (site, kind, epoch): the
-- stream's rows and lost ranges, and the extra ranges p_a[i]..p_b[i].
DROP FUNCTION hq_cover(text, text, bigint, bigint[], bigint[]);
CREATE FUNCTION hq_cover(p_site text, p_kind text, p_epoch text, p_upto bigint,
                         p_a bigint[], p_b bigint[])
RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    upto bigint := p_upto;
    pos bigint := p_upto;              -- every row with seq <= pos has been read
    la bigint[];
    lb bigint[];
    r record;
    moved boolean;
BEGIN
    SELECT coalesce(array_agg(from_seq), '{}'), coalesce(array_agg(to_seq), '{}')
      INTO la, lb FROM lost
     WHERE site = p_site AND kind = p_kind AND epoch = p_epoch AND to_seq > p_upto;
    la := la || coalesce(p_a, '{}');
    lb := lb || coalesce(p_b, '{}');
    LOOP
        FOR r IN SELECT seq, coalesce(seq_end, seq) AS e FROM events
                  WHERE site = p_site AND kind = p_kind AND epoch = p_epoch AND seq > pos
                  ORDER BY seq LOOP
            EXIT WHEN r.seq - 1 > upto;
            pos := r.seq;
            upto := greatest(upto, r.e);
        END LOOP;
        moved := false;
        FOR i IN 1 .. coalesce(array_length(la, 1), 0) LOOP
            IF la[i] - 1 <= upto AND lb[i] > upto THEN
                upto := lb[i];
                moved := true;
            END IF;
        END LOOP;
        EXIT WHEN NOT moved;
    END LOOP;
    RETURN upto;
END
$$;
