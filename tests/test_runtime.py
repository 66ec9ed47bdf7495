"""SIMD dispatch, threads, fork safety and the build report."""
import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from attnkit import _runtime, reference


def run_python(code, env_extra=None, timeout=120):
    """Run code in a fresh interpreter (outside the source tree); return stdout.
    env_extra: variables to set, or to remove where the value is None."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNKIT_", "OMP_"))}
    for name, value in (env_extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


@pytest.fixture
def threads():
    """Restore the thread count after a test that changes it."""
    before = attnkit.get_num_threads()
    yield
    attnkit.set_num_threads(before)


# ---------------------------------------------------------------------------
# SIMD paths

def test_best_path_is_chosen_by_default():
    out, _ = run_python("""
        import attnkit, json
        print(json.dumps([attnkit.simd_path(), attnkit.supported_simd_paths()]))
    """)
    path, supported = json.loads(out)
    assert path == supported[-1]
    assert supported[0] == "scalar"


@pytest.mark.parametrize("path", _runtime.supported_simd_paths())
def test_environment_variable_forces_a_path(path):
    out, _ = run_python("""
        import attnkit, numpy as np
        x = np.linspace(-5, 5, 999, dtype=np.float32).reshape(9, 111)
        print(attnkit.simd_path())
        print(np.abs(attnkit.softmax(x) - attnkit.reference.softmax(x)).max())
    """, {"ATTNKIT_CPU": path.upper()})
    chosen, err = out.split()
    assert chosen == path and float(err) < 1e-6


def test_environment_variable_asking_too_much_or_nonsense_warns():
    supported = _runtime.supported_simd_paths()
    cases = [("pentium", "is not one of")]
    if "avx512" not in supported:
        cases.append(("avx512", "does not support avx512"))
    for value, message in cases:
        out, err = run_python("import attnkit; print(attnkit.simd_path())", {"ATTNKIT_CPU": value})
        assert out.strip() == supported[-1]
        assert "RuntimeWarning" in err and message in err


def test_use_simd_path_switches_and_restores():
    before = attnkit.simd_path()
    with _runtime.use_simd_path("scalar"):
        assert attnkit.simd_path() == "scalar"
    assert attnkit.simd_path() == before
    with pytest.raises(ValueError, match="unknown SIMD path"):
        with _runtime.use_simd_path("sse9"):
            pass


def test_paths_agree_with_each_other(rng):
    """Every path computes the same maths: they differ only by rounding."""
    x = (rng.standard_normal((64, 333)) * 4).astype(np.float32)
    results = {}
    for path in _runtime.supported_simd_paths():
        with _runtime.use_simd_path(path):
            results[path] = (attnkit.softmax(x), attnkit.layer_norm(x, 333))
    for sm, ln in results.values():
        np.testing.assert_allclose(sm, results["scalar"][0], rtol=4e-6, atol=1e-9)
        np.testing.assert_allclose(ln, results["scalar"][1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Threads

def test_set_and_get_num_threads(threads):
    attnkit.set_num_threads(3)
    assert attnkit.get_num_threads() == 3
    attnkit.set_num_threads(np.int64(1))
    assert attnkit.get_num_threads() == 1
    with pytest.raises(ValueError, match="at least 1 thread, got 0"):
        attnkit.set_num_threads(0)
    with pytest.raises(TypeError, match="expected an int, got float"):
        attnkit.set_num_threads(2.0)
    with pytest.raises(TypeError):
        attnkit.set_num_threads(True)


def test_omp_num_threads_is_honoured():
    out, _ = run_python("import attnkit; print(attnkit.get_num_threads())", {"OMP_NUM_THREADS": "3"})
    assert out.strip() == "3"


@pytest.mark.parametrize("shape, axis", [((3000, 257), -1), ((40, 300, 33), 1), ((1, 100000), -1)])
def test_results_are_bitwise_identical_across_thread_counts(simd, threads, shape, axis, rng):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    where = rng.random(shape[-1]) < 0.9
    w = rng.standard_normal(shape[-1]).astype(np.float32)

    def run():
        return (attnkit.softmax(x, axis=axis), attnkit.log_softmax(x, axis=axis, where=where),
                attnkit.layer_norm(x, shape[-1], w, w), attnkit.rms_norm(x, shape[-1], w))

    attnkit.set_num_threads(1)
    single = run()
    for n in (2, 3, 7):
        attnkit.set_num_threads(n)
        for a, b in zip(single, run()):
            assert np.array_equal(a, b, equal_nan=True)


def test_concurrent_calls_from_python_threads(threads, rng):
    """The GIL is released in the kernels; calls from many threads at once are
    independent (each thread's call may itself use OpenMP threads)."""
    attnkit.set_num_threads(2)
    inputs = [(rng.standard_normal((500, 300)) * (i + 1)).astype(np.float32) for i in range(8)]
    expected = [(attnkit.softmax(x), attnkit.layer_norm(x, 300)) for x in inputs]

    def work(i):
        for _ in range(20):
            sm, ln = attnkit.softmax(inputs[i]), attnkit.layer_norm(inputs[i], 300)
            if not (np.array_equal(sm, expected[i][0]) and np.array_equal(ln, expected[i][1])):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(8)))


