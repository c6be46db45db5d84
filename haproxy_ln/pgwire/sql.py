"""What the proxy needs to know about SQL text, and nothing more.

Two questions, both answered conservatively:

- `classify`: could this text end a transaction with a commit, or change
  the transaction status? It matches keywords anywhere (in strings and
  comments too). A false positive only makes the proxy more careful (a
  cancel withheld, a backend kept open until its answer); a false negative
  could release a synchronous-replication wait, so there are none for
  plainly written SQL.
- `durability_violation`: would this text lower `synchronous_commit` below
  `on`? Every mention of the setting is examined with a small lexer;
  mentions in a form we do not recognise as harmless are refused. Text
  that builds the name at run time (`'synchronous' || '_commit'`) is not
  caught: the guard protects against configuration mistakes (a DSN or an
  ORM setting), not against a hostile daemon holding the keys anyway.
"""

import re

COMMITS = 1  # may commit a transaction (COMMIT, END, PREPARE TRANSACTION)
TXN_CONTROL = 2  # may change the transaction status
MENTIONS_SYNC_COMMIT = 4  # names synchronous_commit: run durability_violation

_KEYWORDS = re.compile(
    rb"(?i)\b(?:(commit|end|prepare)|begin|start|rollback|abort)\b|(synchronous_commit|pg_settings)"
)

# Values of synchronous_commit that keep commits waiting for the standby.
SAFE_VALUES = frozenset({"on", "true", "yes", "1", "remote_apply", "default"})


def classify(text: bytes | memoryview) -> int:
    """Flags (COMMITS, TXN_CONTROL, MENTIONS_SYNC_COMMIT) for SQL text."""
    flags = 0
    for m in _KEYWORDS.finditer(text):
        if m.group(2):
            flags |= MENTIONS_SYNC_COMMIT
        else:
            flags |= TXN_CONTROL | (COMMITS if m.group(1) else 0)
    return flags


_SPACE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$))+")
_WORD = re.compile(r"[a-z0-9_]+")
_DOLLAR = re.compile(r"\$([a-z_][a-z0-9_]*)?\$")
_WRITES = re.compile(r"\b(?:update|insert|merge)\b")


def _skip_space(s: str, i: int) -> int:
    """Skip whitespace, -- comments and (nested) /* */ comments."""
    while True:
        m = _SPACE.match(s, i)
        if m:
            i = m.end()
        if s.startswith("/*", i):
            depth, i = 1, i + 2
            while depth and i < len(s):
                if s.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif s.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        return i


def _literal(s: str, i: int) -> tuple[str | None, int]:
    """The value of a constant at `i` (word, quoted string, dollar string).

    Returns (None, i) for anything else: a parameter, an expression, an
    escape string with backslashes, or a unicode-escape string.
    """
    if s.startswith("'", i):
        j, parts = i + 1, []
        while True:
            k = s.find("'", j)
            if k < 0:
                return None, i
            parts.append(s[j:k])
            if s.startswith("''", k):
                parts.append("'")
                j = k + 2
                continue
            return "".join(parts), k + 1
    if s.startswith("e'", i):
        value, end = _literal(s, i + 1)
        return (None, i) if value is None or "\\" in s[i:end] else (value, end)
    if s.startswith('"', i):
        k = s.find('"', i + 1)
        return (None, i) if k < 0 else (s[i + 1 : k], k + 1)
    m = _DOLLAR.match(s, i)
    if m:
        k = s.find(m.group(0), m.end())
        return (None, i) if k < 0 else (s[m.end() : k], k + len(m.group(0)))
    m = _WORD.match(s, i)
    if m:
        return m.group(0), m.end()
    return None, i


def _check_value(s: str, i: int) -> str | None:
    value, end = _literal(s, _skip_space(s, i))
    if value is None:
        return "synchronous_commit is set to an expression haproxy-ln cannot check"
    if value.strip().lower() not in SAFE_VALUES:
        return f"synchronous_commit would be set to {value!r}"
    nxt = _skip_space(s, end)
    if nxt < len(s) and s[nxt] not in ",);":
        return "synchronous_commit is set to an expression haproxy-ln cannot check"
    return None


def durability_violation(sql: str) -> str | None:
    """Why `sql` would lower synchronous_commit below `on`, or None.

    Recognised as harmless: SHOW, RESET, SET ... TO/= a safe value,
    set_config('synchronous_commit', <safe literal>, ...), current_setting(),
    SET ... FROM CURRENT. Anything else that names the setting is refused.
    """
    s = sql.lower()
    if "pg_settings" in s and "synchronous_commit" in s and _WRITES.search(s):
        return "pg_settings would be written for synchronous_commit"
    for m in re.finditer(r"synchronous_commit", s):
        i = m.end()
        if s.startswith(("'", '"'), i):
            i += 1
        i = _skip_space(s, i)
        if s.startswith("=", i):
            problem = _check_value(s, i + 1)
        elif s.startswith("to", i) and not s[i + 2 : i + 3].isalnum():
            problem = _check_value(s, i + 2)
        elif s.startswith(",", i):
            problem = _check_value(s, i + 1)
        elif i == len(s) or s[i] in ");" or s.startswith("from", i):
            problem = None
        else:
            problem = "synchronous_commit is used in a form haproxy-ln cannot check"
        if problem:
            return problem
    return None


def options_violation(params: dict[str, str]) -> str | None:
    """Why startup parameters would lower synchronous_commit, or None.

    Covers the parameter itself and `-c name=value` / `--name=value` inside
    `options` (PostgreSQL treats '-' in a name as '_').
    """
    for name, value in params.items():
        if name.lower() == "synchronous_commit" and value.strip().lower() not in SAFE_VALUES:
            return f"synchronous_commit={value!r} was requested in the startup parameters"
    options = params.get("options", "").lower().replace("-", "_")
    for m in re.finditer(r"synchronous_commit\s*=\s*(\S*)", options):
        if m.group(1) not in SAFE_VALUES:
            return f"synchronous_commit={m.group(1)!r} was requested in the options parameter"
    if "synchronous_commit" in options and not re.search(r"synchronous_commit\s*=", options):
        return "the options parameter names synchronous_commit in a form haproxy-ln cannot check"
    return None


def quote_ident(name: str) -> str:
    """`name` as a SQL identifier, always quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | None) -> str:
    """`value` as a SQL string literal (standard_conforming_strings on), or NULL."""
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"
