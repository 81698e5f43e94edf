"""Value format: Django/pymemcache compatible, compression, signatures, corrupt items."""

import decimal
import pickle
import zlib

import pytest
from pymemcache.serde import CompressedSerde, pickle_serde

from djmemcache.serializer import (
    FLAG_SIGNED,
    CorruptValue,
    JSONFormat,
    PickleFormat,
    SerdeFormat,
    Serializer,
)

VALUES = [b"raw bytes", "text ✓", 42, -7, 2**70, True, 1.5, None, {"a": [1, 2]}, (1, "x")]


@pytest.mark.parametrize("value", VALUES)
def test_pickle_format_writes_exactly_what_djangos_pymemcache_backend_writes(value):
    data, flags = Serializer().dumps(":1:k", value)
    theirs, their_flags = pickle_serde.serialize(":1:k", value)
    assert flags == their_flags
    assert data == (theirs.encode() if isinstance(theirs, str) else theirs)
    assert Serializer().loads(":1:k", data, flags) == value
    assert pickle_serde.deserialize(":1:k", data, flags) == value


def test_integers_are_stored_as_digits_so_incr_works():
    assert Serializer().dumps("k", 12) == (b"12", 2)


def test_json_format_round_trip_and_refuses_pickles():
    s = Serializer(JSONFormat())
    for value in ({"a": [1, "b"]}, [1, 2], "s", 3, b"b", None, True):
        data, flags = s.dumps("k", value)
        assert s.loads("k", data, flags) == value
    pickled = Serializer().dumps("k", {"a": 1})
    with pytest.raises(CorruptValue, match="never unpickles"):
        s.loads("k", *pickled)
    with pytest.raises(TypeError, match="json"):
        s.dumps("k", object())


def test_custom_serde_object():
    s = Serializer(SerdeFormat(pickle_serde))
    data, flags = s.dumps("k", {"x": 1})
    assert s.loads("k", data, flags) == {"x": 1}


def test_compression_above_the_threshold_is_readable_by_pymemcache():
    s = Serializer(compress_min_length=100)
    big = "x" * 5000
    data, flags = s.dumps("k", big)
    assert flags & 8 and len(data) < 200
    assert s.loads("k", data, flags) == big
    assert CompressedSerde().deserialize("k", data, flags) == big
    small = s.dumps("k", "small")
    assert small == (b"small", 16)


def test_compressing_serializer_reads_old_uncompressed_items():
    old = Serializer().dumps("k", {"v": "y" * 1000})
    assert Serializer(compress_min_length=10).loads("k", *old) == {"v": "y" * 1000}


def test_incompressible_values_are_stored_plain():
    import os

    noise = os.urandom(4000)
    assert Serializer(compress_min_length=10).dumps("k", noise) == (noise, 0)


def test_zstd_compression_round_trip():
    pytest.importorskip("zstandard")
    s = Serializer(compress_min_length=100, compressor="zstd")
    data, flags = s.dumps("k", ["z"] * 1000)
    assert flags & 64 and s.loads("k", data, flags) == ["z"] * 1000


@pytest.mark.parametrize("data, flags", [
    (b"anything", 1 << 12),                      # unknown flags
    (b"\x80\x05garbage", 1),                     # corrupt pickle
    (zlib.compress(b"x" * 100)[:10], 8 | 16),    # truncated compressed text
    (b"\xff\xfe", 16),                           # bad UTF-8
    (b"12x", 2),                                 # not an integer
    (pickle.dumps(decimal.Decimal("1.5")).replace(b"1.5", b"1.x"), 1),  # InvalidOperation
])
def test_corrupt_items_raise_corrupt_value(data, flags):
    with pytest.raises(CorruptValue):
        Serializer(compress_min_length=10).loads("k", data, flags)


@pytest.mark.parametrize("serializer", [
    Serializer(), Serializer(compress_min_length=10), Serializer(JSONFormat()),
    Serializer(signing_keys=["s3cret"]),
], ids=["pickle", "compressing", "json", "signed"])
def test_loads_many_decodes_what_loads_decodes_and_sets_corrupt_items_apart(serializer):
    items = {"k%d" % i: serializer.dumps("k%d" % i, value) for i, value in enumerate(VALUES[:5])}
    items["bad pickle"] = (b"\x80\x05garbage", 1)
    items["bad text"] = (b"\xff\xfe", 16)
    items["unknown flags"] = (b"x", 1 << 12)
    values, corrupt = serializer.loads_many(items)
    assert values == {key: serializer.loads(key, *item) for key, item in items.items()
                      if key.startswith("k")}
    assert sorted(key for key, _ in corrupt) == ["bad pickle", "bad text", "unknown flags"]
    assert all(isinstance(exc, CorruptValue) for _, exc in corrupt)


