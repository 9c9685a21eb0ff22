"""Safe by default: where every process listens, mutual TLS end to end, address checks.

All processes are real (`aicluster up|scheduler|worker|status|jobs|embed|certs`,
`dask worker --preload cluster.worker`); GPUs are injected through the inventory seam where
a tier is needed. Sockets are read from the kernel (psutil), not from our own reports.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml
from distributed import Client
from distributed.security import Security

from conftest import BIN, base_config, free_port
from procs import listening, proc, read_until, run

pytestmark = pytest.mark.slow

WARNING = "without TLS; anyone who can reach these ports can run code on this machine"
HTTP_WARNING = "without TLS; anyone on the network can read its dashboard"


def test_embedded_cluster_listens_on_loopback_only(env_with_tests):
    port = free_port()
    with proc(["aicluster", "up", "--scheduler-port", str(port), "--dashboard-port", "0"], env_with_tests) as up:
        out = read_until(up, "running; Ctrl-C to stop", timeout=120)
        socks = listening(up.pid)
        # scheduler, dashboard, and for each of 3 workers: nanny, worker and its HTTP server
        assert len(socks) >= 2 + 3 * 3, socks
        assert {ip for ip, _ in socks} == {"127.0.0.1"}, socks
        assert ("127.0.0.1", port) in socks
        assert WARNING not in out


def test_scheduler_and_worker_listen_where_told_and_warn_when_open(tmp_path, env_with_tests):
    port, wport, nport = free_port(), free_port(), free_port()
    with proc(["aicluster", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-port", "0"],
              env_with_tests) as sched:
        out = read_until(sched, "scheduler at")
        assert {ip for ip, _ in listening(sched.pid)} == {"127.0.0.1"}
        with proc(["aicluster", "worker", f"tcp://127.0.0.1:{port}", "--tier", "CPU", "--host", "127.0.0.1",
                   "--worker-port", str(wport), "--nanny-port", str(nport)], env_with_tests) as worker:
            read_until(worker, "joined the scheduler")
            socks = listening(worker.pid)
            assert {ip for ip, _ in socks} == {"127.0.0.1"}, socks
            assert {("127.0.0.1", wport), ("127.0.0.1", nport)} <= socks
        assert WARNING not in out + "".join(list(sched.lines.queue))

    # the LAN default (every interface, no TLS) says so in one line, as does a plain dask worker
    port = free_port()
    with proc(["aicluster", "scheduler", "--port", str(port), "--dashboard-port", "0"], env_with_tests) as sched:
        out = read_until(sched, WARNING)
        assert "0.0.0.0" in out and "(every interface)" in out
        assert ("0.0.0.0", port) in listening(sched.pid)
        with proc(["dask", "worker", f"tcp://127.0.0.1:{port}", "--preload", "cluster.worker", "--nthreads", "1",
                   "--no-dashboard"], env_with_tests) as w:
            line = read_until(w, WARNING)
            assert "this worker and its nanny: listening on tcp://0.0.0.0:" in line


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    out = subprocess.run([str(BIN / "aicluster"), "certs", str(d / "lab"), "--hosts",
                          f"{socket.gethostname()},pc2=192.168.1.11"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tls: true" in out.stdout and "{hostname}.pem" in out.stdout
    other = subprocess.run([str(BIN / "aicluster"), "certs", str(d / "other"), "--hosts", "stranger"],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    return d


def test_certs_are_a_ca_and_private_key_pairs(certs):
    from cryptography import x509

    lab = certs / "lab"
    assert sorted(p.name for p in lab.iterdir()) == sorted(
        ["ca.pem", "ca.key", f"{socket.gethostname()}.pem", f"{socket.gethostname()}.key", "pc2.pem", "pc2.key"])
    for key in lab.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((lab / "ca.pem").read_bytes())
    pc2 = x509.load_pem_x509_certificate((lab / "pc2.pem").read_bytes())
    assert pc2.issuer == ca.subject
    pc2.verify_directly_issued_by(ca)
    sans = pc2.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "pc2" in sans.get_values_for_type(x509.DNSName)
    assert "192.168.1.11" in {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    # again for the same host: refused without --force; a new host is signed by the same CA
    again = subprocess.run([str(BIN / "aicluster"), "certs", str(lab), "--hosts", "pc2"], capture_output=True, text=True)
    assert again.returncode != 0 and "already exist" in again.stderr and "--force" in again.stderr
    more = subprocess.run([str(BIN / "aicluster"), "certs", str(lab), "--hosts", "pc3"], capture_output=True, text=True)
    assert more.returncode == 0, more.stderr
    x509.load_pem_x509_certificate((lab / "pc3.pem").read_bytes()).verify_directly_issued_by(ca)
    # a folder with the CA's certificate but not its key (a worker PC) makes no new CA
    pc = certs / "on-a-worker-pc"
    pc.mkdir()
    (pc / "ca.pem").write_bytes((lab / "ca.pem").read_bytes())
    r = subprocess.run([str(BIN / "aicluster"), "certs", str(pc), "--hosts", "pc4"], capture_output=True, text=True)
    assert r.returncode != 0 and "ca.key does not" in r.stderr
    assert (pc / "ca.pem").read_bytes() == (lab / "ca.pem").read_bytes() and not (pc / "pc4.pem").exists()


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    """`aicluster up` with security.tls: true (one config.yaml naming {hostname}'s files)."""
    d = tmp_path_factory.mktemp("tls")
    data = base_config()
    port, dport = free_port(), free_port()
    data["security"] = {"tls": True, "ca_file": str(certs / "lab" / "ca.pem"),
                        "cert_file": str(certs / "lab" / "{hostname}.pem"), "key_file": str(certs / "lab" / "{hostname}.key")}
    data["scheduler"].update(address=f"tls://127.0.0.1:{port}", port=port, dashboard_port=dport)
    cfg = d / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "AICLUSTER_CONFIG": str(cfg), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with proc(["aicluster", "up"], env) as up:
        out = read_until(up, "running; Ctrl-C to stop", timeout=150)
        assert f"scheduler: tls://127.0.0.1:{port}" in out
        assert f"dashboard: https://127.0.0.1:{dport}/status" in out
        yield {"address": f"tls://127.0.0.1:{port}", "dashboard": f"127.0.0.1:{dport}", "env": env, "config": cfg,
               "certs": certs, "proc": up, "dir": d}


def _security(certs, name):
    return Security(tls_ca_file=str(certs / name / "ca.pem"), tls_client_cert=str(certs / name / f"{_host(name)}.pem"),
                    tls_client_key=str(certs / name / f"{_host(name)}.key"), require_encryption=True)


def _host(name):
    return socket.gethostname() if name == "lab" else "stranger"


def test_tls_cluster_serves_cli_commands(tls_cluster):
    env = tls_cluster["env"]
    st = run(["status", "--json"], env)
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)["workers"]
    assert sorted(r["name"] for r in rows) == ["cpu", "pc1", "pc2"]
    assert all(r["address"].startswith("tls://") for r in rows)
    assert json.loads(st.stdout)["dashboard"].startswith("https://")
    texts = tls_cluster["dir"] / "t.txt"
    texts.write_text("graphics cards\nhome lab\n")
    emb = run(["embed", str(texts), "-o", str(tls_cluster["dir"] / "v.npy"), "--address", tls_cluster["address"]], env)
    assert emb.returncode == 0, emb.stderr
    jobs = run(["jobs", "--json"], env)
    assert jobs.returncode == 0, jobs.stderr
    assert any(j["kind"] == "embed" and j["state"] == "done" for j in json.loads(jobs.stdout))
    # a plain TCP address to a TLS cluster: one line that says what to write
    bad = run(["status", tls_cluster["address"].replace("tls://", "tcp://")], env)
    assert bad.returncode != 0 and "use tls://" in bad.stderr and "Traceback" not in bad.stderr