def test_forked_child_after_threaded_parent_does_not_hang():
    """libgomp hangs a child forked after the parent ran a parallel region;
    attnkit's children run single-threaded instead, and get the same answers."""
    out, _ = run_python("""
        import os, sys, numpy as np, attnkit
        attnkit.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((4000, 500)).astype(np.float32)
        expected = attnkit.softmax(x)          # large enough to start a thread team
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(attnkit.softmax(x), expected) and np.array_equal(
                attnkit.layer_norm(x, 500), attnkit.layer_norm(x, 500))
            os.write(write, b"ok" if ok else b"wrong")
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        print(os.read(read, 10).decode())
        print(attnkit.show_config(mode="dicts")["threads"]["single_threaded_after_fork"])
    """, timeout=60)
    assert out.split() == ["ok", "False"]


def test_multiprocessing_fork_pool_works():
    out, _ = run_python("""
        import multiprocessing as mp, numpy as np, attnkit
        attnkit.set_num_threads(2)
        x = np.random.default_rng(1).standard_normal((4000, 500)).astype(np.float32)
        attnkit.softmax(x)
        def child(i):
            import attnkit
            return float(attnkit.softmax(x * i).sum()), attnkit.show_config(mode="dicts")["threads"]["single_threaded_after_fork"]
        with mp.get_context("fork").Pool(2) as pool:
            print(pool.map(child, range(1, 5)))
    """, timeout=60)
    results = eval(out)
    assert [round(s) for s, _ in results] == [4000] * 4
    assert all(flag for _, flag in results)


def test_small_inputs_stay_on_one_thread():
    """A small call never wakes a thread team: it runs the same in a forked
    child (where a team would hang) and the child stays free to use threads."""
    out, _ = run_python("""
        import os, numpy as np, attnkit
        attnkit.set_num_threads(2)
        attnkit.softmax(np.ones((4, 64), np.float32))      # small: no team started
        pid = os.fork()
        if pid == 0:
            single = attnkit.show_config(mode="dicts")["threads"]["single_threaded_after_fork"]
            os._exit(3 if single else 0)
        print(os.waitpid(pid, 0)[1] >> 8)
    """, timeout=60)
    assert out.strip() == "0"


# ---------------------------------------------------------------------------
# show_config

