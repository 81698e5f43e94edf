"""Values to bytes and back: format, compression, signature.

Default format: Django's ``PyMemcacheCache``, i.e. pymemcache's flags
(``pymemcache.serde``) and its choice per type: exact ``bytes`` as is, exact
``str`` as UTF-8, exact ``int`` as digits (so memcached's ``incr`` works on
it), anything else pickled with the highest protocol. Items written by
Django's backend read back here and the other way round.

On top, optional and in this order when writing: compression
(``COMPRESS_MIN_LENGTH``; zlib sets pymemcache's ``FLAG_COMPRESSED``, so
pymemcache's ``CompressedSerde`` reads it too) and an HMAC signature
(``SIGN_VALUES``): a signed item whose signature is missing or wrong is never
decoded, so a forged pickle in memcached cannot run code. Exact ``int``s are
the exception: they stay plain digits with ``FLAG_INTEGER``, unsigned, since
memcached's ``incr``/``decr`` must read and rewrite them in place; such an
item is only ever parsed with ``int()``, never handed to the format.

Unlike pymemcache's serde, an item that cannot be decoded (unknown flags,
corrupt pickle or JSON, truncated compressed data, bad signature) raises
``CorruptValue`` so the backend treats it as a miss, instead of returning
``None`` or raw bytes.
"""

import hmac
import json
import pickle
import zlib

from pymemcache.serde import (
    FLAG_BYTES,
    FLAG_COMPRESSED,
    FLAG_INTEGER,
    FLAG_LONG,
    FLAG_PICKLE,
    FLAG_TEXT,
)

from djmemcache.connection import _load_speedups

# Flags of djmemcache's own, above pymemcache's (which end at 1 << 4).
FLAG_JSON = 1 << 5
FLAG_ZSTD = 1 << 6
FLAG_SIGNED = 1 << 7

_MAC_SIZE = 32  # HMAC-SHA256
_MAC_SALT = "djmemcache.serializer.signed-value"
_INCR_MAX = 2**64 - 1  # memcached's counters: unsigned 64-bit

#: A compressed item inflates to at most this many times MAX_VALUE_SIZE
#: (32 MB by default). A few hundred bytes of zlib, or a few of zstd, can
#: stand for gigabytes: whoever can write to memcached, or answer in its
#: place, must not choose how much memory a get takes. A larger value is
#: not compressed, so it is not stored either (it is over MAX_VALUE_SIZE).
INFLATE_FACTOR = 32


# What decoding a corrupt or hostile item raises (pickle raises nearly
# anything). Named, not ``Exception``: an exception raised meanwhile by the
# caller's own code (a signal handler's) must reach the caller, not become a miss.
_DECODING_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
    IndexError, KeyError, LookupError, ArithmeticError, RecursionError, MemoryError, zlib.error,
)


class CorruptValue(ValueError):
    """An item in memcached that this serializer cannot or must not decode."""


class PickleFormat:
    """pymemcache's ``PickleSerde(pickle.HIGHEST_PROTOCOL)`` format."""

    protocol = pickle.HIGHEST_PROTOCOL

    def dumps(self, value):
        kind = type(value)
        if kind is bytes:
            return value, FLAG_BYTES
        if kind is str:
            return value.encode("utf-8"), FLAG_TEXT
        if kind is int:
            return b"%d" % value, FLAG_INTEGER
        return pickle.dumps(value, self.protocol), FLAG_PICKLE

    def loads(self, data, flags):
        if flags == FLAG_BYTES:
            return data
        if flags == FLAG_TEXT:
            return data.decode("utf-8")
        if flags == FLAG_INTEGER or flags == FLAG_LONG:
            return int(data)
        if flags == FLAG_PICKLE:
            return pickle.loads(data)
        raise CorruptValue("unknown flags %d" % flags)


#: ``PickleFormat.loads`` by flags, for unsigned items of the default format
#: (``Serializer.loads`` and ``loads_many``); other flags take the full path.
_decode_many = getattr(_load_speedups(), "decode_many", None)

_PLAIN_DECODERS = {FLAG_PICKLE: pickle.loads, FLAG_TEXT: bytes.decode, FLAG_BYTES: bytes,
                   FLAG_INTEGER: int, FLAG_LONG: int}


