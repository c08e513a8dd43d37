-- The HQ store on PostgreSQL, version 1: the same tables as the SQLite store
-- (hq/store.py), with the fleet tables (hq/fleet_store.py) beside them.
-- Times are iso_ms text (UTC, ms, 'Z'), which sorts as time, exactly as in SQLite,
-- so every query and every answer is the same on both backends. A payload is the
-- agent's JSON text, verbatim (cast it with payload::json to query it).

CREATE TABLE events (
    site text NOT NULL,
    kind text NOT NULL,
    seq bigint NOT NULL,
    seq_end bigint,                    -- a thinned sensor aggregate covers seq..seq_end
    id text NOT NULL,
    ts text NOT NULL,                  -- when the agent accepted it (iso_ms)
    received_at text NOT NULL,         -- when HQ first stored it (iso_ms)
    payload text NOT NULL,             -- the whole envelope, JSON
    dups integer NOT NULL DEFAULT 0,   -- redeliveries dropped; per row so --since applies
    PRIMARY KEY (site, kind, seq)
);

CREATE TABLE marks (
    site text NOT NULL,
    kind text NOT NULL,
    upto bigint NOT NULL,              -- the ack watermark; a row is also the pair's write lock
    PRIMARY KEY (site, kind)
);

CREATE TABLE lost (
    site text NOT NULL,
    kind text NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    seq bigint NOT NULL,               -- the event that declared the range
    ts text NOT NULL,
    received_at text NOT NULL,
    PRIMARY KEY (site, kind, from_seq, to_seq)
);

CREATE TABLE skipped (
    site text NOT NULL,
    kind text NOT NULL,
    from_seq bigint NOT NULL,          -- seqs the watermark was raised over by a "floor"
    to_seq bigint NOT NULL,            -- and that this store did not hold at the time
    seq bigint NOT NULL,               -- the event that carried the floor
    ts text NOT NULL,
    received_at text NOT NULL,
    PRIMARY KEY (site, kind, from_seq, to_seq)
);

CREATE TABLE sites_state (
    site text PRIMARY KEY,
    online boolean,                    -- NULL: no status heard
    status_ts text,                    -- the agent's ts of the stored status
    status_at text,                    -- when HQ got it
    last_seen text,
    version text,
    health_at text,
    health text                        -- the kept parts of the last P/health, JSON
);

CREATE TABLE device_faults (
    site text NOT NULL,
    device text NOT NULL,
    hour text NOT NULL,                -- UTC, 'YYYY-MM-DDTHH:00Z'
    faults bigint NOT NULL,
    PRIMARY KEY (site, device, hour)
);

-- The highest seq reached from p_upto over contiguous coverage: stored rows
-- (an aggregate covers seq..seq_end), the pair's lost ranges, and the extra
-- ranges p_a[i]..p_b[i] (aggregates of the batch that start at or below the
-- mark). The rows above the mark are read lazily in seq order and the walk
-- stops at the first hole, so the cost is the distance advanced, not the
-- backlog beyond a gap (the same walk as SqliteStore._cover). "x - 1 <= upto"
-- rather than "x <= upto + 1": seqs go up to 2^63 - 1.
CREATE FUNCTION hq_cover(p_site text, p_kind text, p_upto bigint, p_a bigint[], p_b bigint[])
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
     WHERE site = p_site AND kind = p_kind AND to_seq > p_upto;
    la := la || coalesce(p_a, '{}');
    lb := lb || coalesce(p_b, '{}');
    LOOP
        FOR r IN SELECT seq, coalesce(seq_end, seq) AS e FROM events
                  WHERE site = p_site AND kind = p_kind AND seq > pos ORDER BY seq LOOP
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
