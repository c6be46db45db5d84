"""Our own objects in a node's PostgreSQL, as SQL.

Every node's database holds the schema `haproxy_ln` (created idempotently):
`fence` (the highest epoch allowed to write here), `replica_state` (how far
this database has applied the other node's stream, and from which system),
and `txlog` (one row per applied source transaction, its msgpack record).
These are node-local: the replicator never replicates the schema's changes.

On the node that is primary, bootstrap adds the publication, and an event
trigger that (1) gives every new table without a primary key REPLICA
IDENTITY FULL, so its updates and deletes can be replicated, and (2) emits
the text of every DDL statement into the WAL as a transactional logical
message `haproxy_ln.ddl` (once per client statement: a multi-statement query
fires the trigger for each command, and the key of the last emitted text,
kept transaction-locally, drops the repeats). Sessions that set
`haproxy_ln.internal = on` (ours) are skipped.
"""

SCHEMA = "haproxy_ln"
PUBLICATION = "haproxy_ln"
DDL_TRIGGER = "haproxy_ln_ddl"

STORE_TABLES = """
CREATE SCHEMA IF NOT EXISTS haproxy_ln;
CREATE TABLE IF NOT EXISTS haproxy_ln.fence (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch      bigint NOT NULL,
    node       text NOT NULL,
    raised_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS haproxy_ln.replica_state (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source_system  text NOT NULL,
    source_node    text NOT NULL,
    source_lsn     pg_lsn NOT NULL,
    epoch          bigint NOT NULL,
    status         text NOT NULL CHECK (status IN ('copying', 'streaming')),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS haproxy_ln.txlog (
    id           bigserial PRIMARY KEY,
    source_node  text NOT NULL,
    epoch        bigint NOT NULL,
    commit_lsn   pg_lsn NOT NULL,
    end_lsn      pg_lsn NOT NULL,
    xid          bigint NOT NULL,
    commit_time  timestamptz NOT NULL,
    tables       text[] NOT NULL,
    record       bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS txlog_commit_time ON haproxy_ln.txlog (commit_time);

-- Lock the fence for this transaction; refuse a writer below it, raise it to the writer.
CREATE OR REPLACE FUNCTION haproxy_ln.check_fence(writer_epoch bigint, writer text)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE fenced bigint;
BEGIN
    SELECT epoch INTO fenced FROM haproxy_ln.fence FOR UPDATE;
    IF fenced > writer_epoch THEN
        RAISE EXCEPTION USING ERRCODE = 'HL001', DETAIL = fenced::text,
            MESSAGE = format('fenced at epoch %s: writer epoch %s is stale', fenced, writer_epoch);
    END IF;
    IF fenced IS NULL OR fenced < writer_epoch THEN
        INSERT INTO haproxy_ln.fence (epoch, node) VALUES (writer_epoch, writer)
        ON CONFLICT (singleton) DO UPDATE
            SET epoch = writer_epoch, node = writer, raised_at = now();
    END IF;
END
$fn$;

-- Move the replica position from exactly `expected` to `target`.
CREATE OR REPLACE FUNCTION haproxy_ln.advance(expected pg_lsn, target pg_lsn, writer_epoch bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE haproxy_ln.replica_state SET source_lsn = target, epoch = writer_epoch,
           updated_at = now()
     WHERE source_lsn = expected;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'HL003',
            MESSAGE = format('replica position is not %s: another writer moved it', expected);
    END IF;
END
$fn$;

-- An update or delete must touch exactly the one row the primary changed.
CREATE OR REPLACE FUNCTION haproxy_ln.expect_one(touched bigint, what text)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF touched <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'HL002',
            MESSAGE = format('%s matched %s rows, not 1: the replica has diverged', what, touched);
    END IF;
END
$fn$;
"""

STALE_EPOCH = "HL001"
DIVERGED = "HL002"
POSITION_MOVED = "HL003"

DDL_FUNCTION = """
CREATE OR REPLACE FUNCTION haproxy_ln.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    cmd record;
    statement_key text;
BEGIN
    IF current_setting('haproxy_ln.internal', true) = 'on' THEN
        RETURN;
    END IF;
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF cmd.object_type = 'table' AND cmd.schema_name IS DISTINCT FROM 'haproxy_ln' THEN
            PERFORM 1 FROM pg_class c
             WHERE c.oid = cmd.objid AND c.relkind IN ('r', 'p') AND c.relreplident = 'd'
               AND NOT EXISTS (SELECT 1 FROM pg_index i
                                WHERE i.indrelid = c.oid AND i.indisprimary);
            IF FOUND THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', cmd.objid::regclass);
            END IF;
        END IF;
    END LOOP;
    statement_key := md5(current_query()) || statement_timestamp()::text;
    IF current_setting('haproxy_ln.ddl_emitted', true) IS DISTINCT FROM statement_key THEN
        PERFORM set_config('haproxy_ln.ddl_emitted', statement_key, true);
        PERFORM pg_logical_emit_message(true, 'haproxy_ln.ddl', json_build_object(
            'sql', current_query(), 'search_path', current_schemas(false))::text);
    END IF;
END
$fn$;
"""

DDL_TRIGGER_SQL = f"""
DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{DDL_TRIGGER}') THEN
        CREATE EVENT TRIGGER {DDL_TRIGGER} ON ddl_command_end
            EXECUTE FUNCTION haproxy_ln.capture_ddl();
    END IF;
END $do$;
"""

PUBLICATION_SQL = f"""
DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{PUBLICATION}') THEN
        CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES;
    END IF;
END $do$;
"""

# Tables that exist already and have neither a primary key nor a chosen identity.
IDENTITY_FULL_SQL = """
DO $do$ DECLARE t regclass; BEGIN
    FOR t IN SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND c.relreplident = 'd'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'haproxy_ln')
                AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = c.oid AND i.indisprimary)
    LOOP
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', t);
    END LOOP;
END $do$;
"""

# Move every sequence owned by a column (serial, bigserial, identity) past the
# largest value in that column, so a promoted replica never hands out a used id.
ADVANCE_SEQUENCES_SQL = """
DO $do$ DECLARE s record; top bigint; BEGIN
    FOR s IN SELECT d.objid::regclass AS seq, d.refobjid::regclass AS tab, a.attname AS col
               FROM pg_depend d
               JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.deptype IN ('a', 'i')
    LOOP
        EXECUTE format('SELECT max(%I)::bigint FROM %s', s.col, s.tab) INTO top;
        IF top IS NOT NULL THEN
            PERFORM setval(s.seq, greatest(top, (SELECT last_value FROM pg_sequences
                 WHERE format('%I.%I', schemaname, sequencename)::regclass = s.seq)), true);
        END IF;
    END LOOP;
END $do$;
"""
