"""State dicts on disk: .npz (NumPy's) and .safetensors, read and written
with NumPy alone.

safetensors, as its specification describes it: an 8-byte little-endian
header length n, n bytes of JSON mapping each name to its dtype, shape and
[begin, end) byte offsets into the data that follows (plus an optional
"__metadata__" of strings), then the data, little-endian, C order.
"""
import json
import os
import struct

import numpy as np

__all__ = ["load_safetensors", "save_safetensors", "load_state_dict", "save_state_dict"]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(t).newbyteorder("<"): name for name, t in _SAFETENSORS_DTYPES.items()}


def load_safetensors(path):
    """name -> array for every tensor in a .safetensors file. bfloat16 (which
    NumPy lacks) is widened to float32 exactly."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (its header is a JSON "
                             f"{type(header).__name__}, not an object)")
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor {name!r} lies outside the file ({begin}..{end})")
        chunk = data[begin:end]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(chunk, "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif entry["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(chunk, np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which attnkit "
                             "does not read")
        if array.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {name!r} holds {array.size} values, not shape {shape}")
        tensors[name] = array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=True)
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write name -> array (any of the dtypes above) as a .safetensors file."""
    header, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        array = np.asarray(value)  # not ascontiguousarray: it makes a 0-d array 1-d
        little = array.dtype.newbyteorder("<")
        if little not in _NAMES:
            raise TypeError(f"save_safetensors: {name!r} has dtype {array.dtype}, which "
                            "safetensors does not hold")
        data = array.astype(little, copy=False).tobytes(order="C")
        header[name] = {"dtype": _NAMES[little], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def load_state_dict(path):
    """name -> array from a .npz or .safetensors file (by its extension)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    raise ValueError(f"{path}: expected a .npz or .safetensors file")


def save_state_dict(state, path):
    """Write name -> array to a .npz or .safetensors file (by its extension)."""
    path = os.fspath(path)
    arrays = {name: np.asarray(value) for name, value in state.items()}
    if path.endswith(".safetensors"):
        save_safetensors(arrays, path)
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise ValueError(f"{path}: expected a .npz or .safetensors file")