def test_dask_worker_joins_over_tls(tls_cluster):
    c = tls_cluster["certs"] / "lab"
    env = {**tls_cluster["env"], "AICLUSTER_FAKE_GPUS": "GTX 1660:6GB"}
    args = ["dask", "worker", tls_cluster["address"], "--preload", "cluster.worker", "--nthreads", "1", "--no-dashboard",
            "--name", "pc4", "--tls-ca-file", str(c / "ca.pem"), "--tls-cert", str(c / f"{socket.gethostname()}.pem"),
            "--tls-key", str(c / f"{socket.gethostname()}.key"), "--host", "127.0.0.1",
            "--dashboard-address", "127.0.0.1:0"]
    with proc(args, env) as w, Client(tls_cluster["address"], security=_security(tls_cluster["certs"], "lab")) as client:
        client.wait_for_workers(4, timeout=90)
        info = {v["name"]: v for v in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert info["pc4"]["resources"] == {"VRAM6": 1}
        assert client.submit(lambda: 6 * 7, resources={"VRAM6": 1}, workers=[info["pc4"]["id"]]).result(timeout=60) == 42
        said = "".join(list(w.lines.queue))
        assert WARNING not in said and HTTP_WARNING not in said


def test_strangers_are_refused(tls_cluster):
    host, port = tls_cluster["address"].removeprefix("tls://").rsplit(":", 1)
    # a client with no certificate: the TLS handshake is refused by the scheduler
    ctx = ssl.create_default_context(cafile=str(tls_cluster["certs"] / "lab" / "ca.pem"))
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(b"\x00" * 64)
            if not s.recv(1):  # TLS 1.3 reports the refused certificate on the first read
                raise ConnectionResetError("closed")
    # a client whose certificate another CA signed (it trusts the cluster's CA, so only the
    # scheduler's check of the client's certificate can refuse it)
    other = tls_cluster["certs"] / "other"
    stranger = Security(tls_ca_file=str(tls_cluster["certs"] / "lab" / "ca.pem"), tls_client_cert=str(other / "stranger.pem"),
                        tls_client_key=str(other / "stranger.key"), require_encryption=True)
    with pytest.raises(OSError, match="TLS|certificate|SSL"):
        Client(tls_cluster["address"], security=stranger, timeout=10)
    # the same client with the cluster's own certificate gets in: the refusals above are the certificates'
    with Client(tls_cluster["address"], security=_security(tls_cluster["certs"], "lab"), timeout=10) as c:
        assert len(c.scheduler_info(n_workers=-1)["workers"]) >= 3


def test_dashboard_is_https_only(tls_cluster):
    base = tls_cluster["dashboard"]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{base}/status", timeout=10).read()
    ctx = ssl.create_default_context(cafile=str(tls_cluster["certs"] / "lab" / "ca.pem"))
    rows = json.loads(urllib.request.urlopen(f"https://{base}/aicluster/workers.json", context=ctx, timeout=10).read())
    assert len(rows["workers"]) >= 3
    metrics = urllib.request.urlopen(f"https://{base}/metrics", context=ctx, timeout=10).read().decode()
    assert "aicluster_workers" in metrics
    page = urllib.request.urlopen(f"https://{base}/individual-aicluster-models", context=ctx, timeout=30).read()
    assert b"bokeh" in page.lower()


@pytest.mark.parametrize("address, says", [
    ("http://127.0.0.1:8787", "is a web address"),
    ("udp://127.0.0.1:8786", "is not supported"),
    ("tcp://127.0.0.1", "has no port"),
    ("tls://127.0.0.1:8786", "security.tls is false"),
    ("tcp://no-such-host.invalid:8786", "does not resolve"),
])
def test_bad_addresses_are_one_line_errors(address, says, env_with_tests, tmp_path):
    for args in (["status", address], ["worker", address, "--once"], ["embed", str(tmp_path / "x"), "-o",
                                                                        str(tmp_path / "v.npy"), "--address", address]):
        (tmp_path / "x").write_text("a text\n")
        r = run(args, env_with_tests, timeout=60)
        assert r.returncode != 0, args
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    from cluster import connect

    with pytest.raises(ValueError, match=says):
        connect(address=address)


def test_aicluster_scheduler_and_worker_over_tls(tls_cluster):
    """The multi-PC commands with the same TLS config: a scheduler, a worker that joins it,
    `aicluster status`; nothing says it is open, since everything is encrypted."""
    data = yaml.safe_load(tls_cluster["config"].read_text())
    port = free_port()
    data["scheduler"].update(address=f"tls://127.0.0.1:{port}", port=port, dashboard_port=0)
    cfg = tls_cluster["dir"] / "lan.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**tls_cluster["env"], "AICLUSTER_CONFIG": str(cfg)}
    with proc(["aicluster", "scheduler"], env) as sched:
        out = read_until(sched, "scheduler at")
        assert "scheduler at tls://" in out and "dashboard https://" in out
        with proc(["aicluster", "worker", "--tier", "VRAM6", "--name", "pc2"], env) as w:
            read_until(w, "joined the scheduler")
            st = run(["status", "--json"], env)
            assert st.returncode == 0, st.stderr
            assert [r["name"] for r in json.loads(st.stdout)["workers"]] == ["pc2"]
            said = out + "".join(list(sched.lines.queue)) + "".join(list(w.lines.queue))
            assert WARNING not in said and HTTP_WARNING not in said


def test_shard_servers_behind_the_clusters_tls_refuse_strangers(certs):
    """With security.tls a shard server listens on 127.0.0.1 only, behind a mutual-TLS
    tunnel with the cluster's certificates: a head with a certificate of the cluster's CA
    gets through (ggml RPC HELLO answered), plain TCP and a certificate of another CA do not."""
    import ssl

    import psutil
    from distributed.security import Security

    from cluster.shard_servers import ShardServer
    from workloads.shard_protocol import RPC_PROTO, ShardServerError, probe
    from workloads.tls_tunnel import reach

    lab, host = certs / "lab", socket.gethostname()

    def ctx(folder, name, listen):
        sec = Security(tls_ca_file=str(folder / "ca.pem"), tls_worker_cert=str(folder / f"{name}.pem"),
                       tls_worker_key=str(folder / f"{name}.key"), require_encryption=True)
        return (sec.get_listen_args if listen else sec.get_connection_args)("worker")["ssl_context"]

    srv = ShardServer("127.0.0.1", 0, name="pc1", tls=ctx(lab, host, True)).start()
    try:
        assert srv.wait_ready(30), srv.last_error
        assert srv.info()["tls"] is True
        listens = {c.laddr for c in psutil.Process(srv.proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert listens and all(a.ip == "127.0.0.1" for a in listens) and srv.port not in {a.port for a in listens}
        tunnel, via = reach([srv.endpoint], ctx(lab, "pc2", False))
        try:
            assert probe(via[srv.endpoint])[:2] == RPC_PROTO
        finally:
            tunnel.close()
        # a head on the server's own PC goes straight to the inner port: no tunnel on loopback
        local = srv.info()["local"]
        assert local.startswith("127.0.0.1:") and local != srv.endpoint
        tunnel, via = reach([srv.endpoint], ctx(lab, "pc2", False), local={srv.endpoint: local})
        assert tunnel is None and via == {srv.endpoint: local} and probe(local)[:2] == RPC_PROTO
        with pytest.raises(ShardServerError):  # plain ggml RPC on the TLS port
            probe(srv.endpoint, timeout=3)
        tunnel, via = reach([srv.endpoint], ctx(certs / "other", "stranger", False))
        try:
            with pytest.raises(ShardServerError):  # a certificate the cluster's CA did not sign
                probe(via[srv.endpoint], timeout=3)
        finally:
            tunnel.close()
        without = ssl.create_default_context(cafile=str(lab / "ca.pem"))
        without.check_hostname = False
        tunnel, via = reach([srv.endpoint], without)
        try:
            with pytest.raises(ShardServerError):  # no client certificate at all
                probe(via[srv.endpoint], timeout=3)
        finally:
            tunnel.close()
    finally:
        srv.stop()
