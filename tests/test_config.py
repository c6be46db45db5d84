"""The node configuration: loading, every kind of error, rendering, and `check-config`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from haproxy_ln import __version__
from haproxy_ln.cli import main
from haproxy_ln.config import (
    Config,
    DaemonConfig,
    HostPort,
    NodeConfig,
    ProxyConfig,
    format_problems,
    load,
    load_model,
    render,
)
from haproxy_ln.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "haproxy-ln.example.toml"

KiB, MiB, GiB = 1024, 1024**2, 1024**3

DEFAULT_RENDER = """\
[node]
name = "a"
event_log = "/var/lib/haproxy-ln/events.jsonl"

[proxy]
listen = "127.0.0.1:6432"
upstream = "127.0.0.1:5432"
max_message_size = "64MiB"
buffer_chunk = "16KiB"
buffer_budget = "256MiB"
max_client_connections = 1000
startup_timeout = 10.0
connect_timeout = 5.0

[replication]
source = "postgresql://postgres@127.0.0.1:5432/lightning"
sync_name = "haproxy_ln"
slot = "haproxy_ln"
mode = "sync"
max_batch = 1000
copy_workers = 2
txlog_retention_days = 7.0
connect_timeout = 5.0

[daemon]
mode = "none"
probe = "none"
start_timeout = 60.0
stop_timeout = 30.0
kill_timeout = 10.0
probe_interval = 0.5
probe_timeout = 5.0

[etcd]
endpoints = [
    "127.0.0.1:2379",
]
prefix = "/haproxy-ln/default"
request_timeout = 0.5

[keys]
adapter = "none"
runtime_dir = "/run/haproxy-ln/keys"
lnd_timeout = 10.0

[ha]
lease_ttl = 2.0
safety_margin = 0.5
degrade_after = 5.0
primary_lost_after = 5.0

[health]
listen = "0.0.0.0:8008"
"""

ALLOWED_PROXY_KEYS = (
    "buffer_budget, buffer_chunk, connect_timeout, listen, max_client_connections, "
    "max_message_size, startup_timeout, upstream"
)


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_for(tmp_path: Path, text: str) -> list[str]:
    """The problems `load` reports for a file with `text`; fails if it loads."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value.problems


def proxy_problems(tmp_path: Path, body: str) -> list[str]:
    return problems_for(tmp_path, f'[node]\nname = "a"\n[proxy]\n{body}\n')


# --- valid files -----------------------------------------------------------------------------


def test_example_loads_with_every_default() -> None:
    config = load(EXAMPLE)
    assert config == Config(node=NodeConfig(name="a"))
    proxy = config.proxy
    assert proxy.listen == HostPort("127.0.0.1", 6432)
    assert proxy.upstream == HostPort("127.0.0.1", 5432)
    assert proxy.max_message_size == 64 * MiB
    assert proxy.buffer_budget == 256 * MiB
    assert proxy.buffer_chunk == 16 * KiB
    assert proxy.max_client_connections == 1000
    assert proxy.startup_timeout == 10.0
    assert proxy.connect_timeout == 5.0


def test_example_names_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert set(data) == set(Config.model_fields)
    # peer's default is "unset", which TOML cannot write: the example shows it commented out.
    assert set(data["node"]) | {"peer", "peer_health"} == set(NodeConfig.model_fields)
    assert '# peer = "b"' in EXAMPLE.read_text(encoding="utf-8")
    assert '# peer_health = "' in EXAMPLE.read_text(encoding="utf-8")
    assert set(data["proxy"]) == set(ProxyConfig.model_fields)


def test_example_round_trips(tmp_path: Path) -> None:
    config = load(EXAMPLE)
    text = render(config)
    assert text == DEFAULT_RENDER
    assert load(write(tmp_path, text)) == config


def test_minimal_file_renders_all_defaults(tmp_path: Path) -> None:
    assert render(load(write(tmp_path, '[node]\nname = "a"\n'))) == DEFAULT_RENDER


