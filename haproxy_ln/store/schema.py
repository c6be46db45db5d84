"""Our own objects in a node's PostgreSQL, as SQL.

Every node's database holds the schema `haproxy_ln` (created idempotently):
`fence` (the highest epoch allowed to write here), `replica_state` (how far
this database has applied the other node's stream, and from which system),
and `txlog` (one row per applied source transaction, its msgpack record).
These are node-local: the replicator never replicates the schema's changes.

On the node that is primary, bootstrap adds the publication and three
event triggers. On ddl_command_end (once per DDL command PostgreSQL runs,
including commands run inside DO blocks, functions and triggers) the trigger
gives every new table without a primary key REPLICA IDENTITY FULL, so its
updates and deletes can be replicated, and emits into the WAL, as
transactional logical messages:

- `haproxy_ln.ddl`: {n, sql, search_path, tag, temporary, created, settings,
  missing}. `n` numbers the commands of one client statement (its text and
  start time, kept transaction-locally, so it restarts where the
  transaction does and reverts with a rolled-back savepoint); the client's
  query text comes with n = 1 only. `tag` is the command tag; `temporary`
  says the command touched temporary objects only (told by the schemas of
  its objects, or for a DROP by sql_drop's `is_temporary`); `created` lists
  the OIDs of tables CREATE TABLE AS / SELECT INTO made; `settings` the
  client's TimeZone, DateStyle, IntervalStyle and standard_conforming_strings,
  and `role`, the role the command ran as (which owns what it creates);
  `missing`, for ALTER TABLE, the fast-default value (attmissingval) of each
  column of the table (of its leaf partitions) that has one.
- after it, for each permanent table the command rewrote with new values or
  rows the stream never carried (a new column's volatile default or identity,
  a new column type, an unlogged table made logged: table_rewrite reasons 2, 4
  and 1, remembered by the table_rewrite trigger), one
  `haproxy_ln.rows` {schema, table, columns} and one `haproxy_ln.row` (a JSON
  array of output texts) per row: rewrites are not decoded, so the replica
  would otherwise keep the values it computed itself.

Values are printed under the replicator's text settings (the helper
functions carry them as SET clauses). The commands of an extension's script
are left out (CREATE EXTENSION replays them). Sessions that set
`haproxy_ln.internal = on` (ours) are skipped, and so is our own ALTER TABLE
... REPLICA IDENTITY FULL.
"""

SCHEMA = "haproxy_ln"
NUDGE_PREFIX = "haproxy_ln.nudge"  # see primary.set_sync
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

