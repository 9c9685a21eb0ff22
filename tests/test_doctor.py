"""`aicluster doctor`: every check against real things (sockets, certificates, an embedded
cluster, the installed binding), the pure ones fed the inputs of other PCs."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from cluster import cpubuild, doctor
from cluster.config import load_config
from conftest import ROOT, base_config, free_port
from procs import run

# /proc/cpuinfo flags of two PCs of a home lab (as in test_build.py)
XEON_AMX = set("sse4_1 sse4_2 avx f16c fma bmi2 avx2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
               "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16".split())
RYZEN_AVX2 = set("sse4_1 sse4_2 avx f16c fma bmi2 avx2".split())
INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | OPENMP = 1 | REPACK = 1 |"
RECORD = {"version": "0.3.36", "cmake": "-DGGML_RPC=ON", "cpu": cpubuild.cmake_args(RYZEN_AVX2, "x86_64"),
          "built-for": "x86_64 SSE42 AVX F16C FMA AVX2 BMI2"}
GROUPS = ["versions", "build", "gpu", "models", "smoke", "disk", "ports", "tls"]


def by_check(rows):
    return {r["check"]: r for r in rows}


def statuses(rows):
    return {r["check"]: r["status"] for r in rows}


def tls_config(tmp_path, cert, key, ca=None, address="tls://127.0.0.1:8786"):
    data = base_config()
    data["security"] = {"tls": True, "ca_file": str(ca or cert), "cert_file": str(cert), "key_file": str(key)}
    data["scheduler"]["address"] = address
    return load_config(data)


def self_signed(tmp_path, names, not_before, not_after, stem="pc"):
    """A self-signed certificate (it is its own CA) naming ``names``, valid between the two dates."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- the whole local report ------------------------------------------------------------------
def test_the_local_report_has_every_check_and_a_table():
    report = doctor.run_doctor(load_config(None), smoke=False)
    (section,) = report["sections"]
    rows = section["rows"]
    assert [g for g in GROUPS if any(r["group"] == g for r in rows)] == GROUPS
    checks = by_check(rows)
    for name in ["python", *(f"package {d}" for d in doctor.PACKAGES), "llama.cpp CPU features",
                 "llama.cpp build record", "llama.cpp RPC", "llama.cpp CUDA", "torch CUDA", "NVML", "GPU visibility",
                 "model minilm", "model gemma-270m", "smoke", "disk temp dir", "tls"]:
        assert name in checks, name
    if "NVML not available" in checks["NVML"]["detail"]:  # no GPU here: a clear state, not an error
        assert checks["NVML"]["status"] == "ok"
        assert checks["GPU visibility"]["status"] == "ok" and "agree: 0 GPU" in checks["GPU visibility"]["detail"]
    # the installed binding was built for this CPU, never with AMX
    assert checks["llama.cpp CPU features"]["status"] == "ok", checks["llama.cpp CPU features"]
    assert "llama.cpp AMX" not in checks
    assert checks["llama.cpp RPC"]["detail"] == "on"
    assert {r["check"] for r in rows if r["group"] == "ports"} >= {"port 8786 (scheduler.port)",
                                                                   "port 8787 (scheduler.dashboard_port)",
                                                                   "port 8000 (server.port)"}
    assert checks["tls"]["status"] == "ok" and "skipped" in checks["tls"]["detail"]
    assert all(r["fix"] for r in rows if r["status"] != "ok")
    assert report["exit_code"] == (1 if report["counts"]["fail"] else 0)
    text = doctor.format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith("== this machine") and lines[1].split() == ["check", "status", "detail"]
    assert any(line.startswith("llama.cpp CPU features") and " ok " in line for line in lines)
    assert lines[-1].endswith("failure(s)")


