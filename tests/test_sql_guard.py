"""The SQL checks: commit classification and the synchronous_commit guard."""

import pytest

from haproxy_ln.pgwire import sql


@pytest.mark.parametrize(
    "text",
    [
        "COMMIT",
        "commit;",
        "END",
        "end transaction",
        "PREPARE TRANSACTION 'x'",
        "/* note */ COMMIT",
        "select 1; commit",
        "COMMIT AND CHAIN",
        "\tCoMmIt",
    ],
)
def test_commit_statements_are_recognised(text: str) -> None:
    assert sql.classify(text.encode()) & sql.COMMITS


@pytest.mark.parametrize(
    "text", ["select 1", "insert into t values (1)", "update vars set intval = intval + 1"]
)
def test_plain_statements_neither_commit_nor_control(text: str) -> None:
    assert sql.classify(text.encode()) == 0


@pytest.mark.parametrize("text", ["BEGIN", "start transaction", "ROLLBACK", "abort"])
def test_transaction_control_without_commit(text: str) -> None:
    assert sql.classify(text.encode()) == sql.TXN_CONTROL


def test_synchronous_commit_mention_is_flagged_for_the_guard() -> None:
    assert sql.classify(b"SET synchronous_commit = off") & sql.MENTIONS_SYNC_COMMIT
    assert not sql.classify(b"select commit_ts from t") & sql.MENTIONS_SYNC_COMMIT


@pytest.mark.parametrize(
    "text",
    [
        "SET synchronous_commit = off",
        "set synchronous_commit to 'off'",
        "SET SESSION synchronous_commit TO local",
        "SET LOCAL synchronous_commit = remote_write",
        'SET "synchronous_commit" = off',
        "SET synchronous_commit /* sneaky */ = off",
        "SET synchronous_commit -- line\n = off",
        "SET synchronous_commit = false",
        "SET synchronous_commit = 0",
        "SET synchronous_commit = no",
        "SET synchronous_commit = $$off$$",
        "SET synchronous_commit = $x$local$x$",
        "SET synchronous_commit = E'o\\146f'",
        "select set_config('synchronous_commit', 'off', false)",
        "select set_config('synchronous_commit', $1, false)",
        "select set_config('synchronous_commit', 'o' || 'ff', false)",
        "ALTER ROLE lightning SET synchronous_commit = off",
        "ALTER SYSTEM SET synchronous_commit TO 'local'",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql SET synchronous_commit = off AS $$ $$",
        "BEGIN; SET LOCAL synchronous_commit = off; INSERT INTO t VALUES (1); COMMIT",
        "UPDATE pg_settings SET setting = 'off' WHERE name = 'synchronous_commit'",
        "select my_synchronous_commit_col from t",
    ],
)
def test_statements_lowering_durability_are_refused(text: str) -> None:
    assert sql.durability_violation(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "SHOW synchronous_commit",
        "show synchronous_commit;",
        "RESET synchronous_commit",
        "SET synchronous_commit = on",
        "SET synchronous_commit TO 'remote_apply'",
        "SET synchronous_commit TO DEFAULT",
        "select current_setting('synchronous_commit')",
        "select set_config('synchronous_commit', 'on', false)",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql"
        " SET synchronous_commit FROM CURRENT AS $$ $$",
    ],
)
def test_harmless_mentions_pass(text: str) -> None:
    assert sql.durability_violation(text) is None


def test_refusal_names_the_value() -> None:
    assert sql.durability_violation("SET synchronous_commit = 'local'") == (
        "synchronous_commit would be set to 'local'"
    )


@pytest.mark.parametrize(
    "params",
    [
        {"user": "u", "synchronous_commit": "off"},
        {"user": "u", "options": "-c synchronous_commit=off"},
        {"user": "u", "options": "--synchronous-commit=local"},
        {"user": "u", "options": "-c  SYNCHRONOUS_COMMIT=remote_write -c x=y"},
        {"user": "u", "options": "-c synchronous_commit"},
    ],
)
def test_startup_parameters_lowering_durability_are_refused(params: dict[str, str]) -> None:
    assert sql.options_violation(params) is not None


@pytest.mark.parametrize(
    "params",
    [
        {"user": "u"},
        {"user": "u", "synchronous_commit": "on"},
        {"user": "u", "options": "-c synchronous_commit=remote_apply -c work_mem=64MB"},
        {"user": "u", "options": "-c statement_timeout=5s"},
    ],
)
def test_harmless_startup_parameters_pass(params: dict[str, str]) -> None:
    assert sql.options_violation(params) is None