-- A writer's batch starts here: check_fence, then move the replica position from
-- exactly `expected` to `target` (the batch's rows follow in the same transaction).
DROP FUNCTION IF EXISTS haproxy_ln.advance(pg_lsn, pg_lsn, bigint);
CREATE OR REPLACE FUNCTION haproxy_ln.begin_batch(
    writer_epoch bigint, writer text, expected pg_lsn, target pg_lsn)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM haproxy_ln.check_fence(writer_epoch, writer);
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

# Our SECURITY DEFINER functions (the trigger runs as the client, who may not read
# the catalog's attmissingval, the rows of a table, or emit logical messages): a
# search_path of their own, and the settings under which values print as the
# replicator reads them (record.TEXT_SETTINGS).
_DEFINER = """
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC'
SET extra_float_digits = 3 SET bytea_output = 'hex'
"""

DDL_FUNCTION = f"""
-- Every role may call pg_logical_emit_message by default, so anyone could put
-- messages of ours in the stream, and the replica would run their "DDL". Only
-- superusers may; our trigger emits through emit_ddl, which checks what it sends.
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;
-- The trigger runs as the client and calls our functions by name.
GRANT USAGE ON SCHEMA haproxy_ln TO PUBLIC;

-- table_rewrite: remember the tables whose rows this command writes anew without
-- decoding them (an unlogged table made logged, 1; a new column's default, 2; a
-- column's new type, 4), so ddl_command_end can send them.
CREATE OR REPLACE FUNCTION haproxy_ln.capture_rewrite() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('haproxy_ln.internal', true) = 'on'
       OR pg_event_trigger_table_rewrite_reason() & 7 = 0 THEN
        RETURN;
    END IF;
    PERFORM set_config('haproxy_ln.rewritten', concat_ws(',',
        nullif(current_setting('haproxy_ln.rewritten', true), ''),
        pg_event_trigger_table_rewrite_oid()::text), true);
END
$fn$;

-- sql_drop: whether everything the command drops is temporary (not on the replica).
CREATE OR REPLACE FUNCTION haproxy_ln.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('haproxy_ln.dropped_temp', CASE WHEN EXISTS (
        SELECT 1 FROM pg_event_trigger_dropped_objects() WHERE NOT is_temporary)
        THEN 'off' ELSE 'on' END, true);
END
$fn$;

-- The fast-default values (attmissingval) of `tables` (their leaf partitions for a
-- partitioned table), as [column, array text]: what the rows that existed before an
-- ADD COLUMN read in that column.
CREATE OR REPLACE FUNCTION haproxy_ln.missing_values(tables oid[]) RETURNS json
LANGUAGE sql STABLE {_DEFINER} AS $fn$
    SELECT json_agg(json_build_array(m.attname, m.v) ORDER BY m.attname, m.v)
      FROM (SELECT DISTINCT a.attname::text, a.attmissingval::text AS v
              FROM pg_attribute a
             WHERE a.atthasmissing AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attrelid IN (SELECT p.relid FROM unnest(tables) t,
                                         pg_partition_tree(t) p WHERE p.isleaf
                                  UNION SELECT t FROM unnest(tables) t)) m
$fn$;

-- Every row of table `t` (if permanent and not ours): a message `haproxy_ln.rows`
-- naming the table and its columns (generated columns left out, as pgoutput does),
-- then one `haproxy_ln.row` per row, a JSON array of the values' output text (null
-- for NULL). The replica replaces the table's rows with these, so only while DDL
-- runs, and only for a table the session may alter.
CREATE OR REPLACE FUNCTION haproxy_ln.emit_rows(t oid) RETURNS void
LANGUAGE plpgsql {_DEFINER} AS $fn$
DECLARE
    cols text[];
BEGIN
    PERFORM 1 FROM pg_event_trigger_ddl_commands() LIMIT 1;  -- fails outside DDL
    PERFORM 1 FROM pg_class c
     WHERE c.oid = t AND c.relkind = 'r' AND c.relpersistence = 'p'
       AND c.relnamespace <> 'haproxy_ln'::regnamespace;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = t), 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'HL004', MESSAGE = format(
            'haproxy-ln sends the rows of %s only for a role that may alter it', t::regclass);
    END IF;
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{{}}') INTO cols
      FROM pg_attribute a
     WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    PERFORM pg_logical_emit_message(true, 'haproxy_ln.rows', json_build_object(
            'schema', n.nspname, 'table', c.relname, 'columns', cols)::text)
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = t;
    EXECUTE format('SELECT count(pg_logical_emit_message(true, %L, '
                   'to_json(ARRAY[%s]::text[])::text)) FROM ONLY %s', 'haproxy_ln.row',
                   (SELECT string_agg(format('CASE WHEN %1$I IS NOT NULL '
                                             'THEN format(''%%s'', %1$I) END', col), ', ')
                      FROM unnest(cols) col),
                   t::regclass);
END
$fn$;

-- Emit the message of a DDL command: only while one runs, and naming a role the
-- session may act as (the replica runs the DDL as that role).
CREATE OR REPLACE FUNCTION haproxy_ln.emit_ddl(message json) RETURNS void
LANGUAGE plpgsql {_DEFINER} AS $fn$
BEGIN
    PERFORM 1 FROM pg_event_trigger_ddl_commands() LIMIT 1;  -- fails outside DDL
    IF NOT pg_has_role(session_user, message->'settings'->>'role', 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'HL004', MESSAGE = format(
            'haproxy-ln replicates DDL as the role that ran it, and %s cannot act as %s',
            session_user, message->'settings'->>'role');
    END IF;
    PERFORM pg_logical_emit_message(true, 'haproxy_ln.ddl', message::text);
END
$fn$;

-- ddl_command_end: one message per DDL command PostgreSQL runs (see the module doc).
CREATE OR REPLACE FUNCTION haproxy_ln.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    cmd record;
    statement_key text := md5(current_query()) || statement_timestamp()::text;
    n int := 1;
    created bigint[] := '{{}}';
    altered oid[] := '{{}}';
    rewritten oid[];
    temporary boolean;
    t oid;
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
                -- Our own DDL: not a command of the client's statement.
                PERFORM set_config('haproxy_ln.internal', 'on', true);
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', cmd.objid::regclass);
                PERFORM set_config('haproxy_ln.internal', 'off', true);
            END IF;
            IF cmd.command_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
                created := created || cmd.objid::bigint;
            ELSIF cmd.command_tag = 'ALTER TABLE' THEN
                altered := altered || cmd.objid;
            END IF;
        END IF;
    END LOOP;
    -- The commands of an extension's script come with CREATE EXTENSION itself.
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands())
       AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() WHERE NOT in_extension) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()) THEN
        temporary := NOT EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()
                                  WHERE schema_name IS NULL
                                     OR (schema_name NOT LIKE 'pg\\_temp%'
                                         AND schema_name NOT LIKE 'pg\\_toast\\_temp%'));
    ELSE
        temporary := current_setting('haproxy_ln.dropped_temp', true) = 'on';
    END IF;
    PERFORM set_config('haproxy_ln.dropped_temp', '', true);
    -- n numbers the commands of one client statement (its text and start time).
    IF current_setting('haproxy_ln.ddl_key', true) = statement_key THEN
        n := current_setting('haproxy_ln.ddl_n')::int + 1;
    ELSE
        PERFORM set_config('haproxy_ln.ddl_key', statement_key, true);
    END IF;
    PERFORM set_config('haproxy_ln.ddl_n', n::text, true);
    rewritten := string_to_array(nullif(current_setting('haproxy_ln.rewritten', true), ''),
                                 ',')::oid[];
    PERFORM set_config('haproxy_ln.rewritten', '', true);
    PERFORM haproxy_ln.emit_ddl(json_build_object(
        'n', n,
        'sql', CASE WHEN n = 1 THEN current_query() END,
        'search_path', current_schemas(false),
        'tag', tg_tag,
        'temporary', temporary,
        'created', created,
        'settings', json_build_object(
            'TimeZone', current_setting('TimeZone'),
            'DateStyle', current_setting('DateStyle'),
            'IntervalStyle', current_setting('IntervalStyle'),
            'standard_conforming_strings', current_setting('standard_conforming_strings'),
            'role', current_user),
        'missing', CASE WHEN altered <> '{{}}' THEN haproxy_ln.missing_values(altered) END
    ));
    FOREACH t IN ARRAY coalesce(rewritten, '{{}}') LOOP
        PERFORM haproxy_ln.emit_rows(t);
    END LOOP;
END
$fn$;
"""

DDL_TRIGGER_SQL = f"""
DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{DDL_TRIGGER}') THEN
        CREATE EVENT TRIGGER {DDL_TRIGGER} ON ddl_command_end
            EXECUTE FUNCTION haproxy_ln.capture_ddl();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'haproxy_ln_rewrite') THEN
        CREATE EVENT TRIGGER haproxy_ln_rewrite ON table_rewrite
            EXECUTE FUNCTION haproxy_ln.capture_rewrite();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'haproxy_ln_drop') THEN
        CREATE EVENT TRIGGER haproxy_ln_drop ON sql_drop
            EXECUTE FUNCTION haproxy_ln.capture_drop();
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
