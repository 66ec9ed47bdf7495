"""attnkit.io: state dicts in .npz and .safetensors files, read and written
with NumPy alone; checked against the safetensors format as documented (files
crafted by hand here) and, where the `safetensors` package is installed,
against its reader and writer."""
import json
import os
import re
import struct
import warnings
import zipfile

import numpy as np
import pytest

from attnkit import io, nn

FORMATS = ["npz", "safetensors"]

ARRAYS = {
    "float32": np.array([[0.1, -2.5, np.inf], [-np.inf, np.nan, -0.0]], np.float32),
    "float64": np.array([1 / 3, -1e300, 5e-324, np.pi], np.float64),
    "float16": np.array([[1.5, -65504.0], [6e-8, 0.0]], np.float16),
    "int64": np.array([2**62 + 1, -(2**63), 0, 7], np.int64),
    "bool": np.array([[True, False, True]]),
    "zero_dim_float": np.array(2.5, np.float32),
    "zero_dim_int64": np.array(12345, np.int64),
    "empty": np.zeros((0, 3), np.float32),
    "empty_1d_int64": np.zeros((0,), np.int64),
}


def assert_identical(actual, expected):
    """Same dtype, same shape, same bytes (so NaNs and -0.0 count)."""
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.tobytes() == expected.tobytes()


