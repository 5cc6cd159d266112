"""A network DVC remote: SSH (dvc-ssh) against a real OpenSSH server (Debian's openssh-server)
on a free 127.0.0.1 port, with its own host key and a client key made by the test. A project
pushes its cached outputs there; a fresh clone in another folder pulls them back byte-identical
and finds nothing stale."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _free_port, need_service, terminate

BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")


@pytest.fixture
def sshd(tmp_path):
    """``(port, user, client key)`` of an OpenSSH server on 127.0.0.1 that accepts that key."""
    if not SSHD.is_file() or shutil.which("ssh-keygen") is None:
        need_service("OpenSSH server", f"{SSHD} or ssh-keygen not found (apt-get install openssh-server)")
    try:
        import dvc_ssh  # noqa: F401
    except ImportError:
        need_service("dvc-ssh", "the dvc-ssh package is not installed (pip install -e '.[test]')")
    folder = tmp_path / "sshd"
    folder.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    os.chmod(folder / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    log = open(folder / "sshd.log", "w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    user = getpass.getuser()
    probe = ["ssh", "-i", str(folder / "client_key"), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
             f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "BatchMode=yes", f"{user}@127.0.0.1", "true"]  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert proc.poll() is None, (folder / "sshd.log").read_text()
            assert time.monotonic() < deadline, (folder / "sshd.log").read_text()
            time.sleep(0.3)
        yield port, user, folder / "client_key"
    finally:
        terminate(proc)
        log.close()


def _sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_push_to_an_ssh_remote_and_pull_into_a_fresh_clone(tmp_path, sshd):
    port, user, key = sshd
    dvc, git = str(BIN / "dvc"), ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    work = tmp_path / "work"
    work.mkdir()
    _sh(["git", "init", "-q"], work)
    _sh([dvc, "init", "-q"], work)
    # A stage with a folder output (as a run folder: weights, masks) and a payload worth checking.
    (work / "make.py").write_text("import os, pathlib\nout = pathlib.Path('run'); out.mkdir(exist_ok=True)\n"
                                  "(out / 'masks.safetensors').write_bytes(os.urandom(200_000))\n"
                                  "(out / 'config.json').write_text('{}')\n")  # fmt: skip
    _sh([dvc, "stage", "add", "-q", "-n", "make", "-d", "make.py", "-o", "run", f"{sys.executable} make.py"], work)
    _sh([dvc, "repro", "-q"], work)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    _sh([dvc, "remote", "add", "-d", "team", f"ssh://{user}@127.0.0.1:{port}{remote_dir}"], work)
    _sh([dvc, "remote", "modify", "--local", "team", "keyfile", str(key)], work)
    _sh([dvc, "push", "-q"], work)
    assert any(p.is_file() for p in (remote_dir / "files").rglob("*")), "nothing arrived on the SSH remote"
    _sh(git + ["add", "-A"], work)
    _sh(git + ["commit", "-q", "-m", "run"], work)

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(work), str(clone)], tmp_path)
    _sh([dvc, "remote", "modify", "--local", "team", "keyfile", str(key)], clone)
    _sh([dvc, "pull", "-q"], clone)
    assert (clone / "run" / "masks.safetensors").read_bytes() == (work / "run" / "masks.safetensors").read_bytes()
    assert "up to date" in _sh([dvc, "status"], clone)
    assert "Running stage" not in _sh([dvc, "repro"], clone)