class JSONFormat(PickleFormat):
    """No pickle at all: what is not bytes, str or int is JSON; pickled items are refused."""

    def dumps(self, value):
        kind = type(value)
        if kind is bytes or kind is str or kind is int:
            return super().dumps(value)
        try:
            return json.dumps(value, separators=(",", ":")).encode("utf-8"), FLAG_JSON
        except (TypeError, ValueError) as exc:
            raise TypeError("SERIALIZER='json' cannot store %r: %s" % (type(value).__name__, exc)) from exc

    def loads(self, data, flags):
        if flags == FLAG_JSON:
            return json.loads(data)
        if flags == FLAG_PICKLE:
            raise CorruptValue("a pickled item, and SERIALIZER='json' never unpickles")
        return super().loads(data, flags)


class SerdeFormat:
    """A pymemcache-style serde object (``serialize``/``deserialize``)."""

    def __init__(self, serde):
        self.serde = serde

    def dumps(self, value):
        data, flags = self.serde.serialize(None, value)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if flags & (FLAG_COMPRESSED | FLAG_ZSTD | FLAG_SIGNED):
            raise ValueError("the SERIALIZER's flags %d collide with djmemcache's own" % flags)
        return data, flags

    def loads(self, data, flags):
        return self.serde.deserialize(None, data, flags)


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


class Serializer:
    """Turns values into ``(data, flags)`` and back, for one configuration."""

    def __init__(self, format=None, compress_min_length=0, compressor="zlib",
                 signing_keys=None, max_inflated=INFLATE_FACTOR * 1024 * 1024):
        self.format = format or PickleFormat()
        self.compress_min_length = compress_min_length
        self.max_inflated = max_inflated
        self.compressor = compressor
        if compressor == "zstd":
            zstandard = _zstd()
            self._zstd_compress = zstandard.ZstdCompressor().compress
        # The first key signs; every key verifies (SECRET_KEY_FALLBACKS rotation).
        self.signing_keys = tuple(signing_keys or ())
        # Unsigned items of the default format: decoded straight from their flags.
        self._plain = not self.signing_keys and type(self.format) is PickleFormat

    def dumps(self, key, value):
        """Return ``(data, flags)``; raise ``TypeError``/``pickle.PicklingError``
        for values that cannot be stored, before anything is sent."""
        if self.signing_keys and type(value) is int and 0 <= value <= _INCR_MAX:
            # Unsigned, uncompressed digits, whatever the format, so that
            # incr/decr work (memcached cannot keep a signature valid). Safe:
            # an unsigned item is accepted only with exactly FLAG_INTEGER and
            # read with int() (``_verified_int``), which runs no code; at worst
            # whoever can write to memcached sets a counter, as incr can.
            return b"%d" % value, FLAG_INTEGER
        data, flags = self.format.dumps(value)
        if self.compress_min_length and self.compress_min_length <= len(data) <= self.max_inflated:
            if self.compressor == "zstd":
                packed, flag = self._zstd_compress(data), FLAG_ZSTD
            else:
                packed, flag = zlib.compress(data), FLAG_COMPRESSED
            if len(packed) < len(data):  # incompressible data stays as it is
                data, flags = packed, flags | flag
        if self.signing_keys:
            flags |= FLAG_SIGNED
            data = self._mac(self.signing_keys[0], key, flags, data) + data
        return data, flags

    def loads(self, key, data, flags):
        """The value of an item, or ``CorruptValue``."""
        if self._plain:
            decode = _PLAIN_DECODERS.get(flags)
            if decode is not None:  # else compressed, or flags of no format: below
                try:
                    return decode(data)
                except _DECODING_ERRORS as exc:
                    raise _undecodable(flags, exc) from exc
        try:
            if self.signing_keys:
                if flags == FLAG_INTEGER:
                    return _verified_int(data)
                data = self._verified(key, data, flags)
                flags &= ~FLAG_SIGNED
            if flags & FLAG_COMPRESSED:
                data = _inflate(data, self.max_inflated)
                flags &= ~FLAG_COMPRESSED
            elif flags & FLAG_ZSTD:
                zstandard = _zstd()
                if zstandard is None:
                    raise CorruptValue("zstd-compressed item, and zstandard is not installed")
                try:
                    # The frame declares its size: refused before anything is allocated.
                    if zstandard.frame_content_size(data) > self.max_inflated:
                        raise CorruptValue("zstd item inflates past %d bytes" % self.max_inflated)
                    data = zstandard.ZstdDecompressor().decompress(data, max_output_size=self.max_inflated)
                except zstandard.ZstdError as exc:
                    raise CorruptValue("corrupt zstd data: %s" % exc) from exc
                flags &= ~FLAG_ZSTD
            return self.format.loads(data, flags)
        except CorruptValue:
            raise
        except _DECODING_ERRORS as exc:
            raise _undecodable(flags, exc) from exc

    def loads_many(self, items, names=None):
        """``({name: value}, [(key, CorruptValue)])`` of ``{key: (data, flags)}``,
        where a value's name is ``names[key]`` (or its key without ``names``).

        ``loads`` for a multi-key reply: unsigned items of the default
        format are decoded from their flags alone, in one C loop when
        ``_speedups`` is built (``decode_many``); everything else goes
        through ``loads``. Each item is decoded once, whatever the others hold.
        """
        rest = items
        if self._plain and _decode_many is not None:
            values, failed, rest = _decode_many(items, _PLAIN_DECODERS, _DECODING_ERRORS, names)
            # A CorruptValue (a ValueError) raised inside unpickling stays as
            # it is, as the Python loop below keeps it.
            corrupt = [(key, exc if isinstance(exc, CorruptValue) else _undecodable(flags, exc))
                       for key, flags, exc in failed]
            if not rest:
                return values, corrupt
        else:
            values, corrupt = {}, []
        decoders = _PLAIN_DECODERS if self._plain else {}
        loads = self.loads
        for key in rest:
            data, flags = items[key]
            try:
                decode = decoders.get(flags)
                value = loads(key, data, flags) if decode is None else decode(data)
            except CorruptValue as exc:
                corrupt.append((key, exc))
            except _DECODING_ERRORS as exc:
                corrupt.append((key, _undecodable(flags, exc)))
            else:
                values[key if names is None else names[key]] = value
        return values, corrupt

    def _mac(self, secret, key, flags, data):
        # Key and flags are signed too: a valid item copied under another key,
        # or with other flags, is refused as well.
        from django.utils.crypto import salted_hmac

        message = b"%s\0%d\0%s" % (key.encode("utf-8"), flags, data)
        return salted_hmac(_MAC_SALT, message, secret=secret, algorithm="sha256").digest()

    def _verified(self, key, data, flags):
        if not flags & FLAG_SIGNED or len(data) < _MAC_SIZE:
            raise CorruptValue("unsigned item, and SIGN_VALUES is on")
        mac, payload = data[:_MAC_SIZE], data[_MAC_SIZE:]
        for secret in self.signing_keys:
            if hmac.compare_digest(mac, self._mac(secret, key, flags, payload)):
                return payload
        raise CorruptValue("bad signature")