def test_non_default_values_round_trip(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
            [node]
            name = "node-b_2"
            [proxy]
            listen = "[::1]:7432"
            upstream = "db.example.internal:5433"
            max_message_size = 1073741823
            buffer_budget = "2GiB"
            buffer_chunk = 4096
            max_client_connections = 100000
            startup_timeout = 0.5
            connect_timeout = 600
            """,
        )
    )
    proxy = config.proxy
    assert proxy.listen == HostPort("::1", 7432)
    assert str(proxy.listen) == "[::1]:7432"
    assert str(proxy.upstream) == "db.example.internal:5433"
    assert proxy.max_message_size == GiB - 1
    assert proxy.buffer_budget == 2 * GiB
    assert proxy.buffer_chunk == 4 * KiB
    assert proxy.connect_timeout == 600.0
    text = render(config)
    assert 'listen = "[::1]:7432"' in text
    assert "max_message_size = 1073741823\n" in text  # not a whole unit: plain bytes
    assert 'buffer_budget = "2GiB"' in text
    assert 'buffer_chunk = "4KiB"' in text
    assert load(write(tmp_path, text, "again.toml")) == config


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.7:1", "10.0.0.7", 1),
        ("localhost:65535", "localhost", 65535),
        ("pg-1.example.com.:5432", "pg-1.example.com.", 5432),
        ("[fe80::1%eth0]:5432", "fe80::1%eth0", 5432),
        ("[2001:db8::2]:6432", "2001:db8::2", 6432),
    ],
)
def test_host_port_forms(tmp_path: Path, text: str, host: str, port: int) -> None:
    config = load(write(tmp_path, f'[node]\nname = "a"\n[proxy]\nupstream = "{text}"\n'))
    assert config.proxy.upstream == HostPort(host, port)
    assert str(config.proxy.upstream) == text


def test_models_are_frozen() -> None:
    config = load(EXAMPLE)
    with pytest.raises(ValidationError, match="frozen"):
        config.proxy.max_client_connections = 5
    with pytest.raises(ValidationError, match="frozen"):
        config.node = NodeConfig(name="b")
    with pytest.raises(AttributeError):
        config.proxy.listen.port = 1  # type: ignore[misc]
    assert config.proxy.max_client_connections == 1000


# --- errors ----------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert problems_for(tmp_path, 'colour = "blue"\n[node]\nname = "a"\n') == [
        "colour: unknown key; allowed keys at top level: "
        "daemon, etcd, ha, health, keys, node, proxy, replication"
    ]


def test_unknown_section(tmp_path: Path) -> None:
    assert problems_for(tmp_path, '[node]\nname = "a"\n[proxi]\nlisten = "x"\n') == [
        "proxi: unknown key; allowed keys at top level: "
        "daemon, etcd, ha, health, keys, node, proxy, replication"
    ]


def test_unknown_key_in_section_does_not_show_its_value(tmp_path: Path) -> None:
    problems = proxy_problems(tmp_path, 'pasword = "hunter2"')
    assert problems == [
        f"proxy.pasword: unknown key; allowed keys in [proxy]: {ALLOWED_PROXY_KEYS}"
    ]


def test_missing_node_name(tmp_path: Path) -> None:
    assert problems_for(tmp_path, "[node]\n") == [
        'node.name: missing; required (this node\'s name in the pair, e.g. "a")'
    ]


def test_missing_node_section(tmp_path: Path) -> None:
    assert problems_for(tmp_path, "") == [
        'node: missing; required (the [node] table, e.g. [node] name = "a")'
    ]


def test_bad_node_name(tmp_path: Path) -> None:
    assert problems_for(tmp_path, '[node]\nname = "Node A"\n') == [
        "node.name: got 'Node A'; expected a string matching ^[a-z0-9][a-z0-9_-]{0,62}$"
    ]


def test_section_of_wrong_type(tmp_path: Path) -> None:
    assert problems_for(tmp_path, 'proxy = 5\n[node]\nname = "a"\n') == [
        "proxy: got 5; expected a table"
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            'max_client_connections = "many"',
            "proxy.max_client_connections: got 'many'; expected an integer >= 1 and <= 100000",
        ),
        (
            'max_client_connections = "10"',  # strict: no silent str -> int coercion
            "proxy.max_client_connections: got '10'; expected an integer >= 1 and <= 100000",
        ),
        (
            "max_client_connections = true",
            "proxy.max_client_connections: got True; expected an integer >= 1 and <= 100000",
        ),
        (
            "max_client_connections = 0",
            "proxy.max_client_connections: got 0; expected an integer >= 1 and <= 100000",
        ),
        (
            "max_client_connections = 100001",
            "proxy.max_client_connections: got 100001; expected an integer >= 1 and <= 100000",
        ),
        (
            'startup_timeout = "10s"',
            "proxy.startup_timeout: got '10s'; expected a number > 0 and <= 600",
        ),
        (
            "startup_timeout = 0",
            "proxy.startup_timeout: got 0; expected a number > 0 and <= 600",
        ),
        (
            "connect_timeout = 600.5",
            "proxy.connect_timeout: got 600.5; expected a number > 0 and <= 600",
        ),
        (
            "listen = 6432",
            "proxy.listen: got 6432; expected HOST:PORT with port 1..65535; not a string",
        ),
    ],
)
def test_wrong_type_and_out_of_range(tmp_path: Path, line: str, problem: str) -> None:
    assert proxy_problems(tmp_path, line) == [problem]


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("localhost", "no ':PORT' given"),
        ("[::1]", "no ':PORT' given"),
        ("::1:6432", "an IPv6 host must be in brackets, e.g. [::1]:6432"),
        ("[::g]:6432", "'::g' is not an IPv6 address"),
        ("[]:6432", "'' is not an IPv6 address"),
        ("127.0.0.1:0", "port 0 is out of range"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("[::1]:70000", "port 70000 is out of range"),
        ("127.0.0.1:99999999999999999999", "port 99999999999999999999 is out of range"),
        ("127.0.0.1:http", "the port 'http' is not a number"),
        ("127.0.0.1:-1", "the port '-1' is not a number"),
        (":6432", "the host is empty"),
        ("300.1.1.1:6432", "'300.1.1.1' is neither an IPv4 address nor a hostname"),
        ("bad_host:6432", "'bad_host' is neither an IPv4 address nor a hostname"),
        ("-db:6432", "'-db' is neither an IPv4 address nor a hostname"),
    ],
)
def test_bad_host_port(tmp_path: Path, given: str, why: str) -> None:
    assert proxy_problems(tmp_path, f"listen = '{given}'") == [
        f"proxy.listen: got {given!r}; expected HOST:PORT with port 1..65535; {why}"
    ]


MESSAGE_SIZE = (
    "a size from 8KiB to 1073741823 bytes (1GiB - 1), "
    'as an integer number of bytes or a string like "16KiB" or "64MiB"'
)
CHUNK_SIZE = (
    "a power-of-two size from 4KiB to 1MiB, "
    'as an integer number of bytes or a string like "16KiB" or "64MiB"'
)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            'max_message_size = "4KiB"',
            f"proxy.max_message_size: got '4KiB'; expected {MESSAGE_SIZE}; "
            "4096 bytes is out of range",
        ),
        (
            'max_message_size = "1GiB"',
            f"proxy.max_message_size: got '1GiB'; expected {MESSAGE_SIZE}; "
            "1073741824 bytes is out of range",
        ),
        (
            'max_message_size = "lots"',
            f"proxy.max_message_size: got 'lots'; expected {MESSAGE_SIZE}",
        ),
        (
            'max_message_size = "64 parsecs"',
            f"proxy.max_message_size: got '64 parsecs'; expected {MESSAGE_SIZE}",
        ),
        (
            "max_message_size = 8192.5",
            f"proxy.max_message_size: got 8192.5; expected {MESSAGE_SIZE}",
        ),
        (
            "max_message_size = true",
            f"proxy.max_message_size: got True; expected {MESSAGE_SIZE}",
        ),
        (
            'buffer_budget = "65GiB"',
            "proxy.buffer_budget: got '65GiB'; expected a size from 1MiB to 64GiB, "
            'as an integer number of bytes or a string like "16KiB" or "64MiB"; '
            "69793218560 bytes is out of range",
        ),
        (
            'buffer_chunk = "12KiB"',
            f"proxy.buffer_chunk: got '12KiB'; expected {CHUNK_SIZE}; "
            "12288 bytes is not a power of two",
        ),
        (
            "buffer_chunk = 2048",
            f"proxy.buffer_chunk: got 2048; expected {CHUNK_SIZE}; 2048 bytes is out of range",
        ),
        (
            'buffer_chunk = "2MiB"',
            f"proxy.buffer_chunk: got '2MiB'; expected {CHUNK_SIZE}; 2097152 bytes is out of range",
        ),
    ],
)
def test_bad_sizes(tmp_path: Path, line: str, problem: str) -> None:
    assert proxy_problems(tmp_path, line) == [problem]


def test_budget_below_max_message_size(tmp_path: Path) -> None:
    problems = proxy_problems(tmp_path, 'max_message_size = "512MiB"\nbuffer_budget = "128MiB"')
    assert problems == [
        "proxy.buffer_budget: got '128MiB'; expected at least max_message_size + 2 x "
        "buffer_chunk (524320KiB); one message of max_message_size must fit in the budget: "
        "raise buffer_budget or lower max_message_size"
    ]


def test_budget_rule_applies_to_the_default_max_message_size(tmp_path: Path) -> None:
    problems = proxy_problems(tmp_path, 'buffer_budget = "64MiB"')
    assert len(problems) == 1
    assert problems[0].startswith(
        "proxy.buffer_budget: got '64MiB'; expected at least max_message_size + 2 x "
        "buffer_chunk (65568KiB); "
    )


def test_budget_just_fitting_one_message_is_fine(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[node]\nname = "a"\n[proxy]\nbuffer_budget = "65568KiB"\n'))
    proxy = config.proxy
    assert proxy.buffer_budget == proxy.max_message_size + 2 * proxy.buffer_chunk


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    problems = problems_for(
        tmp_path,
        'typo = 1\n[node]\n[proxy]\nlisten = "x"\nbuffer_chunk = "3KiB"\nstartup_timeout = -1\n',
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "node.name",
        "proxy.listen",
        "proxy.buffer_chunk",
        "proxy.startup_timeout",
        "typo",
    ]


def etcd_problems(tmp_path: Path, body: str) -> list[str]:
    return problems_for(tmp_path, f'[node]\nname = "a"\n[etcd]\n{body}\n')


def test_etcd_section_with_tls_and_auth_loads(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[node]\nname = "a"\n[etcd]\n'
            'endpoints = ["etcd-1.internal:2379", "10.0.0.3:2379", "[::1]:2379"]\n'
            'prefix = "/haproxy-ln/pair-1"\nrequest_timeout = 0.25\n'
            'ca_file = "/etc/ca.pem"\ncert_file = "/etc/c.pem"\nkey_file = "/etc/k.pem"\n'
            'user = "ln"\npassword = "hunter2"\n',
        )
    )
    etcd = config.etcd
    assert etcd.endpoints == [
        HostPort("etcd-1.internal", 2379),
        HostPort("10.0.0.3", 2379),
        HostPort("::1", 2379),
    ]
    assert (etcd.prefix, etcd.request_timeout) == ("/haproxy-ln/pair-1", 0.25)
    assert etcd.ca_file == "/etc/ca.pem"
    assert (etcd.cert_file, etcd.key_file) == ("/etc/c.pem", "/etc/k.pem")
    assert etcd.user == "ln"
    assert etcd.password is not None and etcd.password.get_secret_value() == "hunter2"
    assert "hunter2" not in render(config)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("endpoints = []", "etcd.endpoints: got []; expected a value of length at least 1"),
        (
            'endpoints = ["127.0.0.1"]',
            "etcd.endpoints.0: got '127.0.0.1'; expected HOST:PORT with port 1..65535; "
            "no ':PORT' given",
        ),
        (
            'prefix = "haproxy-ln"',
            "etcd.prefix: got 'haproxy-ln'; expected a string matching "
            "^(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}){1,8}$",
        ),
        (
            'prefix = "/haproxy-ln/"',
            "etcd.prefix: got '/haproxy-ln/'; expected a string matching "
            "^(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}){1,8}$",
        ),
        ("request_timeout = 0", "etcd.request_timeout: got 0; expected a number > 0 and <= 60"),
        (
            'ca_file = "/ca.pem"\ncert_file = "/c.pem"',
            "etcd.key_file: got None; expected cert_file and key_file together, or neither; "
            "cert_file is set but key_file is not",
        ),
        (
            'ca_file = "/ca.pem"\nkey_file = "/k.pem"',
            "etcd.key_file: got '/k.pem'; expected cert_file and key_file together, or neither; "
            "key_file is set but cert_file is not",
        ),
        (
            'cert_file = "/c.pem"\nkey_file = "/k.pem"',
            "etcd.key_file: got '/k.pem'; expected ca_file with a client certificate; "
            "cert_file is set but ca_file is not",
        ),
        (
            'user = "ln"',
            "etcd.password: got <redacted>; expected user and password together, or neither; "
            "user is set but password is not",
        ),
    ],
)
def test_bad_etcd_section(tmp_path: Path, body: str, problem: str) -> None:
    assert etcd_problems(tmp_path, body) == [problem]


def test_etcd_password_without_user_is_refused_without_showing_it(tmp_path: Path) -> None:
    problems = etcd_problems(tmp_path, 'password = "hunter2"')
    assert problems == [
        "etcd.password: got <redacted>; expected user and password together, or neither; "
        "password is set but user is not"
    ]


def ha_problems(tmp_path: Path, body: str) -> list[str]:
    return problems_for(tmp_path, f'[node]\nname = "a"\n[ha]\n{body}\n')


def test_ha_timing_defaults_keepalive_to_a_third_of_the_ttl(tmp_path: Path) -> None:
    timing = load(write(tmp_path, '[node]\nname = "a"\n[ha]\nlease_ttl = 3\n')).ha.timing()
    assert (timing.lease_ttl, timing.keepalive_interval) == (3.0, 1.0)
    assert (timing.safety_margin, timing.degrade_after) == (0.5, 5.0)


def test_ha_timing_just_leaving_one_renewal_is_fine(tmp_path: Path) -> None:
    # 0.01 s between the next keepalive and the fence: etcd must answer within that
    text = (
        '[node]\nname = "a"\n[etcd]\nrequest_timeout = 0.005\n'
        "[ha]\nkeepalive_interval = 1.0\nsafety_margin = 0.99\n"
    )
    timing = load(write(tmp_path, text)).ha.timing()
    assert timing.lease_deadline(10.0) == 11.01
    assert timing.keepalive_interval < timing.lease_ttl - timing.safety_margin


HA_MARGIN_FIX = (
    "a leader must be able to renew its lease at least once before it fences itself: "
    "lower safety_margin or keepalive_interval, or raise lease_ttl"
)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "lease_ttl = 2.5",
            "ha.lease_ttl: got 2.5; expected a whole number of seconds >= 1 and <= 300; "
            "etcd grants leases in whole seconds",
        ),
        ("lease_ttl = 0", "ha.lease_ttl: got 0; expected a number >= 1 and <= 300"),
        ('lease_ttl = "2s"', "ha.lease_ttl: got '2s'; expected a number >= 1 and <= 300"),
        ("safety_margin = 0", "ha.safety_margin: got 0; expected a number > 0"),
        ("keepalive_interval = -1", "ha.keepalive_interval: got -1; expected a number > 0"),
        ("degrade_after = 0", "ha.degrade_after: got 0; expected a number > 0 and <= 3600"),
        (
            "keepalive_interval = 2.0",
            "ha.keepalive_interval: got 2.0; expected a number of seconds below lease_ttl "
            "(2 s); the lease would expire between keepalives: lower keepalive_interval "
            "or raise lease_ttl",
        ),
        (
            "keepalive_interval = 1.5",  # the default margin no longer fits
            "ha.safety_margin: got 0.5; expected a number of seconds below lease_ttl - "
            f"keepalive_interval (2 s - 1.5 s = 0.5 s); {HA_MARGIN_FIX}",
        ),
        (
            "lease_ttl = 1\nsafety_margin = 0.7",  # the implied keepalive no longer fits
            "ha.safety_margin: got 0.7; expected a number of seconds below lease_ttl - "
            "keepalive_interval (1 s - 0.333 s (unset: lease_ttl / 3) = 0.667 s); "
            f"{HA_MARGIN_FIX}",
        ),
    ],
)
def test_bad_ha_timing(tmp_path: Path, body: str, problem: str) -> None:
    assert ha_problems(tmp_path, body) == [problem]


KEEPALIVE_ANSWER_FIX = (
    "a keepalive that etcd answers within request_timeout must still renew the lease "
    "before the leader fences itself: lower request_timeout, safety_margin or "
    "keepalive_interval, or raise lease_ttl"
)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "[etcd]\nrequest_timeout = 0.9",  # the defaults leave 0.833 s
            "etcd.request_timeout: got 0.9; expected a number of seconds below [ha] lease_ttl - "
            "safety_margin - keepalive_interval (2 s - 0.5 s - 0.667 s (unset: lease_ttl / 3) "
            f"= 0.833 s); {KEEPALIVE_ANSWER_FIX}",
        ),
        (
            "[etcd]\nrequest_timeout = 0.5\n[ha]\nlease_ttl = 1\nsafety_margin = 0.4",
            "etcd.request_timeout: got 0.5; expected a number of seconds below [ha] lease_ttl - "
            "safety_margin - keepalive_interval (1 s - 0.4 s - 0.333 s (unset: lease_ttl / 3) "
            f"= 0.267 s); {KEEPALIVE_ANSWER_FIX}",
        ),
        (
            "[ha]\nkeepalive_interval = 1.0",  # the default request_timeout no longer fits
            "etcd.request_timeout: got 0.5; expected a number of seconds below [ha] lease_ttl - "
            "safety_margin - keepalive_interval (2 s - 0.5 s - 1 s = 0.5 s); "
            + KEEPALIVE_ANSWER_FIX,
        ),
    ],
)
def test_keepalive_answer_must_fit_before_the_fence(
    tmp_path: Path, body: str, problem: str
) -> None:
    assert problems_for(tmp_path, f'[node]\nname = "a"\n{body}\n') == [problem]


def test_keepalive_answer_just_before_the_fence_is_fine(tmp_path: Path) -> None:
    text = '[node]\nname = "a"\n[etcd]\nrequest_timeout = 0.83\n'
    config = load(write(tmp_path, text))
    timing = config.ha.timing()
    assert timing.keepalive_interval + config.etcd.request_timeout < timing.lease_deadline(0.0)


def test_keepalive_answer_rule_waits_for_valid_sections(tmp_path: Path) -> None:
    # an invalid [ha] is reported alone, not again through the rule that combines them
    problems = problems_for(
        tmp_path, '[node]\nname = "a"\n[etcd]\nrequest_timeout = 5\n[ha]\nlease_ttl = 0\n'
    )
    assert problems == ["ha.lease_ttl: got 0; expected a number >= 1 and <= 300"]


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    assert problems_for(tmp_path, '[node]\nname = "a"\n[proxy]\nlisten = \n') == [
        "invalid TOML at line 4, column 10: Invalid value"
    ]


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, '[node]\nname = "a"\nname = "b"\n')
    assert len(problems) == 1
    assert problems[0].startswith("invalid TOML at line 3, column ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.path == str(path)
    assert info.value.problems == ["file not found"]
    assert str(info.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.problems == ["is a directory, not a file"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nname = "\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == ["not UTF-8 text (bad byte at offset 15)"]


# --- secrets ---------------------------------------------------------------------------------

SECRET = "correct-horse-battery"


class Vault(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    user: str = Field(min_length=1)
    password: SecretStr = Field(min_length=30)
    tokens: list[SecretStr] = []


class SecretConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    vault: Vault


def secret_problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text, "secret.toml")
    with pytest.raises(ConfigError) as info:
        load_model(path, SecretConfig)
    error = info.value
    assert error.__cause__ is None
    assert error.__suppress_context__  # the ValidationError (with raw input) is not shown
    assert SECRET not in str(error)
    assert SECRET not in repr(error.args)
    return error.problems


def test_secret_never_in_error_messages(tmp_path: Path) -> None:
    problems = secret_problems(
        tmp_path,
        f'[vault]\nuser = 7\npassword = "{SECRET}"\ntokens = ["{SECRET}", 5]\n',
    )
    assert problems == [
        "vault.user: got 7; expected a string",  # non-secret values are still shown
        "vault.password: got <redacted>; expected a value of length at least 30",
        "vault.tokens.1: got <redacted>; expected a string",
    ]


def test_secret_of_wrong_type_is_redacted(tmp_path: Path) -> None:
    assert secret_problems(tmp_path, f'[vault]\nuser = "u"\npassword = {len(SECRET)}\n') == [
        "vault.password: got <redacted>; expected a string"
    ]


def test_section_holding_a_secret_is_redacted(tmp_path: Path) -> None:
    assert secret_problems(tmp_path, f'vault = "{SECRET}"\n') == [
        "vault: got <redacted>; expected a table"
    ]


def test_format_problems_works_for_any_model() -> None:
    with pytest.raises(ValidationError) as info:
        SecretConfig.model_validate({"vault": {"user": "", "password": SECRET, "x": SECRET}})
    problems = format_problems(SecretConfig, info.value)
    assert problems == [
        "vault.user: got ''; expected a string of length at least 1",
        "vault.password: got <redacted>; expected a value of length at least 30",
        "vault.x: unknown key; allowed keys in [vault]: password, tokens, user",
    ]


def test_render_redacts_secrets() -> None:
    config = SecretConfig(
        vault=Vault(user="admin", password=SecretStr(SECRET * 2), tokens=[SecretStr(SECRET)])
    )
    text = render(config)
    assert SECRET not in text
    assert tomllib.loads(text) == {
        "vault": {"user": "admin", "password": "<redacted>", "tokens": ["<redacted>"]}
    }


# --- check-config ----------------------------------------------------------------------------


def test_cli_check_config_prints_effective_config() -> None:
    result = CliRunner().invoke(main, ["check-config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == DEFAULT_RENDER
    assert result.stderr == ""


def test_cli_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, 'bogus = 1\n[node]\nname = "a"\n[proxy]\nlisten = "localhost"\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {path} is invalid:\n"
        "  - proxy.listen: got 'localhost'; expected HOST:PORT with port 1..65535; "
        "no ':PORT' given\n"
        "  - bogus: unknown key; allowed keys at top level: "
        "daemon, etcd, ha, health, keys, node, proxy, replication\n"
    )


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"error: {path} is invalid:\n  - file not found\n"


def test_cli_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"haproxy-ln, version {__version__}\n"


# --- [daemon] --------------------------------------------------------------------------------


def daemon_problems(tmp_path: Path, body: str) -> list[str]:
    return problems_for(tmp_path, f'[node]\nname = "a"\n[daemon]\n{body}\n')


def test_example_mentions_every_daemon_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in DaemonConfig.model_fields:
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key


def test_daemon_sections_of_each_mode_round_trip(tmp_path: Path) -> None:
    child = (
        '[node]\nname = "a"\n[daemon]\nmode = "child"\n'
        'command = ["lightningd", "--conf=/etc/lightning/config"]\n'
        'probe = "tcp"\nprobe_address = "127.0.0.1:9735"\nstart_timeout = 5.0\n'
        "probe_interval = 0.1\nprobe_timeout = 1.0\n"
    )
    command = (
        '[node]\nname = "a"\n[daemon]\nmode = "command"\n'
        'start = ["systemctl", "start", "lnd"]\nstop = ["systemctl", "stop", "lnd"]\n'
        'kill = ["systemctl", "kill", "--signal=SIGKILL", "lnd"]\n'
        'status = ["systemctl", "is-active", "--quiet", "lnd"]\n'
        'probe = "lnd"\nprobe_address = "127.0.0.1:10009"\n'
        'probe_tls_cert = "/var/lib/lnd/tls.cert"\n'
    )
    for text in (child, command):
        config = load(write(tmp_path, text))
        assert load(write(tmp_path, render(config), "again.toml")) == config
    daemon = load(write(tmp_path, child)).daemon
    assert daemon.command == ("lightningd", "--conf=/etc/lightning/config")
    assert daemon.probe_address == HostPort("127.0.0.1", 9735)
    hash(daemon)  # argv lists become tuples: the section stays hashable


def test_daemon_child_mode_without_command_says_what_to_set(tmp_path: Path) -> None:
    assert daemon_problems(tmp_path, 'mode = "child"') == [
        "daemon.command: missing; required (the daemon's program and arguments; required "
        'when mode = "child", e.g. ["lightningd", "--conf=/etc/lightning/config"])'
    ]


def test_daemon_command_mode_needs_start_stop_and_kill(tmp_path: Path) -> None:
    problems = daemon_problems(tmp_path, 'mode = "command"\nstart = ["systemctl", "start", "x"]')
    assert [p.partition(":")[0] for p in problems] == ["daemon.stop", "daemon.kill"]
    assert all('required when mode = "command"' in p for p in problems)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            'mode = "child"\ncommand = ["x"]\nstop = ["systemctl", "stop", "x"]',
            "daemon.stop: got ['systemctl', 'stop', 'x']; expected no stop: it is used only "
            'when mode = "command"; mode is "child"',
        ),
        (
            'command = ["x"]',
            "daemon.command: got ['x']; expected no command: it is used only when "
            'mode = "child"; mode is "none"',
        ),
        (
            'mode = "child"\ncommand = []',
            "daemon.command: got []; expected a program and its arguments, "
            'e.g. ["lightningd"]; the program is empty',
        ),
        (
            'mode = "child"\ncommand = "lightningd"',
            "daemon.command: got 'lightningd'; expected an array",
        ),
        (
            'probe = "tcp"',
            "daemon.probe_address: missing; required (HOST:PORT the daemon listens on once "
            'ready (lnd: its gRPC interface); required when probe = "tcp" or "lnd")',
        ),
        (
            'probe = "command"\nprobe_command = ["true"]\nprobe_address = "127.0.0.1:1"',
            "daemon.probe_address: got '127.0.0.1:1'; expected no probe_address: it is used "
            'only when probe = "tcp" or "lnd"; probe is "command"',
        ),
        (
            'probe = "lnd"\nprobe_address = "127.0.0.1:10009"\nprobe_tls_cert = "tls.cert"',
            "daemon.probe_tls_cert: got 'tls.cert'; expected an absolute path",
        ),
        (
            "start_timeout = 2.0\nprobe_interval = 2.0\nprobe_timeout = 1.0",
            "daemon.probe_interval: got 2.0; expected less than start_timeout (2.0); "
            "a probe must fit in the time a start may take",
        ),
        (
            "start_timeout = 4.0",  # the default probe_timeout is 5 s
            "daemon.probe_timeout: got 5.0; expected less than start_timeout (4.0); "
            "a probe must fit in the time a start may take",
        ),
        (
            'mode = "systemd"',
            "daemon.mode: got 'systemd'; expected one of 'none', 'child' or 'command'",
        ),
    ],
)
def test_daemon_problems(tmp_path: Path, body: str, problem: str) -> None:
    assert daemon_problems(tmp_path, body) == [problem]


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("?sslmode=sometimes", "sslmode 'sometimes' is not one of disable, allow, prefer"),
        ("?ssl=true", "unknown parameter 'ssl': the URL may set sslmode, sslrootcert"),
    ],
)
def test_bad_replica_url_parameters(tmp_path: Path, query: str, why: str) -> None:
    (problem,) = problems_for(
        tmp_path,
        f'[node]\nname = "a"\n[replication]\nreplica = "postgresql://r@10.0.0.2/db{query}"\n',
    )
    assert problem.startswith("replication.replica: got ") and why in problem, problem