def test_doctor_imports_no_client_stack():
    # workers import cluster.doctor for their checks
    code = "import sys, cluster.doctor; print(sorted(m for m in ('distributed', 'torch', 'cryptography') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_cli_prints_json_and_exits_1_on_a_failing_row(tmp_path, env_with_tests):
    p = run(["doctor", "--no-smoke", "--json"], env_with_tests, timeout=120)
    report = json.loads(p.stdout)
    rows = report["sections"][0]["rows"]
    assert {r["group"] for r in rows} == set(GROUPS)
    assert {"check", "status", "detail", "fix", "group"} == set(rows[0])
    assert p.returncode == (1 if any(r["status"] == "fail" for r in rows) else 0), p.stderr
    # a model whose file is not on this PC fails, with the fix in the table, and the exit status says so
    data = base_config()
    data["models"]["absent"] = {"backend": "llamacpp", "source": str(tmp_path / "nowhere.gguf"), "tier": "CPU"}
    data["models"]["unpackaged"] = {"backend": "llamacpp", "source": "package:no_such_model_pkg", "tier": "CPU"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    p = run(["doctor", "--no-smoke", "--config", str(tmp_path / "config.yaml")], env_with_tests, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert any(line.startswith("model absent") and "FAIL" in line for line in p.stdout.splitlines()), p.stdout
    assert "fix: pip install no-such-model-pkg" in p.stdout
    assert "does not exist on this PC" in p.stdout


@pytest.mark.slow
def test_the_cli_smoke_checks_every_shipped_model(env_with_tests):
    p = run(["doctor", "--json"], env_with_tests, timeout=600)
    rows = by_check(json.loads(p.stdout)["sections"][0]["rows"])
    for name in ("minilm", "gemma-270m"):
        assert rows[f"smoke {name}"]["status"] == "ok", rows[f"smoke {name}"]
    assert "decoded" in rows["smoke gemma-270m"]["detail"] and "embedded" in rows["smoke minilm"]["detail"]
    assert "smoke gemma-270m-split" not in rows  # the same file as gemma-270m


# -- 2. the binding's build against the CPU --------------------------------------------------------
def test_a_binding_with_features_the_cpu_lacks_or_with_amx_fails():
    avx512 = INFO.replace("BMI2 = 1", "BMI2 = 1 | AVX512 = 1")
    rows = by_check(doctor.build_rows(avx512, RYZEN_AVX2, RECORD, machine="x86_64", rpc=True))
    assert rows["llama.cpp CPU features"]["status"] == "fail"
    assert "AVX512" in rows["llama.cpp CPU features"]["detail"] and "SIGILL" in rows["llama.cpp CPU features"]["detail"]
    fix = rows["llama.cpp CPU features"]["fix"]
    assert fix.startswith('make install LLAMA_CPU_ARGS="') and "-DGGML_AVX512=OFF" in fix and "-DGGML_AVX2=ON" in fix
    assert rows["llama.cpp build record"]["status"] == "warn"  # reports more than make install built

    amx = INFO.replace("BMI2 = 1", "BMI2 = 1 | AMX_INT8 = 1")
    rows = by_check(doctor.build_rows(amx, XEON_AMX, RECORD, machine="x86_64", rpc=True))
    assert rows["llama.cpp AMX"]["status"] == "fail" and doctor.AMX_ISSUE in rows["llama.cpp AMX"]["detail"]
    assert "-DGGML_AMX_INT8=OFF" in rows["llama.cpp AMX"]["fix"]
    assert rows["llama.cpp CPU features"]["status"] == "ok"  # the Xeon has AMX; the kernels crash all the same


def test_a_binding_built_for_this_cpu_passes_and_the_rest_is_said():
    rows = doctor.build_rows(INFO, RYZEN_AVX2, RECORD, machine="x86_64", rpc=True)
    assert statuses(rows) == {"llama.cpp CPU features": "ok", "llama.cpp build record": "ok", "llama.cpp RPC": "ok",
                              "llama.cpp CUDA": "ok"}
    rows = by_check(doctor.build_rows(INFO, RYZEN_AVX2, {}, machine="x86_64", rpc=False, gpus=1, need_rpc=True))
    assert rows["llama.cpp build record"]["status"] == "warn" and rows["llama.cpp build record"]["fix"] == "make install"
    assert rows["llama.cpp RPC"]["status"] == "warn" and "-DGGML_RPC=ON" in rows["llama.cpp RPC"]["fix"]
    assert rows["llama.cpp CUDA"]["status"] == "warn" and "-DGGML_CUDA=ON" in rows["llama.cpp CUDA"]["fix"]
    assert doctor.build_rows("CPU : NEON = 1 |", {"asimd"}, RECORD, machine="aarch64")[0]["status"] == "ok"


# -- 4. model files ------------------------------------------------------------------------------
def test_model_sources_sizes_and_checksums(tmp_path):
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"weights!" * 896)
    data = base_config()
    data["models"] = {"tiny": {"backend": "llamacpp", "source": str(weights), "tier": "CPU"},
                      "minilm": base_config()["models"]["minilm"]}
    cfg = load_config(data)
    rows = by_check(doctor.model_rows(cfg))
    assert rows["model tiny"]["status"] == "ok" and "7.00 kiB" in rows["model tiny"]["detail"]
    assert "sha256" not in rows["model tiny"]["detail"]  # only with --checksums
    rows = by_check(doctor.model_rows(cfg, checksums=True))
    assert hashlib.sha256(b"weights!" * 896).hexdigest() in rows["model tiny"]["detail"]
    assert "sha256" in rows["model minilm"]["detail"]  # a folder: hashed file by file


# -- 6. disk ------------------------------------------------------------------------------------
def test_free_disk_of_the_caches(tmp_path):
    rows = doctor.disk_rows(dirs={"missing cache": tmp_path / "not" / "yet"})
    assert rows[0]["status"] == "ok" and "free at" in rows[0]["detail"]
    rows = doctor.disk_rows(min_free=1 << 62)
    assert {r["check"] for r in rows} == {"disk aicluster cache", "disk Hugging Face cache", "disk temp dir"}
    assert all(r["status"] == "warn" and r["fix"] for r in rows)


# -- 7. ports ----------------------------------------------------------------------------------
def test_a_port_held_by_a_listening_socket_shows_who_holds_it():
    data = base_config()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        data["server"]["port"] = port
        data["worker"]["shard_server"] = True
        rows = by_check(doctor.port_rows(load_config(data)))
        held = rows[f"port {port} (server.port)"]
        assert held["status"] == "warn" and "in use" in held["detail"], held
        assert f"pid {os.getpid()} " in held["detail"] and f"kill {os.getpid()}" in held["fix"]
        assert "server.port" in held["fix"]
        assert "port 50052 (worker.shard_port)" in rows
    # closed: free again
    assert by_check(doctor.port_rows(load_config(data)))[f"port {port} (server.port)"]["detail"] == "free"


# -- 8. TLS --------------------------------------------------------------------------------------
def test_an_expired_certificate_fails_and_one_about_to_expire_warns(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"], now - 30 * day, now - day, "old")
    rows = by_check(doctor.tls_rows(tls_config(tmp_path, cert, key)))
    assert rows["tls certificate"]["status"] == "fail" and "expired on" in rows["tls certificate"]["detail"]
    assert rows["tls CA"]["status"] == "fail"  # the same self-signed file
    assert "aicluster certs" in rows["tls certificate"]["fix"]
    assert rows["tls key"]["status"] == "ok" and rows["tls signed by CA"]["status"] == "ok"
    assert rows["tls host names"]["status"] == "ok"  # names the scheduler's host, 127.0.0.1

    cert, key = self_signed(tmp_path, ["otherpc"], now - day, now + 5 * day, "soon")
    rows = by_check(doctor.tls_rows(tls_config(tmp_path, cert, key, address="tls://192.168.1.10:8786"),
                                    names={"pc1", "192.168.1.11"}))
    assert rows["tls certificate"]["status"] == "warn" and "(5 days)" in rows["tls certificate"]["detail"]
    assert rows["tls host names"]["status"] == "warn" and "not this PC" in rows["tls host names"]["detail"]
    # the key of another certificate
    other, other_key = self_signed(tmp_path, ["pc1"], now - day, now + 90 * day, "other")
    rows = by_check(doctor.tls_rows(tls_config(tmp_path, cert, other_key, ca=other)))
    assert rows["tls key"]["status"] == "fail" and rows["tls signed by CA"]["status"] == "fail"


def test_certificates_from_aicluster_certs_pass(tmp_path):
    from cluster.security import make_certs

    me = socket.gethostname()
    made = make_certs(tmp_path, [me], days=90)
    cert, key = made["hosts"][me]
    rows = doctor.tls_rows(tls_config(tmp_path, cert, key, ca=made["ca"]))
    assert statuses(rows) == {"tls CA": "ok", "tls certificate": "ok", "tls signed by CA": "ok", "tls key": "ok",
                              "tls host names": "ok"}, rows
    assert me.lower() in by_check(rows)["tls host names"]["detail"]


# -- 9. a running cluster ------------------------------------------------------------------------
def test_clock_offsets():
    assert doctor.clock_row(0.2, 0.01)["status"] == "ok"
    assert doctor.clock_row(-2.5, 0.01)["status"] == "warn"
    late = doctor.clock_row(45, 0.01)
    assert late["status"] == "fail" and "timedatectl" in late["fix"] and "+45.000 s" in late["detail"]


@pytest.mark.slow
def test_against_a_running_cluster_every_worker_has_a_section_and_a_clock_offset(tiers):
    report = doctor.run_doctor(tiers.config, address=tiers.scheduler_address, smoke=False)
    sections = report["sections"]
    assert [s["pc"] for s in sections] == ["this machine", "cpu", "pc1", "pc2"]
    for s in sections[1:]:
        rows = by_check(s["rows"])
        assert s["host"] == socket.gethostname() and s["address"].startswith(("tcp://", "inproc://"))
        assert rows["clock offset"]["status"] == "ok", rows["clock offset"]
        assert abs(float(rows["clock offset"]["detail"].split()[0])) < 1
        assert rows["llama.cpp CPU features"]["status"] == "ok" and rows["package dask"]["status"] == "ok"
        assert {r["group"] for r in s["rows"]} == set(GROUPS) | {"clock"}
    text = doctor.format_report(report)
    assert "== pc1 (" in text and text.count("clock offset") == 3


@pytest.mark.slow
def test_an_unreachable_scheduler_is_a_failing_row():
    report = doctor.run_doctor(load_config(None), address=f"tcp://127.0.0.1:{free_port()}", smoke=False, timeout=2)
    (row,) = report["sections"][-1]["rows"]
    assert row["check"] == "scheduler" and row["status"] == "fail" and report["exit_code"] == 1
