"""Options: parsed once, 0.13 names kept verbatim, every mistake named."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from djmemcache.options import Options, parse_options

from helpers import OLD_013_OPTIONS


def test_djmemcache_013_example_options_work_verbatim():
    options = parse_options("", OLD_013_OPTIONS)
    assert options.max_pool_size == 100
    assert options.key_prefix == b"uuboard_prefix"
    assert options.timeout == 30.0
    assert options.connect_timeout == 30.0
    assert options.ignore_exc is True
    assert options.use_pooling is True
    assert [s.spec for s in options.servers] == ["127.0.0.1:11211"]


def test_option_names_are_case_insensitive_like_013():
    lower = parse_options("a:1", {k.lower(): v for k, v in OLD_013_OPTIONS.items()})
    assert lower == parse_options("a:1", OLD_013_OPTIONS)


def test_defaults():
    options = parse_options("127.0.0.1:11211")
    assert options.max_pool_size == 2**31
    assert options.ignore_exc is True and options.use_pooling is True and options.no_delay is True
    assert options.blacklist_time == 60.0 and options.distribution == "consistent"
    assert options.timeout is None and options.effective_connect_timeout is None


def test_connect_timeout_defaults_to_socket_timeout():
    assert parse_options("a:1", {"TIMEOUT": 0.5}).effective_connect_timeout == 0.5
    assert parse_options("a:1", {"TIMEOUT": 0.5, "CONNECT_TIMEOUT": 2}).effective_connect_timeout == 2


def test_str_key_prefix_is_encoded():
    assert parse_options("a:1", {"KEY_PREFIX": "site1:"}).key_prefix == b"site1:"


def test_dead_timeout_of_pymemcache_maps_to_blacklist_time():
    assert parse_options("a:1", {"dead_timeout": 5}).blacklist_time == 5.0


def test_options_are_hashable_and_equal_for_equal_settings():
    a = parse_options(["a:1", "b:2"], {"TIMEOUT": 1})
    b = parse_options("a:1;b:2", {"timeout": 1.0})
    assert a == b and hash(a) == hash(b)
    assert a != parse_options(["a:1", "b:2"], {"TIMEOUT": 2})
    assert isinstance(a, Options)


@pytest.mark.parametrize("location, specs", [
    ("a:1;b:2", ["a:1", "b:2"]),
    ("a:1,b:2", ["a:1", "b:2"]),
    (["a:1", "b:2"], ["a:1", "b:2"]),
    ("unix:/run/mc.sock", ["unix:/run/mc.sock"]),
    ("[::1]:11211", ["[::1]:11211"]),
    ("", ["127.0.0.1:11211"]),
    (None, ["127.0.0.1:11211"]),
    ([], ["127.0.0.1:11211"]),
])
def test_location_forms(location, specs):
    assert [s.spec for s in parse_options(location).servers] == specs


@pytest.mark.parametrize("location, message", [
    ("a:notaport", "port is not a number"),
    ("a:70000", "port out of range"),
    ("::1:11211", "IPv6 addresses in brackets"),
    ("[::1:11211", "unclosed"),
    ("unix:relative.sock", "absolute"),
    (["a:1", "a:1"], "twice"),
    (12, "LOCATION must be"),
])
def test_bad_location_is_named(location, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse_options(location)


@pytest.mark.parametrize("name, value", [
    ("MAX_POOL_SIZE", 0),
    ("MAX_POOL_SIZE", "10"),
    ("MAX_POOL_SIZE", True),
    ("TIMEOUT", -1),
    ("TIMEOUT", 0),
    ("TIMEOUT", "1"),
    ("CONNECT_TIMEOUT", float("nan")),
    ("BLACKLIST_TIME", -5),
    ("POOL_TIMEOUT", "soon"),
    ("DISTRIBUTION", "ketama"),
    ("IGNORE_EXC", "yes"),
    ("USE_POOLING", 2),
    ("NO_DELAY", None),
    ("KEY_PREFIX", 12),
    ("KEY_PREFIX", b"has space"),
    ("KEY_PREFIX", "x" * 245),
    ("POOL_IDLE_TIMEOUT", -1),
    ("TIMEOUT", 10 ** 400),  # past a float's range
    ("STAMPEDE_WAIT", 10 ** 400),
])
def test_bad_value_error_names_the_option(name, value):
    with pytest.raises(ImproperlyConfigured) as info:
        parse_options("a:1", {name: value})
    assert repr(name) in str(info.value)


def test_unknown_option_lists_accepted_names():
    with pytest.raises(ImproperlyConfigured) as info:
        parse_options("a:1", {"MAX_POOLSIZE": 3})
    message = str(info.value)
    assert "'MAX_POOLSIZE'" in message and "MAX_POOL_SIZE" in message and "BLACKLIST_TIME" in message


@pytest.mark.parametrize("name", ["RETRY_ATTEMPTS", "retry_timeout", "HASHER", "DEFAULT_NOREPLY", "MAX_ENTRIES",
                                  "SOCKET_KEEPALIVE"])
def test_rejected_pymemcache_arguments_say_why(name):
    with pytest.raises(ImproperlyConfigured, match="not supported"):
        parse_options("a:1", {name: 1})


def test_none_timeouts_are_allowed():
    options = parse_options("a:1", {"TIMEOUT": None, "POOL_TIMEOUT": None})
    assert options.timeout is None and options.pool_timeout is None


def test_serializer_accepts_a_dotted_path_to_a_serde():
    from pymemcache.serde import PickleSerde

    options = parse_options("a:1", {"SERIALIZER": "pymemcache.serde.PickleSerde"})
    assert isinstance(options.serializer, PickleSerde)
    assert parse_options("a:1", {"serde": "json"}).serializer == "json"
    with pytest.raises(ImproperlyConfigured, match="SERIALIZER"):
        parse_options("a:1", {"SERIALIZER": "no.such.Serde"})


def test_tls_options_imply_tls_and_reject_unix_sockets(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    assert parse_options("a:1", {"TLS_CA_FILE": str(ca)}).tls is True
    assert parse_options("a:1", {"TLS_CA_FILE": ca}).tls_ca_file == str(ca)  # settings write BASE_DIR / "ca.pem"
    with pytest.raises(ImproperlyConfigured, match="unix"):
        parse_options("unix:/tmp/x.sock", {"TLS": True})
    with pytest.raises(ImproperlyConfigured, match="TLS_CA_FILE"):
        parse_options("a:1", {"TLS_CA_FILE": str(tmp_path / "missing.pem")})


def test_djangos_own_pymemcache_options_are_accepted():
    options = parse_options("a:1", {"allow_unicode_keys": True, "default_noreply": False, "no_delay": True,
                                    "use_pooling": True, "max_pool_size": 4, "ignore_exc": False,
                                    "connect_timeout": 1, "timeout": 1})
    assert options.max_pool_size == 4 and options.ignore_exc is False