def test_signed_values_round_trip_and_rotate_keys():
    old = Serializer(signing_keys=["old-secret"])
    new = Serializer(signing_keys=["new-secret", "old-secret"])
    data, flags = old.dumps("k", {"v": 1})
    assert flags & FLAG_SIGNED
    assert new.loads("k", data, flags) == {"v": 1}  # fallback key still verifies
    with pytest.raises(CorruptValue, match="bad signature"):
        Serializer(signing_keys=["other"]).loads("k", data, flags)


def test_signature_covers_key_flags_and_data():
    s = Serializer(signing_keys=["secret"])
    data, flags = s.dumps("k", "value")
    with pytest.raises(CorruptValue):
        s.loads("other-key", data, flags)
    with pytest.raises(CorruptValue):
        s.loads("k", data[:-1] + b"X", flags)
    with pytest.raises(CorruptValue):
        s.loads("k", data, flags ^ 16)


def test_unsigned_item_is_refused_when_signing():
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled a forged payload",))

    forged = pickle.dumps(Boom())
    s = Serializer(signing_keys=["secret"])
    for flags in (1, 1 | FLAG_SIGNED):
        with pytest.raises(CorruptValue):
            s.loads("k", forged, flags)
        with pytest.raises(CorruptValue):
            s.loads("k", b"\0" * 32 + forged, flags)


def test_formats_are_small_classes_with_the_same_interface():
    for fmt in (PickleFormat(), JSONFormat()):
        assert fmt.loads(*fmt.dumps("v")) == "v"


class _CountsUnpickling:
    unpickled = 0

    def __init__(self):
        self.state = "set"

    def __setstate__(self, state):
        type(self).unpickled += 1
        self.__dict__.update(state)


def test_loads_many_decodes_each_item_once_whatever_the_others_hold():
    """A compressed or corrupt item next to pickled ones sends only itself
    through the full path: nothing is unpickled twice (unpickling can run code)."""
    serializer = Serializer(compress_min_length=200)
    items = {"a": serializer.dumps("a", _CountsUnpickling()), "z": serializer.dumps("z", "y" * 1000),
             "bad": (b"\x80\x05garbage", 1)}
    assert items["z"][1] & 8  # compressed
    _CountsUnpickling.unpickled = 0
    values, corrupt = serializer.loads_many(items)
    assert _CountsUnpickling.unpickled == 1
    assert values["z"] == "y" * 1000 and [key for key, _ in corrupt] == ["bad"]


class _RaisesOnUnpickling:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("not a decoding error: the caller's code")


@pytest.fixture(params=["c", "python"])
def loop(request, monkeypatch):
    """loads_many's loop in C (``_speedups.decode_many``) and in Python."""
    from djmemcache import serializer as serializer_module

    if request.param == "python":
        monkeypatch.setattr(serializer_module, "_decode_many", None)
    elif serializer_module._decode_many is None:
        pytest.skip("djmemcache._speedups is not built")
    return request.param


def test_loads_many_loop_in_c_or_python_names_values_and_sets_corrupt_items_apart_alike(loop):
    serializer = Serializer(compress_min_length=200)
    items = {"k%d" % i: serializer.dumps("k%d" % i, value) for i, value in enumerate(VALUES)}
    items["long"] = serializer.dumps("long", "z" * 1000)  # compressed: through loads()
    items["bad pickle"] = (b"\x80\x05garbage", 1)
    items["bad text"] = (b"\xff\xfe", 16)
    items["bad int"] = (b"12x", 2)
    items["unknown flags"] = (b"x", 1 << 12)
    names = {key: ("name", key) for key in items}
    values, corrupt = serializer.loads_many(items, names)
    assert values == {("name", key): serializer.loads(key, *item) for key, item in items.items()
                      if not key.startswith(("bad", "unknown"))}
    assert sorted(key for key, _ in corrupt) == ["bad int", "bad pickle", "bad text", "unknown flags"]
    assert all(isinstance(exc, CorruptValue) for _, exc in corrupt)
    assert serializer.loads_many(items)[0] == {name[1]: value for name, value in values.items()}


def test_loads_many_raises_what_is_no_decoding_error_in_c_or_python(loop):
    """An unpickled class's own exception (or a signal handler's) is the
    caller's: raised, not turned into a corrupt item."""
    serializer = Serializer()
    items = {"a": serializer.dumps("a", 1), "b": (pickle.dumps(_RaisesOnUnpickling()), 1)}
    with pytest.raises(RuntimeError, match="the caller's code"):
        serializer.loads_many(items)


class _RaisesCorruptValue:
    def __reduce__(self):
        return (_corrupt, ())


def _corrupt():
    raise CorruptValue("inner")


def test_loads_many_keeps_a_corrupt_value_raised_inside_unpickling_as_it_is(loop):
    serializer = Serializer()
    values, corrupt = serializer.loads_many({"a": (pickle.dumps(_RaisesCorruptValue()), 1)})
    assert values == {} and [(key, str(exc)) for key, exc in corrupt] == [("a", "inner")]
