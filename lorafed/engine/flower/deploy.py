"""A local Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, every process stopped on exit.

Each process starts in its own session (process group); :meth:`LocalDeployment.stop` terminates
the whole tree of every process it started (SuperExec, the per-message ``flwr-clientapp``
children and, with ``isolation="process"``, the warm executors included), then kills what is left
after a grace period. Nothing else is touched. If the process that started them dies without
stopping them (``kill -9``, a killed test), Linux sends each of them SIGTERM
(:func:`die_with_parent`), so no SuperLink, SuperNode or executor outlives it and keeps polling.
All listeners bind 127.0.0.1; SuperLink serves its Control, Fleet and ServerAppIo APIs on one
port. Runtime dependency installation is disabled everywhere (no registry access, no torch pull).

With ``secure=True`` (the default) the deployment is what a cross-company one must be, on one machine:
:mod:`lorafed.engine.flower.tls` makes a CA, a server certificate for 127.0.0.1/localhost and one
ECDSA P-384 key pair per SuperNode under ``workdir/tls``; the SuperLink serves TLS
(``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``) with ``--enable-supernode-auth``;
each node's public key is registered with ``flwr supernode register`` over the TLS Control API
before the node starts with ``--root-certificates`` and ``--auth-supernode-private-key``, so a
SuperNode whose key was not registered cannot join. ``secure=False`` is the old ``--insecure``
plaintext deployment, for debugging only. A SuperNode's Runtime API (its local executors' link)
stays plaintext on 127.0.0.1, as in stock Flower.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lorafed.engine.flower.tls import Certificates, make_certificates, make_node_keys
from lorafed.errors import LorafedError

CONNECTION = "lorafed-local"


class DeploymentError(LorafedError):
    """A Flower process did not start, a run failed, or a wait timed out."""


#: ``prctl`` option: the signal a child gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when the process starting it dies; Linux only.

    ``prctl`` is looked up here, in the parent, so the child between fork and exec only calls it.
    If the parent died before the call, the child terminates itself. The signal follows the
    *thread* that started the child, so :class:`LocalDeployment` starts its processes from the
    thread that owns it (the CLI's main thread). ``None`` elsewhere (no ``prctl``).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections.

    Raises:
        DeploymentError: The process exited or the port stayed closed for ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise DeploymentError(f"{proc.args[0]} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise DeploymentError(f"port {port} of {proc.args[0]} did not open within {timeout:.0f} s; see {log}")


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 under ``workdir`` (state, logs, FLWR_HOME, HOME).

    Args:
        workdir: Folder for the deployment's state and logs.
        node_configs: One ``--node-config`` string per SuperNode, e.g. ``"partition-id=0"``.
        start_timeout: Seconds to wait for each port.
        isolation: ``"subprocess"`` (stock: each SuperNode's SuperExec starts one ``flwr-clientapp``
            process per message) or ``"process"`` (warm: the SuperNodes run with ``--isolation
            process`` and each gets one long-lived :mod:`lorafed.engine.flower.warm_exec` process that
            runs every ClientApp task in-process, keeping imports and cached data/model).
        secure: TLS everywhere plus SuperNode authentication (registered keys only); ``False``
            starts every process with ``--insecure`` (plaintext, any node may join).
    """

    workdir: Path
    node_configs: list[str]
    start_timeout: float = 60.0
    isolation: str = "subprocess"
    secure: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)
    link_port: int = 0
    certs: Certificates | None = None
    registered: set[str] = field(default_factory=set)

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: private FLWR_HOME/HOME, this interpreter first on PATH."""
        import lorafed

        env = dict(os.environ)
        root = str(Path(lorafed.__file__).resolve().parents[1])
        env.update(
            FLWR_HOME=str(self.workdir / "flwr_home"),
            HOME=str(self.workdir / "home"),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            PYTHONPATH=os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
        )
        for var in ("FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_INTERNAL_GRPC_CONTROL_API"):
            env.pop(var, None)  # they would make the APIs bind 0.0.0.0
        return env

    def _start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir, start_new_session=True,
                preexec_fn=die_with_parent(),
            )  # fmt: skip
        self.procs.append(proc)
        return proc, log

    def start(self) -> None:
        """Start the SuperLink, write the ``flwr`` connection config, register and start the SuperNodes."""
        for d in ("flwr_home", "home", "logs"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        if self.isolation not in ("subprocess", "process"):
            raise DeploymentError(f"isolation: expected subprocess or process, got {self.isolation!r}")
        self.link_port = free_port()
        if self.secure:
            self.certs = make_certificates(self.workdir / "tls")
            security = ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                        "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth"]  # fmt: skip
        else:
            security = ["--insecure"]
        proc, log = self._start(
            "superlink",
            [str(self._bin("flower-superlink")), *security, "--isolation", "subprocess", "--host", "127.0.0.1",
             "--port", str(self.link_port), "--database", str(self.workdir / "state.db"),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        wait_port(self.link_port, self.start_timeout, proc, log)
        tls = f'root-certificates = "{self.certs.ca_cert}"' if self.certs else "insecure = true"
        (self.workdir / "flwr_home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\n{tls}\n'
        )
        names = [f"supernode{i}" for i in range(len(self.node_configs))]
        if self.certs is not None:
            self.register(names)
        for name, node_config in zip(names, self.node_configs, strict=True):
            self.add_node(name, node_config)

    def _bin(self, name: str) -> Path:
        return Path(sys.executable).parent / name

    def register(self, names: list[str], timeout: float = 120.0) -> None:
        """Make a key pair per name under ``workdir/tls`` and register the public keys (concurrently).

        Each is ``flwr supernode register tls/NAME.pub lorafed-local --name NAME`` over the
        SuperLink's TLS Control API; a node started later with ``tls/NAME`` may then join.

        Raises:
            DeploymentError: Not a secure deployment, a registration failed or timed out.
        """
        if self.certs is None:
            raise DeploymentError("register: only a secure deployment authenticates SuperNodes")
        pubs = [make_node_keys(self.workdir / "tls", n).public_key for n in names]
        cmds = [[str(self._bin("flwr")), "supernode", "register", str(k), CONNECTION, "--name", n]
                for k, n in zip(pubs, names, strict=True)]  # fmt: skip
        procs = [
            subprocess.Popen(c, env=self.env(), cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for c in cmds
        ]
        end, failed = time.monotonic() + timeout, []
        for name, proc in zip(names, procs, strict=True):
            try:
                out, _ = proc.communicate(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failed.append(f"{name}: timed out")
                continue
            if proc.returncode != 0:
                failed.append(f"{name} ({proc.returncode}): {out.decode(errors='replace').strip()[-1000:]}")
            else:
                self.registered.add(name)
        if failed:
            raise DeploymentError("flwr supernode register failed: " + "; ".join(failed))

    def add_node(
        self, name: str, node_config: str, register: bool = True, max_wait_time: float | None = None
    ) -> subprocess.Popen:
        """Start one SuperNode (plus its warm executor with ``isolation="process"``) and return its process.

        Args:
            name: Log and key file stem (``logs/NAME.log``, ``tls/NAME`` and ``tls/NAME.pub``).
            node_config: The node's ``--node-config`` string.
            register: With ``secure``, register the node's key first unless :meth:`register` did;
                ``False`` starts a node with a fresh key the SuperLink does not know (it is refused).
            max_wait_time: ``--max-wait-time`` seconds for reaching the SuperLink (default: unbounded,
                Flower's default); the node exits when they run out.

        Raises:
            DeploymentError: Registration failed, or the node's Runtime API port did not open.
        """
        args = ["--insecure"]
        if self.certs is not None:
            if register and name not in self.registered:
                self.register([name])
            elif not register:
                make_node_keys(self.workdir / "tls", name)
            args = ["--root-certificates", str(self.certs.ca_cert),
                    "--auth-supernode-private-key", str(self.workdir / "tls" / name)]  # fmt: skip
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        port = free_port()
        proc, log = self._start(
            name,
            [str(self._bin("flower-supernode")), *args, "--isolation", self.isolation,
             "--superlink", f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port),
             "--node-config", node_config],
        )  # fmt: skip
        if register or self.certs is None:  # an unregistered node may exit before its port opens
            wait_port(port, self.start_timeout, proc, log)
        if self.isolation == "process":  # our long-lived executor replaces flower-superexec
            self._start(
                f"warm_exec{name.removeprefix('supernode')}",
                [sys.executable, "-m", "lorafed.engine.flower.warm_exec", "--runtime-api-address",
                 f"127.0.0.1:{port}", "--parent-pid", str(proc.pid)],
            )  # fmt: skip
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this deployment and return its stdout.

        Raises:
            DeploymentError: A non-zero exit or a timeout.
        """
        cmd = [str(self._bin("flwr")), *args]
        try:
            res = subprocess.run(cmd, env=self.env(), cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"{' '.join(cmd[:3])} did not finish within {timeout:.0f} s") from exc
        if res.returncode != 0:
            raise DeploymentError(f"{' '.join(cmd[:3])} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return res.stdout

    def run_app(self, app_dir: Path, run_config: Path, done_file: Path, timeout: float) -> dict:
        """Submit the app, wait until ``done_file`` appears or the run ends, and return the run's status.

        Raises:
            DeploymentError: The run failed, or did not finish within ``timeout`` seconds.
        """
        sub = json.loads(
            self.flwr("run", str(app_dir), CONNECTION, "--format", "json", "--run-config", str(run_config))
        )
        if not sub.get("success", True) or "run-id" not in sub:
            raise DeploymentError(f"flwr run refused the app: {sub}")
        run_id = str(sub["run-id"])
        end = time.monotonic() + timeout
        status, next_check = "", 0.0
        while time.monotonic() < end:
            if time.monotonic() >= next_check:  # each flwr call costs ~1-2 s of startup: check rarely
                status = json.loads(self.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"][0][
                    "status"
                ]
                next_check = time.monotonic() + 3.0
            if status.startswith("finished") or done_file.exists():
                break
            time.sleep(0.2)
        while not status.startswith("finished") and time.monotonic() < end:
            time.sleep(0.5)
            status = json.loads(self.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"][0][
                "status"
            ]
        log = self.workdir / "logs" / f"run-{run_id}.log"
        try:
            log.write_text(self.flwr("log", run_id, CONNECTION, "--show", timeout=60))
        except DeploymentError as exc:
            log.write_text(f"could not fetch the run log: {exc}\n")
        if status != "finished:completed":
            tail = log.read_text()[-3000:]
            raise DeploymentError(
                f"run {run_id} ended as {status or 'unfinished'!r} (timeout {timeout:.0f} s):\n{tail}"
            )
        return {"run_id": run_id, "status": status, "log": str(log)}

    def listeners(self) -> list[str]:
        """``ip:port`` of every listening socket of the processes started here (and their children)."""
        out = []
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                out += [f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections("tcp") if c.status == "LISTEN"]
        return sorted(set(out))

    def _tree(self) -> list[psutil.Process]:
        tree = []
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return tree

    def stop(self, grace: float = 5.0) -> None:
        """Terminate every process started here and all its descendants; kill survivors."""
        tree = self._tree()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=grace)

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
