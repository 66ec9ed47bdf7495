"""State dicts on disk: .npz (NumPy's) and .safetensors, read and written
with NumPy alone.

safetensors, as its specification describes it: an 8-byte little-endian
header length n, n bytes of JSON mapping each name to its dtype, shape and
[begin, end) byte offsets into the data that follows (plus an optional
"__metadata__" of strings), then the data, little-endian, C order.

.npz, as np.savez writes it: a zip archive holding one .npy file per array,
named after the array plus ".npy".

The readers check a file completely before trusting it: a malformed file
raises ValueError naming the file (and the tensor, when one is at fault),
never a KeyError or TypeError from deep inside. The writers check the whole
state dict before opening the file, so what they refuse leaves nothing on
disk, and what they write reads back with the same names, dtypes, shapes and
values.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    _Path = str | os.PathLike[str]

__all__ = ["load_safetensors", "save_safetensors", "load_state_dict", "save_state_dict"]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(t).newbyteorder("<"): name for name, t in _SAFETENSORS_DTYPES.items()}
# What each dtype attnkit reads takes: (bytes per value in the file, bytes per
# value once loaded); they differ for bfloat16 alone, widened to float32
_SIZES = {name: (np.dtype(t).itemsize,) * 2 for name, t in _SAFETENSORS_DTYPES.items()}
_SIZES["BF16"] = (2, 4)
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
# The reference reader (the safetensors package) refuses longer headers; a
# header that long is an attack or an accident, never a checkpoint
_MAX_HEADER_LENGTH = 100_000_000
# NumPy refuses a shape whose non-zero dimensions multiply past this many
# bytes, even when a zero dimension leaves the array empty
_NUMPY_MAX_BYTES = 2**63 - 1


# ---------------------------------------------------------------------------
# safetensors

def load_safetensors(path: _Path, *, max_bytes: int | None = None) -> dict[str, npt.NDArray[Any]]:
    """name -> array for every tensor in a .safetensors file. bfloat16 (which
    NumPy lacks) is widened to float32 exactly.

    The whole header is checked before any data is read, as the format's
    reference reader (the safetensors package) checks it: the header is a
    UTF-8 JSON object whose entries hold a dtype, a shape of non-negative
    ints and [begin, end] data_offsets that fit the dtype and shape; sorted
    by offset, the tensors cover the data with no gap, no overlap and
    nothing after the last; "__metadata__", if present, maps strings to
    strings (or is null). A little more strictly than that reader, a key
    given twice in one object is refused too (JSON would keep the last
    silently). Fields of an entry besides those three are ignored, as there. A file that fails raises ValueError naming the file and,
    where one is at fault, the tensor.

    max_bytes: if given, a file whose arrays would take more than this many
    bytes once loaded raises ValueError before any of them is read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        if n > _MAX_HEADER_LENGTH:
            raise ValueError(f"{path}: header length {n} is over the {_MAX_HEADER_LENGTH} "
                             "bytes safetensors allows")
        header = _parse_header(f.read(n), path)
        entries = _check_header(header, path, data_size=size - 8 - n)
        loaded_size = sum(math.prod(shape) * _SIZES[dtype][1] for dtype, shape, _, _ in entries.values())
        _check_max_bytes(path, loaded_size, max_bytes)
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(8 + n + begin)
            chunk = f.read(end - begin)
            if len(chunk) != end - begin:   # the file shrank while we read it
                raise ValueError(f"{path}: the file ends inside tensor {name!r}")
            if dtype == "BF16":
                array = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(chunk, np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
            tensors[name] = array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=True)
    return tensors


def _parse_header(raw, path):
    """The header's JSON, decoded strictly."""
    try:
        # bytes would let json guess UTF-16 or UTF-32; the format says UTF-8.
        # JSON has no NaN or Infinity, and a key given twice would let the
        # last silently win, so both are refused rather than guessed at.
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_duplicates,
                          parse_constant=_refuse_constant)
    except RecursionError:
        # "[[[[..." nested deeper than Python's stack; nothing valid nests past 3
        raise ValueError(f"{path}: not a safetensors file (its header nests too deeply)") from None
    except _DuplicateKey as e:
        raise ValueError(f"{path}: not a safetensors file (its header has the key {e.key!r} "
                         "twice in one object)") from None
    except ValueError as e:    # UnicodeDecodeError is one too
        raise ValueError(f"{path}: not a safetensors file (its header is not UTF-8 JSON: {e})") from None


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(f"the key {key!r} appears twice")
        self.key = key


