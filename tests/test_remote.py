"""evaluate.remote: `evaluate.latency MODEL --device ssh://...` end to end against an sshd this test starts on
127.0.0.1 (unprivileged port, key pair made here); the host is x86 and must be labelled so, never as ARM.

Needs OpenSSH's server and client (`.ci/run` installs them); skipped with the reason when sshd is absent.
"""
from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluate import latency
from evaluate.remote import measure_remote, parse_device, records
from facekd.io import FacekdError
from test_latency import tiny_onnx as make_tiny_onnx

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("remote") / "tiny.onnx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PermitRootLogin yes\nPidFile {d / 'sshd.pid'}\n")
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {d / 'user'}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n"
        f"  StrictHostKeyChecking yes\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on as root
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.1)
    env = {"FACEKD_SSH_CONFIG": str(d / "ssh_config"), "FACEKD_REMOTE_PYTHON": sys.executable}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"ssh://{os.environ.get('USER') or __import__('getpass').getuser()}@127.0.0.1:{port}"
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow
def test_ssh_device_end_to_end_labels_x86_honestly(sshd, tiny_onnx, tmp_path, capsys):
    rec = measure_remote([tiny_onnx], sshd, runs=5, warmup=1)[0]
    assert rec["runtime"] == "onnxruntime" and rec["median_ms"] > 0 and rec["p90_ms"] >= rec["median_ms"]
    assert rec["machine"] == platform.machine()  # what the device said, not what we assumed
    host = latency.system_info()
    assert host["cpu"] in rec["device"] and platform.machine() in rec["device"] and sshd in rec["device"]
    if platform.machine() not in ("aarch64", "arm64"):
        assert rec["arm_latency_ms"] is None and rec["arm_device"] is None
    assert not Path(rec["remote_dir"]).exists()  # the device-side copy is cleaned up
    # through the CLI hook, writing the results table: an x86 device leaves the ARM columns empty
    from facekd import table

    csv = tmp_path / "summary.csv"
    table.upsert_rows([{"stage": "int8", "model": "tiny", "run": "r", "dataset": "d", "artifact": str(tiny_onnx)}],
                      csv)
    assert latency.main([str(tiny_onnx), "--device", sshd, "--runs", "3", "--warmup", "0", "--table", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "not ARM: arm_ columns left empty" in out and "onnxruntime" in out
    row = table.read_rows(csv)[0]
    assert row["arm_latency_ms"] == "" and row["arm_device"] == ""


def test_arm_device_fills_arm_columns_from_its_own_report():
    report = {"machine": "aarch64", "cores": 4, "cpuinfo": {"model name": "", "hardware": "", "cpu part": "0xd08"},
              "models": {"m.onnx": {"median_ms": 12.5, "p90_ms": 13.0, "runtime": "onnxruntime"}}}
    rec = records(report, [Path("runs/x/m.onnx")], "ssh://pi@rpi4")[0]
    assert rec["arm_latency_ms"] == 12.5 and rec["arm_device"] == "Cortex-A72 x4 aarch64 via ssh://pi@rpi4"
    report["machine"] = "x86_64"
    assert records(report, [Path("m.onnx")], "ssh://a@b")[0]["arm_latency_ms"] is None


def test_device_spec_errors(tiny_onnx, capsys):
    assert parse_device("ssh://u@h:2222").port == 2222 and parse_device("adb:R58M").target == "R58M"
    for bad in ("ftp://h", "ssh://", "ssh://u@h:99999", "adb:"):
        with pytest.raises(FacekdError, match="--device"):
            parse_device(bad)
    with pytest.raises(SystemExit) as exc:
        latency.main([str(tiny_onnx), "--device", "ftp://h"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --device 'ftp://h': expected ssh://user@host[:port] or adb:SERIAL"