def write_safetensors_by_hand(path, entries, metadata=None, header_override=None):
    """The documented format: u64 little-endian header size n, n bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets into the
    data that follows the header), then the data. entries: (name, dtype, shape, bytes)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header if header_override is None else header_override).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), n, len(raw)


# ---------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(ARRAYS))
def test_round_trip(fmt, case, tmp_path):
    path = tmp_path / f"state.{fmt}"
    io.save_state_dict({"tensor": ARRAYS[case]}, path)
    loaded = io.load_state_dict(path)
    assert list(loaded) == ["tensor"]
    assert_identical(loaded["tensor"], ARRAYS[case])
    assert loaded["tensor"].flags.writeable


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_a_whole_state_dict(fmt, tmp_path, rng):
    state = {f"layers.{i}.{name}": value for i, (name, value) in enumerate(ARRAYS.items())}
    state["out_proj.weight"] = rng.standard_normal((4, 4)).astype(np.float32)
    path = str(tmp_path / f"model.{fmt}")     # a str path works as a Path does
    io.save_state_dict(state, path)
    loaded = io.load_state_dict(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert_identical(loaded[key], value)


def test_safetensors_functions_directly(tmp_path, rng):
    tensors = {"a": rng.standard_normal((3, 2)), "b": np.arange(5, dtype=np.int32),
               "c": np.array([1, 2], np.uint8), "d": np.array([-3], np.int8)}
    path = tmp_path / "direct.safetensors"
    io.save_safetensors(tensors, path)
    loaded = io.load_safetensors(path)
    for key, value in tensors.items():
        assert_identical(loaded[key], value)


def test_safetensors_header_follows_the_format(tmp_path, rng):
    tensors = {"w": rng.standard_normal((2, 3)).astype(np.float32), "n": np.array([1, 2, 3], np.int64),
               "h": np.ones(5, np.float16), "m": np.array([True, False])}
    path = tmp_path / "layout.safetensors"
    io.save_safetensors(tensors, path)
    header, n, size = read_header(path)
    assert {k: v["dtype"] for k, v in header.items()} == {"w": "F32", "n": "I64", "h": "F16", "m": "BOOL"}
    assert header["w"]["shape"] == [2, 3] and header["m"]["shape"] == [2]
    raw = path.read_bytes()
    end = 0
    for name, value in tensors.items():
        begin, stop = header[name]["data_offsets"]
        assert begin == end                        # packed one after another
        assert raw[8 + n + begin:8 + n + stop] == value.astype(value.dtype.newbyteorder("<")).tobytes()
        end = stop
    assert 8 + n + end == size                      # nothing after the last tensor
    assert "__metadata__" not in header


def test_safetensors_metadata(tmp_path):
    path = tmp_path / "meta.safetensors"
    io.save_safetensors({"x": np.zeros(2, np.float32)}, path, metadata={"format": "pt", "step": "3"})
    header, _, _ = read_header(path)
    assert header["__metadata__"] == {"format": "pt", "step": "3"}
    loaded = io.load_safetensors(path)
    assert list(loaded) == ["x"]                                      # metadata is no tensor
    # a hand-made file with metadata reads the same
    other = write_safetensors_by_hand(tmp_path / "meta2.safetensors",
                                      [("y", "F64", [2], np.array([1.0, 2.0]).tobytes())],
                                      metadata={"source": "hand"})
    assert_identical(io.load_safetensors(other)["y"], np.array([1.0, 2.0]))
    assert list(io.load_safetensors(other)) == ["y"]


def test_big_endian_arrays_are_written_little_endian(tmp_path):
    big = np.arange(4, dtype=">f8") / 3
    path = tmp_path / "be.safetensors"
    io.save_safetensors({"x": big, "i": np.array([1, -2], ">i4")}, path)
    header, n, _ = read_header(path)
    assert header["x"]["dtype"] == "F64" and header["i"]["dtype"] == "I32"
    loaded = io.load_safetensors(path)
    assert loaded["x"].dtype == np.float64 and loaded["x"].dtype.isnative
    np.testing.assert_array_equal(loaded["x"], big)
    np.testing.assert_array_equal(loaded["i"], [1, -2])


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="'z'.*complex64"):
        io.save_safetensors({"z": np.zeros(2, np.complex64)}, tmp_path / "c.safetensors")


# ---------------------------------------------------------------------------
# bfloat16, read from a file made by hand

def test_bfloat16_is_widened_to_float32_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC020, 0x4049, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x7F7F, 0x3EAB],
                    "<u2")
    expected = np.array([1.0, -2.5, 3.140625, np.inf, -np.inf, -0.0, 0.0, 2.0**-133,
                         (2 - 2.0**-7) * 2.0**127, 0.333984375], np.float32).reshape(2, 5)
    before = np.array([7.0, 8.0], np.float32)
    path = write_safetensors_by_hand(tmp_path / "bf16.safetensors", [
        ("before", "F32", [2], before.tobytes()),
        ("bf", "BF16", [2, 5], bits.tobytes()),
        ("nan", "BF16", [1], np.array([0x7FC0], "<u2").tobytes()),
        ("scalar", "BF16", [], np.array([0x4040], "<u2").tobytes()),        # 3.0
    ])
    loaded = io.load_safetensors(path)
    assert loaded["bf"].dtype == np.float32 and loaded["bf"].shape == (2, 5)
    assert_identical(loaded["bf"], expected)
    assert_identical(loaded["before"], before)
    assert loaded["nan"].dtype == np.float32 and np.isnan(loaded["nan"]).all()
    assert_identical(loaded["scalar"], np.array(3.0, np.float32))
    # every bfloat16 is the top half of the float32 it stands for
    assert np.array_equal(loaded["bf"].view(np.uint32) >> 16, bits.reshape(2, 5))
    np.testing.assert_array_equal(io.load_state_dict(path)["bf"], expected)


def test_bfloat16_weights_load_into_a_module(tmp_path, rng):
    w = rng.standard_normal((3, 4)).astype(np.float32)
    bf = (w.view(np.uint32) >> 16).astype("<u2")             # truncated to bfloat16
    widened = (bf.astype(np.uint32) << 16).view(np.float32)
    path = write_safetensors_by_hand(tmp_path / "lin.safetensors", [
        ("weight", "BF16", [3, 4], bf.tobytes()), ("bias", "BF16", [3], bf[0, :3].tobytes())])
    lin = nn.Linear(4, 3, rng=rng)
    assert lin.load(path) == ([], [])
    np.testing.assert_array_equal(lin.weight, widened)
    np.testing.assert_array_equal(lin.bias, widened[0, :3])


# ---------------------------------------------------------------------------
# Corrupt files and unknown extensions

def test_short_files(tmp_path):
    for raw in (b"", b"\x01\x02\x03"):
        path = tmp_path / "short.safetensors"
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="short.safetensors.*not a safetensors file"):
            io.load_safetensors(path)


@pytest.mark.parametrize("n", [1000, 2**64 - 1, 9])
def test_header_length_beyond_the_file(n, tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", n) + b'{"a":1}')   # 7 bytes follow
    with pytest.raises(ValueError, match=f"header length {n}"):
        io.load_safetensors(path)


@pytest.mark.parametrize("offsets", [[0, 400], [16, 24], [12, 20]])
def test_offsets_outside_the_file(offsets, tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()          # 16 bytes of data
    header = {"x": {"dtype": "F32", "shape": [(offsets[1] - offsets[0]) // 4], "data_offsets": offsets}}
    path = write_safetensors_by_hand(tmp_path / "off.safetensors", [], header_override=header)
    with open(path, "ab") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"'x' lies outside the file"):
        io.load_safetensors(path)


def test_shape_and_size_disagree(tmp_path):
    path = write_safetensors_by_hand(tmp_path / "size.safetensors",
                                     [("x", "F32", [3, 2], np.zeros(4, np.float32).tobytes())])
    with pytest.raises(ValueError, match=r"'x': dtype F32 and shape \(3, 2\) take 24 bytes, but "
                                         r"data_offsets \[0, 16\] hold 16"):
        io.load_safetensors(path)


def test_unknown_tensor_dtype(tmp_path):
    path = write_safetensors_by_hand(tmp_path / "fp8.safetensors", [("x", "F8_E4M3", [4], bytes(4))])
    with pytest.raises(ValueError, match="'x' has dtype F8_E4M3"):
        io.load_safetensors(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "garbled.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"\x00\xffnot js" + bytes(16))
    with pytest.raises(ValueError, match="garbled.safetensors"):
        io.load_safetensors(path)


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    text = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValueError, match="list.safetensors"):
        io.load_safetensors(path)


def test_unknown_extension(tmp_path):
    state = {"w": np.zeros(2, np.float32)}
    for name in ("weights.pt", "weights.bin", "weights", "weights.npz.tmp"):
        with pytest.raises(ValueError, match=r"expected a \.npz or \.safetensors file"):
            io.save_state_dict(state, tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "weights.pt").write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"weights\.pt: expected a \.npz or \.safetensors file"):
        io.load_state_dict(tmp_path / "weights.pt")
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        lin.save(tmp_path / "lin.pth")
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        lin.load(tmp_path / "weights.pt")


# ---------------------------------------------------------------------------
# Malformed safetensors files, case by case: each raises ValueError naming the
# file and the tensor at fault. `reference` is what the format's own reader
# (safetensors.numpy.load_file) does with the same bytes: "refuses" or
# "accepts" (where attnkit is deliberately stricter).

F32_16 = np.arange(4, dtype=np.float32).tobytes()         # 16 bytes of data


def entry(**changes):
    """A valid header entry for F32_16, with some fields changed (None: dropped)."""
    result = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    result.update(changes)
    return {k: v for k, v in result.items() if v is not DROP}


DROP = object()
js = json.dumps

# id: (header text, data, what the message says, the tensor it names or None, reference)
CORRUPT = {
    "dtype_list": (js({"x": entry(dtype=["F32"])}), F32_16, "dtype must be a string", "x", "refuses"),
    "dtype_unknown": (js({"x": entry(dtype="FOO")}), F32_16, "has dtype FOO, which attnkit does not read",
                      "x", "refuses"),
    "dtype_lowercase": (js({"x": entry(dtype="f32")}), F32_16, "has dtype f32", "x", "refuses"),
    "missing_data_offsets": (js({"x": entry(data_offsets=DROP)}), F32_16,
                             "an object with dtype, shape and data_offsets", "x", "refuses"),
    "missing_shape": (js({"x": entry(shape=DROP)}), F32_16, "an object with dtype, shape and data_offsets",
                      "x", "refuses"),
    "missing_dtype": (js({"x": entry(dtype=DROP)}), F32_16, "an object with dtype, shape and data_offsets",
                      "x", "refuses"),
    "null_entry": (js({"x": None}), b"", "an object with dtype, shape and data_offsets", "x", "refuses"),
    "list_entry": (js({"x": [1]}), b"", "an object with dtype, shape and data_offsets", "x", "refuses"),
    "shape_string": (js({"x": entry(shape="4")}), F32_16, "shape must be a list of non-negative ints",
                     "x", "refuses"),
    "shape_int": (js({"x": entry(shape=4)}), F32_16, "shape must be a list", "x", "refuses"),
    "shape_null": (js({"x": entry(shape=None)}), F32_16, "shape must be a list", "x", "refuses"),
    "shape_negative": (js({"x": entry(shape=[-2, -2])}), F32_16, "shape must be a list of non-negative",
                       "x", "refuses"),
    "shape_bool": (js({"x": entry(shape=[True, 4])}), F32_16, "shape must be a list", "x", "refuses"),
    "shape_float": (js({"x": entry(shape=[4.0])}), F32_16, "shape must be a list", "x", "refuses"),
    "offsets_float": (js({"x": entry(data_offsets=[0.0, 16.0])}), F32_16, "data_offsets must be",
                      "x", "refuses"),
    "offsets_bool": (js({"x": entry(dtype="BOOL", shape=[1], data_offsets=[False, True])}), b"\x01",
                     "data_offsets must be", "x", "refuses"),
    "offsets_three": (js({"x": entry(data_offsets=[0, 16, 16])}), F32_16, "data_offsets must be",
                      "x", "refuses"),
    "offsets_one": (js({"x": entry(data_offsets=[16])}), F32_16, "data_offsets must be", "x", "refuses"),
    "offsets_string": (js({"x": entry(data_offsets="0,16")}), F32_16, "data_offsets must be", "x",
                       "refuses"),
    "offsets_reversed": (js({"x": entry(shape=[0], data_offsets=[16, 0])}), F32_16,
                         "data_offsets must be", "x", "refuses"),
    "offsets_negative": (js({"x": entry(data_offsets=[-4, 12])}), F32_16, "data_offsets must be",
                         "x", "refuses"),
    "size_mismatch": (js({"x": entry(shape=[3, 2])}), F32_16,
                      "dtype F32 and shape (3, 2) take 24 bytes, but data_offsets [0, 16] hold 16",
                      "x", "refuses"),
    # Python ints: in int64 2**32 * 2**32 * 16 * 4 would wrap around to 0
    "shape_overflows_int64": (js({"x": entry(shape=[2**32, 2**32, 16], data_offsets=[0, 0])}), b"",
                              "take 1180591620717411303424 bytes", "x", "refuses"),
    "empty_but_too_large": (js({"x": entry(shape=[2**62, 4, 0], data_offsets=[0, 0])}), b"",
                            "too large for NumPy", "x", "refuses"),
    "beyond_the_file": (js({"x": entry(shape=[100], data_offsets=[0, 400])}), F32_16,
                        "lies outside the file", "x", "refuses"),
    "overlap": (js({"a": entry(), "b": entry(shape=[2], data_offsets=[8, 16])}), F32_16,
                "overlaps the tensor before it", "b", "refuses"),
    "same_bytes_twice": (js({"a": entry(), "b": entry()}), F32_16, "overlaps the tensor before it",
                         "b", "refuses"),
    "empty_inside_another": (js({"a": entry(), "e": entry(shape=[0], data_offsets=[8, 8])}), F32_16,
                             "overlaps the tensor before it", "e", "refuses"),
    "gap": (js({"a": entry(shape=[1], data_offsets=[0, 4]), "b": entry(shape=[2], data_offsets=[8, 16])}),
            F32_16, "leaves a gap before it", "b", "refuses"),
    "gap_at_the_start": (js({"a": entry(shape=[3], data_offsets=[4, 16])}), F32_16,
                         "leaves a gap before it", "a", "refuses"),
    "trailing_bytes": (js({"x": entry()}), F32_16 + bytes(4), "end at byte 16 of the data, but it goes "
                       "on to byte 20", None, "refuses"),
    "data_but_no_tensors": ("{}", b"\0", "end at byte 0 of the data", None, "refuses"),
    "metadata_int_value": (js({"x": entry(), "__metadata__": {"a": 1}}), F32_16,
                           "__metadata__ must map strings to strings", None, "refuses"),
    "metadata_null_value": (js({"x": entry(), "__metadata__": {"a": None}}), F32_16,
                            "__metadata__ must map strings to strings", None, "refuses"),
    "metadata_nested": (js({"x": entry(), "__metadata__": {"a": {"b": "c"}}}), F32_16,
                        "__metadata__ must map strings to strings", None, "refuses"),
    "metadata_list": (js({"x": entry(), "__metadata__": ["a"]}), F32_16,
                      "__metadata__ must map strings to strings", None, "refuses"),
    "metadata_string": (js({"x": entry(), "__metadata__": "a"}), F32_16,
                        "__metadata__ must map strings to strings", None, "refuses"),
    "duplicate_tensor": ('{"x":%s,"x":%s}' % (js(entry(shape=[2], data_offsets=[0, 8])),
                                              js(entry(shape=[2], data_offsets=[8, 16]))), F32_16,
                         "has the key 'x' twice", "x", "refuses"),
    "duplicate_identical_tensor": ('{"x":%s,"x":%s}' % (js(entry()), js(entry())), F32_16,
                                   "has the key 'x' twice", "x", "accepts"),
    "duplicate_field": ('{"x":{"dtype":"F32","dtype":"F32","shape":[4],"data_offsets":[0,16]}}', F32_16,
                        "has the key 'dtype' twice", None, "refuses"),
    "duplicate_metadata_key": ('{"__metadata__":{"a":"1","a":"2"},"x":%s}' % js(entry()), F32_16,
                               "has the key 'a' twice", None, "accepts"),
    "duplicate_metadata": ('{"__metadata__":{},"__metadata__":{},"x":%s}' % js(entry()), F32_16,
                           "has the key '__metadata__' twice", None, "refuses"),
    "nested_100k_deep": ("[" * 100_000 + "]" * 100_000, b"", "nests too deeply", None, "refuses"),
    "entry_nested_100k_deep": ('{"x":' + "[" * 100_000 + "]" * 100_000 + "}", b"", "nests too deeply",
                               None, "refuses"),
    "entry_nested_200_deep": ('{"x":' + "[" * 200 + "]" * 200 + "}", b"",
                              "an object with dtype, shape and data_offsets", "x", "refuses"),
    "header_not_utf8": (b'{"\xff":' + js(entry()).encode() + b"}", F32_16, "not UTF-8 JSON", None,
                        "refuses"),
    "header_utf16": (js({"x": entry()}).encode("utf-16"), F32_16, "not UTF-8 JSON", None, "refuses"),
    "header_with_bom": (b"\xef\xbb\xbf" + js({"x": entry()}).encode(), F32_16, "not UTF-8 JSON", None,
                        "refuses"),
    "header_then_garbage": (js({"x": entry()}) + "xx", F32_16, "not UTF-8 JSON", None, "refuses"),
    "header_with_nan": ('{"x":%s,"y":NaN}' % js(entry()), F32_16, "NaN is not JSON", None, "refuses"),
    "header_list": ("[1, 2]", b"", "is a JSON list, not an object", None, "refuses"),
    "header_empty": ("", b"", "not UTF-8 JSON", None, "refuses"),
    "name_lone_surrogate": ('{"\\udcff":%s}' % js(entry()), F32_16, "not valid Unicode", "\udcff",
                            "refuses"),
}


def write_raw_safetensors(path, header_text, data):
    if isinstance(header_text, str):
        header_text = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)
    return path


@pytest.mark.parametrize("case", list(CORRUPT))
def test_malformed_safetensors_raise_value_error_naming_file_and_tensor(case, tmp_path):
    header_text, data, message, tensor, _ = CORRUPT[case]
    path = write_raw_safetensors(tmp_path / f"{case}.safetensors", header_text, data)
    for load in (io.load_safetensors, io.load_state_dict):
        with pytest.raises(ValueError) as info:
            load(path)
        text = str(info.value)
        assert text.startswith(f"{path}: "), text
        assert message in text, text
        if tensor is not None:
            assert repr(tensor) in text, text
        assert len(text) < 400, text                 # nothing huge is quoted back


@pytest.mark.parametrize("case", list(CORRUPT))
def test_safetensors_package_on_the_same_malformed_files(case, tmp_path):
    """Records where attnkit agrees with the format's own reader (every
    "refuses") and where it is stricter on purpose ("accepts": a key given
    twice in one object)."""
    st = pytest.importorskip("safetensors.numpy")
    header_text, data, _, _, reference = CORRUPT[case]
    path = write_raw_safetensors(tmp_path / f"{case}.safetensors", header_text, data)
    if reference == "refuses":
        with pytest.raises(Exception):
            st.load_file(str(path))
    else:
        st.load_file(str(path))


def test_header_longer_than_the_format_allows(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    n = 100_000_001
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n)                             # sparse: no 100 MB written
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: header length {n} is over"):
        io.load_safetensors(path)


# Valid, if unusual: these load, as the reference reader loads them
UNUSUAL_BUT_VALID = {
    "empty_tensors_share_the_first_offset": (
        js({"e1": entry(shape=[0], data_offsets=[0, 0]), "e2": entry(shape=[0, 3], data_offsets=[0, 0]),
            "x": entry()}), F32_16, {"e1": np.zeros(0, np.float32), "e2": np.zeros((0, 3), np.float32),
                                     "x": np.arange(4, dtype=np.float32)}),
    "empty_tensors_share_the_last_offset": (
        js({"x": entry(), "e1": entry(dtype="I64", shape=[0], data_offsets=[16, 16]),
            "e2": entry(shape=[2, 0], data_offsets=[16, 16])}), F32_16,
        {"x": np.arange(4, dtype=np.float32), "e1": np.zeros(0, np.int64), "e2": np.zeros((2, 0), np.float32)}),
    "tensors_out_of_offset_order": (
        js({"b": entry(shape=[2], data_offsets=[8, 16]), "a": entry(shape=[2], data_offsets=[0, 8])}),
        F32_16, {"b": np.array([2, 3], np.float32), "a": np.array([0, 1], np.float32)}),
    "whitespace_around_the_header": ("  " + js({"x": entry()}) + "      ", F32_16,
                                     {"x": np.arange(4, dtype=np.float32)}),
    "no_tensors": ("{}", b"", {}),
    "metadata_only": (js({"__metadata__": {"a": "b"}}), b"", {}),
    "empty_metadata": (js({"x": entry(), "__metadata__": {}}), F32_16, {"x": np.arange(4, dtype=np.float32)}),
    "empty_name": (js({"": entry()}), F32_16, {"": np.arange(4, dtype=np.float32)}),
    # what a newer writer may add to an entry is ignored, as the reference reader ignores it
    "extra_field_in_an_entry": (js({"x": entry(extra=1)}), F32_16, {"x": np.arange(4, dtype=np.float32)}),
    "null_metadata": (js({"x": entry(), "__metadata__": None}), F32_16, {"x": np.arange(4, dtype=np.float32)}),
    "huge_dimension_of_an_empty_tensor": (js({"x": entry(shape=[2**40, 0], data_offsets=[0, 0])}), b"",
                                          {"x": np.zeros((2**40, 0), np.float32)}),
}


@pytest.mark.parametrize("case", list(UNUSUAL_BUT_VALID))
def test_unusual_but_valid_safetensors_load(case, tmp_path):
    header_text, data, expected = UNUSUAL_BUT_VALID[case]
    path = write_raw_safetensors(tmp_path / f"{case}.safetensors", header_text, data)
    loaded = io.load_safetensors(path)
    assert list(loaded) == list(expected)             # the header's order
    for name, value in expected.items():
        assert_identical(loaded[name], value)
        assert loaded[name].flags.writeable
    st = pytest.importorskip("safetensors.numpy")
    assert set(st.load_file(str(path))) == set(expected)


# ---------------------------------------------------------------------------
# Malformed .npz files: ValueError naming the file and the array

def npz_by_hand(path, members, compression=zipfile.ZIP_STORED):
    """members: (member name, bytes); a .npz is a zip of .npy files."""
    with zipfile.ZipFile(path, "w", compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")               # zipfile warns of a name given twice
        for name, raw in members:
            archive.writestr(name, raw)
    return path


def npy_bytes(array, **kwargs):
    import io as pyio
    buffer = pyio.BytesIO()
    np.lib.format.write_array(buffer, array, **kwargs)
    return buffer.getvalue()


def npy_with_header(header, data):
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


GOOD_NPY = npy_bytes(np.arange(4, dtype=np.float32))


def make_truncated(path):
    io.save_state_dict({"w": np.arange(100.0)}, path)
    path.write_bytes(path.read_bytes()[:300])


def make_bad_crc(path):
    io.save_state_dict({"w": np.arange(100.0)}, path)
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF                                  # inside w's data
    path.write_bytes(bytes(raw))


def make_shifted_directory(path):
    io.save_state_dict({"w": np.arange(100.0)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:100] + raw[102:])           # every offset now 2 bytes off


# id: (how to make it, what the message says, the array it names or None)
CORRUPT_NPZ = {
    "not_a_zip": (lambda p: p.write_bytes(b"PK\x03\x04 not really"), "not a valid .npz file", None),
    "a_npy_file": (lambda p: p.write_bytes(GOOD_NPY), "not a valid .npz file", None),
    "empty_file": (lambda p: p.write_bytes(b""), "not a valid .npz file", None),
    "truncated": (make_truncated, "not a valid .npz file", None),
    "data_corrupted": (make_bad_crc, "not a valid .npz file", None),
    "offsets_shifted": (make_shifted_directory, "", None),
    "member_not_npy": (lambda p: npz_by_hand(p, [("w.npy", GOOD_NPY), ("notes.txt", b"hello")]),
                       "member 'notes.txt' is not a .npy array", None),
    "member_twice": (lambda p: npz_by_hand(p, [("w.npy", GOOD_NPY), ("w.npy", GOOD_NPY)]),
                     "appears twice", "w"),
    "bad_magic": (lambda p: npz_by_hand(p, [("w.npy", b"\x93NUMPX\x01\x00" + GOOD_NPY[8:])]),
                  "is not a valid .npy array", "w"),
    "unknown_npy_version": (lambda p: npz_by_hand(p, [("w.npy", b"\x93NUMPY\x09\x00" + GOOD_NPY[8:])]),
                            "unknown .npy format version", "w"),
    "header_not_a_dict": (lambda p: npz_by_hand(p, [("w.npy", npy_with_header("[1, 2]", bytes(16)))]),
                          "is not a valid .npy array", "w"),
    "header_unhashable_key": (lambda p: npz_by_hand(p, [("w.npy", npy_with_header("{[]: 1}", b""))]),
                              "is not a valid .npy array", "w"),
    "header_bad_dtype": (lambda p: npz_by_hand(p, [("w.npy", npy_with_header(
        "{'descr': 'nonsense', 'fortran_order': False, 'shape': (4,), }", bytes(16)))]),
        "is not a valid .npy array", "w"),
    "shape_negative": (lambda p: npz_by_hand(p, [("w.npy", npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -2), }", bytes(16)))]),
        "shape (-2, -2) is not a tuple of non-negative ints", "w"),
    "data_shorter_than_shape": (lambda p: npz_by_hand(p, [("w.npy", npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", bytes(16)))]),
        "take 4000000000000 bytes, but the member holds 16", "w"),
    "data_longer_than_shape": (lambda p: npz_by_hand(p, [("w.npy", GOOD_NPY + b"\0")]),
                               "take 16 bytes, but the member holds 17", "w"),
    "pickled_objects": (lambda p: npz_by_hand(p, [("w.npy", npy_bytes(np.array([1, None]), allow_pickle=True))]),
                        "holds Python objects", "w"),
}


@pytest.mark.parametrize("case", list(CORRUPT_NPZ))
def test_malformed_npz_raise_value_error_naming_file_and_array(case, tmp_path):
    make, message, array = CORRUPT_NPZ[case]
    path = tmp_path / f"{case}.npz"
    make(path)
    with pytest.raises(ValueError) as info:
        io.load_state_dict(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text, text
    if array is not None:
        assert f"array {array!r}" in text, text


def test_npz_files_numpy_wrote_still_load(tmp_path, rng):
    state = {"w": rng.standard_normal((3, 4)).astype(np.float32), "n": np.array(7, np.int64),
             "f": np.asfortranarray(rng.standard_normal((2, 5))), "e": np.zeros((0, 2), np.float16)}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **state)
        loaded = io.load_state_dict(path)
        assert list(loaded) == list(state)
        for key, value in state.items():
            assert_identical(loaded[key], value)
        assert loaded["f"].flags.f_contiguous


# ---------------------------------------------------------------------------
# max_bytes: refuse a file too large for the caller before reading its arrays

@pytest.mark.parametrize("fmt", FORMATS)
def test_max_bytes(fmt, tmp_path):
    state = {"a": np.zeros((10, 10), np.float64), "b": np.zeros(3, np.int32), "c": np.array(True)}
    total = 800 + 12 + 1
    path = tmp_path / f"state.{fmt}"
    io.save_state_dict(state, path)
    assert list(io.load_state_dict(path, max_bytes=total)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: its arrays take {total} bytes once "
                                         rf"loaded, more than max_bytes={total - 1}$"):
        io.load_state_dict(path, max_bytes=total - 1)
    if fmt == "safetensors":
        with pytest.raises(ValueError, match="max_bytes=0"):
            io.load_safetensors(path, max_bytes=0)


def test_max_bytes_counts_bfloat16_as_the_float32_it_becomes(tmp_path):
    path = write_safetensors_by_hand(tmp_path / "bf.safetensors", [("x", "BF16", [8], bytes(16))])
    assert io.load_safetensors(path, max_bytes=32)["x"].nbytes == 32
    with pytest.raises(ValueError, match="take 32 bytes once loaded, more than max_bytes=31"):
        io.load_safetensors(path, max_bytes=31)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_bytes_refuses_before_reading_any_array(fmt, tmp_path, monkeypatch):
    path = tmp_path / f"big.{fmt}"
    if fmt == "npz":      # 64 MB of zeros compress to almost nothing: a small file, a big load
        np.savez_compressed(path, small=np.zeros(2), big=np.zeros(8 * 2**20))
        assert path.stat().st_size < 2**20
    else:
        io.save_state_dict({"small": np.zeros(2), "big": np.zeros(2**16)}, path)

    def no_reading(*args, **kwargs):
        raise AssertionError("array data was read")
    monkeypatch.setattr(np.lib.format, "read_array", no_reading)
    monkeypatch.setattr(np, "frombuffer", no_reading)
    with pytest.raises(ValueError, match="more than max_bytes=1000"):
        io.load_state_dict(path, max_bytes=1000)


# ---------------------------------------------------------------------------
# Names and values: whatever is saved loads back exactly, or is refused before
# anything is written

# np.savez took names as keyword arguments (so "file" raised TypeError and
# "allow_pickle" vanished) and np.load finds "a" under "a.npy" too
AWKWARD_NAMES = ["file", "allow_pickle", "args", "kwds", "compress", "arr_0", "a", "a.npy", "a.npy.npy",
                 "", "a/b/c", "/abs", "../up", "with space", "tab\there", "é漢字", "x" * 300,
                 "layers.0.weight", "a\\b", "a\0b"]


@pytest.mark.parametrize("name", ["allow_pickle", "file"])
def test_npz_names_np_savez_took_for_its_own_arguments(name, tmp_path):
    """np.savez(path, **state): "allow_pickle" was swallowed (the file loaded
    back empty) and "file" raised TypeError."""
    path = tmp_path / "f.npz"
    io.save_state_dict({name: np.arange(3)}, path)
    assert_identical(io.load_state_dict(path)[name], np.arange(3))


@pytest.mark.parametrize("fmt", FORMATS)
def test_awkward_names_round_trip(fmt, tmp_path):
    names = [n for n in AWKWARD_NAMES if not (fmt == "npz" and "\0" in n)]
    state = {name: np.full((i % 3,) * (i % 2), i, np.int16) for i, name in enumerate(names)}
    path = tmp_path / f"names.{fmt}"
    io.save_state_dict(state, path)
    loaded = io.load_state_dict(path)
    assert list(loaded) == names
    for name, value in state.items():
        assert_identical(loaded[name], value)


def test_awkward_names_in_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    state = {name: np.array([i], np.int16) for i, name in enumerate(AWKWARD_NAMES)}
    ours = tmp_path / "ours.safetensors"
    io.save_safetensors(state, ours)
    assert {k: int(v[0]) for k, v in st.load_file(str(ours)).items()} == {k: int(v[0]) for k, v in state.items()}
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(state, str(theirs))
    assert {k: int(v[0]) for k, v in io.load_safetensors(theirs).items()} == {k: int(v[0]) for k, v in state.items()}


def test_npz_written_by_attnkit_reads_in_numpy(tmp_path, rng):
    state = {"file": rng.standard_normal(3), "allow_pickle": np.arange(4), "a/b": np.array(True)}
    path = tmp_path / "ours.npz"
    io.save_state_dict(state, path)
    with np.load(path, allow_pickle=False) as archive:
        assert archive.files == list(state)
        for key, value in state.items():
            assert_identical(archive[key], value)


def refused_before_writing(save, state, path, error, match):
    """The save raises and leaves the file as it was: absent, or untouched."""
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(error, match=match):
        save(state, path)
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [1, b"w", None, ("a", "b"), 2.5], ids=repr)
def test_names_that_are_not_str_are_refused(fmt, name, tmp_path):
    state = {"ok": np.zeros(2), name: np.zeros(2)}
    path = tmp_path / f"state.{fmt}"
    refused_before_writing(io.save_state_dict, state, path, TypeError, "names must be str")
    io.save_state_dict({"old": np.ones(2)}, path)
    refused_before_writing(io.save_state_dict, state, path, TypeError, "names must be str")
    assert list(io.load_state_dict(path)) == ["old"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_names_with_a_lone_surrogate_are_refused(fmt, tmp_path):
    # neither JSON as the reference reader reads it nor a zip member name holds one
    path = tmp_path / f"state.{fmt}"
    refused_before_writing(io.save_state_dict, {"ok": np.zeros(2), "bad\udcff": np.zeros(2)}, path,
                           ValueError, r"'bad\\udcff' is not valid Unicode")


def test_npz_refuses_a_nul_in_a_name(tmp_path):
    # zipfile cuts a member name at its first NUL, so "a\0b" would come back as "a"
    refused_before_writing(io.save_state_dict, {"a\0b": np.zeros(2)}, tmp_path / "nul.npz",
                           ValueError, r"'a\\x00b' holds a NUL character")


def test_safetensors_refuses_a_tensor_named_metadata(tmp_path):
    state = {"w": np.zeros(2, np.float32), "__metadata__": np.ones(3, np.float32)}
    for save in (io.save_state_dict, io.save_safetensors):
        refused_before_writing(save, state, tmp_path / "m.safetensors", ValueError,
                               "no tensor may be called '__metadata__'")
    io.save_state_dict(state, tmp_path / "m.npz")          # .npz has no such key of its own
    assert_identical(io.load_state_dict(tmp_path / "m.npz")["__metadata__"], np.ones(3, np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.array([1, None]), np.array(["a", {}], dtype=object),
                                   np.zeros(2, [("a", "O"), ("b", "f4")])], ids=["object", "dicts", "struct"])
def test_object_arrays_are_refused(fmt, value, tmp_path):
    # .npz would pickle them, which np.load(allow_pickle=False) then refuses
    refused_before_writing(io.save_state_dict, {"w": np.zeros(2), "o": value}, tmp_path / f"o.{fmt}",
                           TypeError, "'o' has dtype")


@pytest.mark.parametrize("fmt", FORMATS)
def test_ragged_values_are_refused_naming_the_key(fmt, tmp_path):
    refused_before_writing(io.save_state_dict, {"w": np.zeros(2), "r": [[1], [1, 2]]}, tmp_path / f"r.{fmt}",
                           ValueError, "'r' is not an array")


@pytest.mark.parametrize("metadata, match", [
    ({"step": 3}, r"not 'step': 3 \(str: int\)"),
    ({"ok": "yes", "flag": None}, r"'flag': None"),
    ({1: "one"}, r"not 1: 'one' \(int: str\)"),
    ([("a", "b")], r"metadata must be a dict of str to str, not list"),
    ("a=b", r"not str"),
])
def test_safetensors_metadata_must_be_str_to_str(metadata, match, tmp_path):
    save = lambda state, path: io.save_safetensors(state, path, metadata=metadata)  # noqa: E731
    refused_before_writing(save, {"x": np.zeros(2)}, tmp_path / "meta.safetensors", TypeError, match)


def test_safetensors_metadata_of_no_strings(tmp_path):
    for metadata in (None, {}):
        path = tmp_path / "meta.safetensors"
        io.save_safetensors({"x": np.zeros(2)}, path, metadata=metadata)
        assert "__metadata__" not in read_header(path)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_arrays_of_any_layout_round_trip(fmt, tmp_path, rng):
    base = rng.standard_normal((4, 6))
    state = {
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "strided": base[::2, ::3],
        "reversed": base[::-1],
        "broadcast": np.broadcast_to(np.arange(3.0), (4, 3)),   # zero strides, read-only
        "big_endian": base.astype(">f8"),
        "big_endian_int": np.arange(5, dtype=">i2"),
        "bool": rng.standard_normal(7) > 0,
        "zero_dim": np.array(-1.5),
        "zero_dim_bool": np.array(False),
        "python_scalar": 3,
        "nested_list": [[1.0, 2.0], [3.0, 4.0]],
    }
    path = tmp_path / f"layouts.{fmt}"
    io.save_state_dict(state, path)
    loaded = io.load_state_dict(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        value = np.asarray(value)
        if fmt == "safetensors":      # little-endian on disk, native once loaded
            value = value.astype(value.dtype.newbyteorder("="))
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].flags.writeable, key


def test_npz_keeps_every_numpy_dtype_without_pickle(tmp_path):
    state = {"c": np.array([1 + 2j]), "s": np.array(["ab", "é"]), "b": np.array([b"x"]),
             "t": np.array(["2024-01-01"], "datetime64[D]"), "r": np.zeros(2, [("x", "<f4"), ("漢", "<i2")]),
             "be": np.arange(3, dtype=">f4")}
    path = tmp_path / "dtypes.npz"
    with pytest.warns(UserWarning, match="format 3.0"):     # NumPy's own, for a non-Latin-1 field name
        io.save_state_dict(state, path)
    loaded = io.load_state_dict(path)
    for key, value in state.items():
        assert_identical(loaded[key], value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_paths_as_str_bytes_and_pathlib(fmt, tmp_path):
    state = {"w": np.arange(3.0)}
    target = tmp_path / f"p.{fmt}"
    for path in (target, str(target), os.fsencode(target)):
        io.save_state_dict(state, path)
        assert_identical(io.load_state_dict(path)["w"], state["w"])
    os.remove(target)


def test_empty_state_dicts_round_trip(tmp_path):
    for fmt in FORMATS:
        io.save_state_dict({}, tmp_path / f"empty.{fmt}")
        assert io.load_state_dict(tmp_path / f"empty.{fmt}") == {}


# ---------------------------------------------------------------------------
# The safetensors package, when it is installed, reads what attnkit writes and
# attnkit reads what it writes

@pytest.mark.parametrize("case", list(ARRAYS))
def test_safetensors_package_reads_attnkit_files(case, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ours.safetensors"
    io.save_safetensors({"t": ARRAYS[case], "other": np.ones(3, np.float32)}, path)
    loaded = st.load_file(str(path))
    assert_identical(loaded["t"], ARRAYS[case])
    assert_identical(loaded["other"], np.ones(3, np.float32))


@pytest.mark.parametrize("case", list(ARRAYS))
def test_attnkit_reads_safetensors_package_files(case, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "theirs.safetensors"
    st.save_file({"t": ARRAYS[case], "other": np.ones(3, np.float32)}, str(path), metadata={"k": "v"})
    loaded = io.load_safetensors(path)
    assert set(loaded) == {"t", "other"}
    assert_identical(loaded["t"], ARRAYS[case])


def test_safetensors_package_reads_attnkit_metadata(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    pytest.importorskip("safetensors.numpy")
    path = tmp_path / "meta.safetensors"
    io.save_safetensors({"x": np.arange(3, dtype=np.float64)}, path, metadata={"format": "np", "n": "2"})
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "np", "n": "2"}
        assert_identical(f.get_tensor("x"), np.arange(3, dtype=np.float64))


def test_module_state_dict_through_the_safetensors_package(tmp_path, rng):
    st = pytest.importorskip("safetensors.numpy")
    m = nn.MultiHeadAttention(8, 2, rng=rng)
    path = tmp_path / "mha.safetensors"
    st.save_file({k: np.ascontiguousarray(v) for k, v in m.state_dict().items()}, str(path))
    fresh = nn.MultiHeadAttention(8, 2, rng=np.random.default_rng(99))
    assert fresh.load(path) == ([], [])
    for key, value in m.state_dict().items():
        assert_identical(fresh.state_dict()[key], value)


# ---------------------------------------------------------------------------
# Module.save and Module.load

def mha(seed):
    return nn.MultiHeadAttention(16, 4, batch_first=True, rng=np.random.default_rng(seed)).eval()


def mha_kv(seed):
    return nn.MultiHeadAttention(16, 4, kdim=6, vdim=5, add_bias_kv=True, batch_first=True,
                                 rng=np.random.default_rng(seed)).eval()


def encoder_layer(seed):
    return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True,
                                      rng=np.random.default_rng(seed)).eval()


def run(module, x):
    if isinstance(module, nn.MultiHeadAttention):
        k = x[..., :module.kdim] if module.kdim != module.embed_dim else x
        v = x[..., :module.vdim] if module.vdim != module.embed_dim else x
        out, weights = module(x, np.ascontiguousarray(k), np.ascontiguousarray(v))
        return np.concatenate([out.ravel(), weights.ravel()])
    return module(x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", [mha, mha_kv, encoder_layer], ids=["mha", "mha_kdim_vdim_bias_kv", "encoder_layer"])
def test_module_save_and_load(fmt, make, tmp_path, rng):
    original, fresh = make(0), make(1)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    expected = run(original, x)
    assert not np.allclose(run(fresh, x), expected)      # another seed, other weights
    path = tmp_path / f"module.{fmt}"
    original.save(path)
    assert fresh.load(path) == ([], [])
    np.testing.assert_array_equal(run(fresh, x), expected)
    for key, value in original.state_dict().items():
        assert_identical(fresh.state_dict()[key], value)
    assert list(io.load_state_dict(path)) == list(original.state_dict())


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_with_a_0d_buffer_save_and_load(fmt, tmp_path, rng):
    """BatchNorm1d's num_batches_tracked is a 0-d int64 buffer."""
    bn = nn.BatchNorm1d(4)
    for _ in range(3):
        bn(rng.standard_normal((6, 4)).astype(np.float32))
    path = tmp_path / f"bn.{fmt}"
    bn.save(path)
    fresh = nn.BatchNorm1d(4)
    assert fresh.load(path) == ([], [])
    assert int(fresh.num_batches_tracked) == 3
    for key, value in bn.state_dict().items():
        assert_identical(fresh.state_dict()[key], value)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(fresh.eval()(x), bn.eval()(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_load_refuses_a_file_of_another_module(fmt, tmp_path, rng):
    path = tmp_path / f"lin.{fmt}"
    nn.Linear(4, 4, rng=rng).save(path)
    seq = nn.Sequential([nn.Linear(4, 4, rng=rng)])
    with pytest.raises(KeyError, match=r"missing keys: 0\.weight, 0\.bias.*unexpected keys: weight, bias"):
        seq.load(path)
    missing, unexpected = seq.load(path, strict=False)
    assert missing == ["0.weight", "0.bias"] and sorted(unexpected) == ["bias", "weight"]
    with pytest.raises(ValueError, match=r"'weight'.*\(4, 4\).*\(3, 4\)"):
        nn.Linear(4, 3, rng=rng).load(path)
