"""One reader for JSON that someone else wrote: request bodies, uploaded checkpoints' headers and
metadata. Importable without torch (and without pydantic: workers run where only PyTorch is).

`loads(data)` is `json.loads` that refuses, with the place (`loc`, a path of keys and indices) and why:
- nesting deeper than `max_depth` (json's C scanner stops a 100k-deep body at the recursion limit: a
  refusal, never a crash);
- `NaN`, `Infinity`, `-Infinity` (not JSON, though Python's reader takes them) and numbers too large for
  a float (`1e400` would parse as infinity): every number it gives back is finite;
- integers of more than `MAX_INT_DIGITS` digits;
- strings with a lone surrogate (`"\\ud800"` is valid JSON but no Unicode: no UTF-8 encoder or database takes it).

`safetensors_header(data, size)` reads a safetensors file's header (its first bytes `data`, `size`
bytes in all, when known) into checked parts: each tensor's dtype, shape and byte range, and the
string-to-string metadata; anything of another shape is a `JSONRefused` naming the entry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32                 # a job spec nests 4 deep; a checkpoint's metadata a few more
MAX_INT_DIGITS = 40            # an int64 has 19; more is no count or size that anything here takes


class JSONRefused(ValueError):
    """JSON that is not taken: `loc` (a tuple of keys and indices, () for the whole) and `msg`."""

    def __init__(self, msg: str, loc: tuple = ()):
        super().__init__(f"{'.'.join(map(str, loc)) or 'the document'}: {msg}" if loc else msg)
        self.msg, self.loc = msg, tuple(loc)


def _refuse_constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not a number JSON allows: every number must be finite")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONRefused(f"an integer of {len(text.lstrip('-'))} digits is larger than any this service takes "
                          f"(at most {MAX_INT_DIGITS} digits)")
    return int(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def unreadable(value: Any, max_depth: int = MAX_DEPTH, loc: tuple = ()) -> tuple[tuple, str] | None:
    """The place of the first value that JSON may spell but nothing downstream should take, and what it is:
    arrays and objects nested more than `max_depth` deep, a non-finite float (`1e400` parses as infinity),
    a string or key with a lone surrogate (`"\\ud800"`: no UTF-8, no database text). None when there is
    none. Dicts, lists and tuples are walked."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (loc, "a number too large for a float (it would be infinite): "
                                                       "every number must be finite")
    if isinstance(value, str):
        return (loc, "a string with a lone surrogate (\\ud800-\\udfff), which is no Unicode text") \
            if _SURROGATE.search(value) else None
    if isinstance(value, (dict, list, tuple)) and len(loc) >= max_depth:
        return loc, f"nested more than {max_depth} deep; at most {max_depth} levels of arrays and objects are read"
    if isinstance(value, dict):
        for k, v in value.items():
            if _SURROGATE.search(k):
                return (*loc, k.encode("utf-8", "backslashreplace").decode()), "a key with a lone surrogate"
            if (found := unreadable(v, max_depth, (*loc, k))) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := unreadable(v, max_depth, (*loc, i))) is not None:
                return found
    return None


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `data`; JSONRefused (deep, non-finite, huge integer, lone surrogate) or ValueError
    (not JSON). Parsed by json's C scanner (which refuses nesting past the interpreter's recursion limit
    with a RecursionError, refused here too), then walked once."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_int=_int)
    except RecursionError:
        raise JSONRefused(f"nested too deep; at most {max_depth} levels of arrays and objects are read") from None
    try:
        found = unreadable(value, max_depth)
    except RecursionError:                      # max_depth beyond the interpreter's recursion limit
        found = (), f"nested too deep; at most {max_depth} levels of arrays and objects are read"
    if found is not None:
        where, why = found
        raise JSONRefused(why, where)
    return value


# ---------------------------------------------------------------- safetensors headers

MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit
MAX_DIMS = 16


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    length: int                # the header's own length, after the 8 bytes that give it

    @property
    def file_size(self) -> int:
        """The size the header implies: 8 + header + the end of the last tensor's bytes."""
        return 8 + self.length + max((t.end for t in self.tensors.values()), default=0)


def _entry(name: str, raw: Any) -> TensorEntry:
    loc = ("tensors", name)
    if not isinstance(raw, dict):
        raise JSONRefused("a tensor's entry is an object of dtype, shape and data_offsets", loc)
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or not 1 <= len(dtype) <= 16:
        raise JSONRefused("dtype is a short string (F32, BOOL, ...)", (*loc, "dtype"))
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise JSONRefused(f"shape is a list of at most {MAX_DIMS} sizes, each an integer ≥ 0", (*loc, "shape"))
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise JSONRefused("data_offsets is [start, end], integers with 0 ≤ start ≤ end", (*loc, "data_offsets"))
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def safetensors_header(data: bytes, size: int | None = None) -> SafetensorsHeader:
    """The checked header of the safetensors file whose first bytes are `data` (the whole header must be
    in them); with `size`, the file's size must be the one the header implies. JSONRefused says what
    is wrong (loc: ("tensors", name, field) or ("metadata", key))."""
    if len(data) < 8:
        raise JSONRefused("not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise JSONRefused("not a safetensors file (its header length is out of range)")
    try:
        raw = loads(data[8:8 + n])
    except JSONRefused:
        raise
    except ValueError as e:           # UnicodeDecodeError included
        raise JSONRefused(f"not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(raw, dict):
        raise JSONRefused("not a safetensors file (its header is not a JSON object)")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise JSONRefused("__metadata__ is an object of strings", ("metadata",))
    header = SafetensorsHeader({k: _entry(k, v) for k, v in raw.items()}, meta, n)
    if size is not None and header.file_size != size:
        raise JSONRefused(f"a truncated or padded safetensors file: its header says {header.file_size} bytes, "
                          f"the file has {size}")
    return header