def test_show_config(capsys):
    assert attnkit.show_config() is None
    text = capsys.readouterr().out
    for fragment in ("SIMD path in use", attnkit.simd_path(), "threads", "compiler", "GNU",
                     "-fopenmp", "avx2 flags", "-march=x86-64-v3", "avx512 flags"):
        assert fragment in text
    info = attnkit.show_config(mode="dicts")
    assert info["simd"]["path"] == attnkit.simd_path()
    assert info["simd"]["built"] == ["scalar", "avx2", "avx512"]
    assert info["threads"]["num_threads"] == attnkit.get_num_threads()
    assert info["version"] == attnkit.__version__
    with pytest.raises(ValueError, match="mode must be"):
        attnkit.show_config(mode="yaml")


def test_reference_is_plain_numpy(rng):
    x = rng.standard_normal((3, 4))
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(reference.softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-15)


def test_tests_run_against_the_installed_package():
    """The tests import attnkit as installed (a wheel), not src/ by path."""
    import pathlib
    source_tree = pathlib.Path(__file__).resolve().parent.parent / "src"
    assert source_tree not in pathlib.Path(attnkit.__file__).resolve().parents
    assert pathlib.Path(attnkit._runtime._kernels.__file__).suffix == ".so"


def test_openmp_threads_sleep_between_kernels_and_the_environment_is_restored():
    """attnkit's OpenMP runtime reads OMP_WAIT_POLICY=PASSIVE at import (so its
    idle threads do not spin against NumPy's BLAS threads), and the variable
    is then removed again; a policy the user set is left alone."""
    out, _ = run_python("import os, attnkit; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert out.strip() == "None"
    out, _ = run_python("import os, attnkit; print(os.environ.get('OMP_WAIT_POLICY'))",
                        {"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.strip() == "ACTIVE"


def test_nothing_depends_on_whether_numpy_or_attnkit_is_imported_first():
    """attnkit leaves NumPy's BLAS settings alone (its products are its own),
    so the environment, the configuration and the results are the same in
    either import order."""
    code = ("import os, sys; {first}import attnkit, numpy as np; "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT')); "
            "c = attnkit.show_config(mode='dicts'); print(c['threads']['num_threads'], c['simd']['path']); "
            "rng = np.random.default_rng(0); x = rng.standard_normal((200, 96)); w = rng.standard_normal((64, 96)); "
            "print(attnkit.functional.linear(x, w).tobytes().hex()[:64])")
    first, _ = run_python(code.format(first="import numpy; "), {"OPENBLAS_THREAD_TIMEOUT": None})
    second, _ = run_python(code.format(first=""), {"OPENBLAS_THREAD_TIMEOUT": None})
    assert first == second
    assert first.split("\n")[0] == "None"


def test_threadpoolctl_sees_and_limits_attnkits_threads():
    """threadpoolctl lists attnkit's OpenMP runtime and its limit governs
    attnkit's kernels in the calling thread; set_num_threads shows there."""
    code = ("import attnkit, threadpoolctl; attnkit.set_num_threads(2); "
            "gomp = [i for i in threadpoolctl.threadpool_info() if i['prefix'] == 'libgomp']; "
            "print(len(gomp), gomp[0]['num_threads']); "
            "limits = threadpoolctl.threadpool_limits(1); print(attnkit.get_num_threads()); "
            "limits.restore_original_limits(); print(attnkit.get_num_threads()); "
            "attnkit.set_num_threads(1); "
            "print([i['num_threads'] for i in threadpoolctl.threadpool_info() if i['prefix'] == 'libgomp'][0])")
    out, _ = run_python(code)
    assert out.split() == ["1", "2", "1", "2", "1"]


def test_cython_declarations_are_generated_from_the_kernel_list():
    """_kernels.pxd's kernel block is what tools/generate_pxd.py makes of csrc/kernels.def."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    script = root / "tools" / "generate_pxd.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pxd = (root / "src" / "attnkit" / "_kernels.pxd").read_text()
    for name in ("softmax", "layer_norm", "attention", "linear_backward"):
        assert f"attnkit_{name}_f32(" in pxd and f"attnkit_{name}_f64(" in pxd