def serializer_for(options):
    """The ``Serializer`` an ``Options`` asks for; signing keys come from
    Django's settings unless OPTIONS gives ``SIGNING_KEY``."""
    formats = {"pickle": PickleFormat, "json": JSONFormat}
    if options.serializer in formats:
        fmt = formats[options.serializer]()
    else:
        fmt = SerdeFormat(options.serializer)
    keys = ()
    if options.sign_values:
        if options.signing_key:
            keys = (options.signing_key,)
        else:
            from django.conf import settings

            keys = (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()))
    return Serializer(fmt, options.compress_min_length, options.compressor, keys,
                      options.max_value_size * INFLATE_FACTOR)


def _undecodable(flags, exc):
    return CorruptValue("cannot decode item with flags %d: %r" % (flags, exc))


def _verified_int(data):
    """The value of an unsigned integer item under SIGN_VALUES, parsed by
    ``int()`` alone: ASCII digits, at most 20 (a 64-bit counter), then the
    spaces memcached pads with when ``decr`` shortens a value in place."""
    digits = data.rstrip(b" ")
    if not digits.isdigit() or len(digits) > 20:
        raise CorruptValue("an unsigned integer item that is not a counter")
    return int(digits)


def _inflate(data, limit):
    """zlib ``data`` inflated, or ``CorruptValue`` past ``limit`` bytes or when truncated."""
    inflater = zlib.decompressobj()
    data = inflater.decompress(data, limit + 1)
    if len(data) > limit:
        raise CorruptValue("zlib item inflates past %d bytes" % limit)
    if not inflater.eof:
        raise CorruptValue("truncated zlib data")
    return data
