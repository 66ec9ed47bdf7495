"""attnkit.io: state dicts in .npz and .safetensors files, read and written
with NumPy alone; checked against the safetensors format as documented (files
crafted by hand here) and, where the `safetensors` package is installed,
against its reader and writer."""
import json
import struct

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
    io.save_safetensors({"x": np.zeros(2, np.float32)}, path, metadata={"format": "pt", "step": 3})
    header, _, _ = read_header(path)
    assert header["__metadata__"] == {"format": "pt", "step": "3"}   # the format holds strings
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


@pytest.mark.parametrize("offsets", [[0, 400], [8, 4], [-4, 4], [16, 24]])
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
    with pytest.raises(ValueError, match=r"'x' holds 4 values, not shape \(3, 2\)"):
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
    io.save_safetensors({"x": np.arange(3, dtype=np.float64)}, path, metadata={"format": "np", "n": 2})
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