def _object_without_duplicates(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def _check_header(header, path, data_size):
    """name -> (dtype, shape, begin, end) for each tensor of a parsed header,
    in the header's order, once every check of the format has passed."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is a JSON "
                         f"{type(header).__name__}, not an object)")
    metadata = header.get("__metadata__")
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(_is_text(k) and _is_text(v) for k, v in metadata.items())):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, not {reprlib.repr(metadata)}")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not _is_text(name):
            raise ValueError(f"{where}: the name is not valid Unicode (a lone surrogate)")
        if not isinstance(entry, dict) or not _ENTRY_KEYS <= entry.keys():
            raise ValueError(f"{where}: expected an object with dtype, shape and "
                             f"data_offsets, not {reprlib.repr(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise ValueError(f"{where}: dtype must be a string such as \"F32\", not {reprlib.repr(dtype)}")
        if dtype not in _SIZES:
            raise ValueError(f"{where} has dtype {dtype}, which attnkit does not read "
                             f"(it reads {', '.join(sorted(_SIZES))})")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ValueError(f"{where}: shape must be a list of non-negative ints, not {reprlib.repr(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                             f"not {reprlib.repr(offsets)}")
        begin, end = offsets
        shape = tuple(shape)
        # Python ints: a product of huge dimensions must not wrap around
        nbytes = math.prod(shape) * _SIZES[dtype][0]
        if end - begin != nbytes:
            raise ValueError(f"{where}: dtype {dtype} and shape {shape} take {nbytes} bytes, but "
                             f"data_offsets [{begin}, {end}] hold {end - begin}")
        if math.prod(d for d in shape if d) * _SIZES[dtype][1] > _NUMPY_MAX_BYTES:
            raise ValueError(f"{where}: shape {shape} is too large for NumPy")
        if end > data_size:
            raise ValueError(f"{where} lies outside the file (data_offsets [{begin}, {end}], "
                             f"but the data is {data_size} bytes)")
        entries[name] = (dtype, shape, begin, end)
    # Sorted by offset, the tensors must tile the data exactly: a gap or an
    # overlap means the header and the data disagree about what is where.
    # Empty tensors sort before a tensor at their offset, so they may share it.
    covered = 0
    for begin, end, name in sorted((begin, end, name) for name, (_, _, begin, end) in entries.items()):
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else "leaves a gap before it"
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, but the "
                             f"tensors before it end at byte {covered} (it {problem})")
        covered = end
    if covered != data_size:
        raise ValueError(f"{path}: the tensors end at byte {covered} of the data, but it goes "
                         f"on to byte {data_size} (trailing bytes)")
    return entries


def _is_count(value):
    return type(value) is int and value >= 0   # not a bool, not a float


def _is_text(value):
    """A str that UTF-8 can encode: not one holding a lone surrogate, which
    JSON may escape ("\\udcff") but neither the format nor a zip name holds."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def save_safetensors(tensors: Mapping[str, npt.ArrayLike], path: _Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write name -> array (any of the dtypes above) as a .safetensors file.

    metadata, if given, maps str to str: the format holds nothing else, and
    the reference reader refuses anything else, so other values raise
    TypeError rather than being turned into strings. Names must be str
    (TypeError); "__metadata__" is the format's own key, so no tensor may
    have it (ValueError). Everything is checked before the file is opened.
    """
    arrays = _checked_arrays(tensors, "save_safetensors")
    if "__metadata__" in arrays:
        raise ValueError("save_safetensors: no tensor may be called '__metadata__': the format "
                         "keeps that key for its metadata")
    header, offset = {}, 0
    for name, array in arrays.items():
        if array.dtype.newbyteorder("<") not in _NAMES:
            raise TypeError(f"save_safetensors: {name!r} has dtype {array.dtype}, which "
                            "safetensors does not hold")
        header[name] = {"dtype": _NAMES[array.dtype.newbyteorder("<")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"save_safetensors: metadata must be a dict of str to str, "
                            f"not {type(metadata).__name__}")
        for key, value in metadata.items():
            if not (isinstance(key, str) and isinstance(value, str)):
                raise TypeError(f"save_safetensors: metadata must map str to str, not {key!r}: "
                                f"{value!r} ({type(key).__name__}: {type(value).__name__})")
            if not (_is_text(key) and _is_text(value)):
                raise ValueError(f"save_safetensors: metadata {key!r}: {value!r} is not valid "
                                 "Unicode (a lone surrogate)")
        if metadata:
            header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for array in arrays.values():
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))


def _checked_arrays(state, who):
    """name -> ndarray, refusing names no file format can hold."""
    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"{who}: names must be str, not {type(name).__name__} ({name!r})")
        if not _is_text(name):
            raise ValueError(f"{who}: the name {name!r} is not valid Unicode (a lone surrogate)")
        try:
            arrays[name] = np.asarray(value)  # not ascontiguousarray: it makes a 0-d array 1-d
        except ValueError as e:             # a ragged list, say
            raise ValueError(f"{who}: {name!r} is not an array ({e})") from None
    return arrays


# ---------------------------------------------------------------------------
# .npz, read and written member by member: np.savez takes the names as
# keyword arguments (so "file" or "allow_pickle" cannot be names), and
# np.load looks a name up as "name" or "name.npy" (so "a" and "a.npy" collide)

# Version 3.0 is 2.0 with a UTF-8 header instead of a Latin-1 one. 2.0's reader
# garbles the non-Latin-1 field names of a structured dtype in it but gets the
# sizes right, and the sizes are all the header is read for here (read_array
# then reads the array, names and all)
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0,
                       (3, 0): np.lib.format.read_array_header_2_0}
# What zipfile raises for a damaged archive (RuntimeError: encrypted members;
# NotImplementedError: an unknown compression method)
_BAD_ZIP = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def _save_npz(arrays, path):
    for name, array in arrays.items():
        if "\0" in name:
            raise ValueError(f"save_state_dict: the name {name!r} holds a NUL character, "
                             "which a .npz member name cannot")
        if array.dtype.hasobject:
            raise TypeError(f"save_state_dict: {name!r} has dtype {array.dtype}, which .npz holds "
                            "only by pickling, and loading a pickle can run any code")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            # force_zip64 as np.savez does: the member's size is unknown until written
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _load_npz(path, max_bytes):
    try:
        with zipfile.ZipFile(path) as archive:
            headers = _npz_headers(archive, path)
            _check_max_bytes(path, sum(nbytes for _, nbytes in headers.values()), max_bytes)
            arrays = {}
            for name, (info, _) in headers.items():
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except _BAD_ZIP as e:
        raise ValueError(f"{path}: not a valid .npz file ({type(e).__name__}: {e})") from None


def _npz_headers(archive, path):
    """name -> (zip member, bytes once loaded) for every array of an open
    .npz, from the .npy headers alone: none of the data is read."""
    headers = {}
    size = os.path.getsize(path)
    for info in archive.infolist():
        name = info.filename.removesuffix(".npy")
        where = f"{path}: array {name!r}"
        if not info.filename.endswith(".npy"):
            raise ValueError(f"{path}: member {info.filename!r} is not a .npy array")
        if name in headers:
            raise ValueError(f"{where} appears twice")
        if not 0 <= info.header_offset < size:   # zipfile would seek there, failing with an OSError
            raise ValueError(f"{where} lies outside the file (at byte {info.header_offset} of {size})")
        with archive.open(info) as member:
            try:
                version = np.lib.format.read_magic(member)
                if version not in _NPY_HEADER_READERS:
                    raise ValueError(f"unknown .npy format version {version}")
                shape, _, dtype = _NPY_HEADER_READERS[version](member)
            # NumPy's header reader tokenizes and literal_evals the header: a
            # bad one raises any of these, and not only ValueError
            except (ValueError, TypeError, RecursionError, SyntaxError, tokenize.TokenError) as e:
                raise ValueError(f"{where} is not a valid .npy array ({e})") from None
            data_size = info.file_size - member.tell()
        if dtype.hasobject:
            raise ValueError(f"{where} holds Python objects ({dtype}), which only pickle can load")
        if not all(_is_count(d) for d in shape):
            raise ValueError(f"{where}: shape {shape} is not a tuple of non-negative ints")
        nbytes = math.prod(shape) * dtype.itemsize
        if data_size != nbytes:
            raise ValueError(f"{where}: dtype {dtype} and shape {shape} take {nbytes} bytes, but "
                             f"the member holds {data_size}")
        headers[name] = (info, nbytes)
    return headers


# ---------------------------------------------------------------------------
# Either format, by the file's extension

def _check_max_bytes(path, total, max_bytes):
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{path}: its arrays take {total} bytes once loaded, more than "
                         f"max_bytes={max_bytes}")


def load_state_dict(path: _Path, *, max_bytes: int | None = None) -> dict[str, npt.NDArray[Any]]:
    """name -> array from a .npz or .safetensors file (by its extension).

    A malformed file raises ValueError naming the file. max_bytes: if given,
    a file whose arrays would take more than this many bytes once loaded
    raises ValueError before any array data is read (the sizes come from
    the .npy headers or the safetensors header), so an untrusted file
    cannot exhaust memory.
    """
    path = os.fsdecode(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path, max_bytes=max_bytes)
    if path.endswith(".npz"):
        return _load_npz(path, max_bytes)
    raise ValueError(f"{path}: expected a .npz or .safetensors file")


def save_state_dict(state: Mapping[str, npt.ArrayLike], path: _Path) -> None:
    """Write name -> array to a .npz or .safetensors file (by its extension).

    Whatever is written loads back with the same names, dtypes, shapes and
    values (safetensors stores little-endian, so a big-endian array comes back
    native). What could not is refused before the file is opened: names that
    are not str (TypeError), object arrays (TypeError), dtypes safetensors
    lacks (TypeError), and names a format reserves or cannot spell (ValueError).
    """
    path = os.fsdecode(path)
    if path.endswith(".safetensors"):
        save_safetensors(state, path)
    elif path.endswith(".npz"):
        _save_npz(_checked_arrays(state, "save_state_dict"), path)
    else:
        raise ValueError(f"{path}: expected a .npz or .safetensors file")
