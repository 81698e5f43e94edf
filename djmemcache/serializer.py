"""Values to bytes and back, in the format of Django's ``PyMemcacheCache``.

The flags are pymemcache's (``pymemcache.serde``), and so is the choice of
format per type: exact ``bytes`` as is, exact ``str`` as UTF-8, exact ``int``
as digits (so memcached's ``incr`` works on it), anything else pickled with
the highest protocol. Items written by Django's backend read back here and
the other way round.

Unlike pymemcache's serde, a value that cannot be decoded (unknown flags,
corrupt pickle, bad UTF-8) is reported as ``CorruptValue`` so the backend
can treat it as a miss, instead of returning ``None`` or raw bytes.
"""

import pickle

from pymemcache.serde import FLAG_BYTES, FLAG_INTEGER, FLAG_LONG, FLAG_PICKLE, FLAG_TEXT


class CorruptValue(ValueError):
    """An item in memcached that this serializer cannot decode."""


class PickleSerializer:
    """pymemcache's ``PickleSerde(pickle.HIGHEST_PROTOCOL)`` format."""

    protocol = pickle.HIGHEST_PROTOCOL

    def dumps(self, value):
        """Return ``(data, flags)``; raise ``pickle.PicklingError``/``TypeError`` on values
        that cannot be pickled, before anything is sent."""
        kind = type(value)
        if kind is bytes:
            return value, FLAG_BYTES
        if kind is str:
            return value.encode("utf-8"), FLAG_TEXT
        if kind is int:
            return b"%d" % value, FLAG_INTEGER
        return pickle.dumps(value, self.protocol), FLAG_PICKLE

    def loads(self, data, flags):
        try:
            if flags == FLAG_BYTES:
                return data
            if flags == FLAG_TEXT:
                return data.decode("utf-8")
            if flags == FLAG_INTEGER or flags == FLAG_LONG:
                return int(data)
            if flags == FLAG_PICKLE:
                return pickle.loads(data)
        except Exception as exc:
            raise CorruptValue("cannot decode item with flags %d: %r" % (flags, exc)) from exc
        raise CorruptValue("unknown flags %d" % flags)
