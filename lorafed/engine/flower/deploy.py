"""A local Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, every process stopped on exit.

Each process starts in its own session (process group); :meth:`LocalDeployment.stop` terminates
the whole tree of every process it started (SuperExec, the per-message ``flwr-clientapp``
children and, with ``isolation="process"``, the warm executors included), then kills what is left
after a grace period. Nothing else is touched.
All listeners bind 127.0.0.1; SuperLink serves its Control, Fleet and ServerAppIo APIs on one
port. Runtime dependency installation is disabled everywhere (no registry access, no torch pull).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lorafed.errors import LorafedError

CONNECTION = "lorafed-local"


class DeploymentError(LorafedError):
    """A Flower process did not start, a run failed, or a wait timed out."""


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
    """

    workdir: Path
    node_configs: list[str]
    start_timeout: float = 60.0
    isolation: str = "subprocess"
    procs: list[subprocess.Popen] = field(default_factory=list)
    link_port: int = 0

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
                args, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir, start_new_session=True
            )
        self.procs.append(proc)
        return proc, log

    def start(self) -> None:
        """Start the SuperLink and the SuperNodes and write the ``flwr`` connection config."""
        for d in ("flwr_home", "home", "logs"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        self.link_port = free_port()
        proc, log = self._start(
            "superlink",
            [str(bin_dir / "flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
             "--port", str(self.link_port), "--database", str(self.workdir / "state.db"),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        wait_port(self.link_port, self.start_timeout, proc, log)
        if self.isolation not in ("subprocess", "process"):
            raise DeploymentError(f"isolation: expected subprocess or process, got {self.isolation!r}")
        for i, node_config in enumerate(self.node_configs):
            port = free_port()
            proc, log = self._start(
                f"supernode{i}",
                [str(bin_dir / "flower-supernode"), "--insecure", "--isolation", self.isolation,
                 "--superlink", f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1", "--port", str(port),
                 "--node-config", node_config],
            )  # fmt: skip
            wait_port(port, self.start_timeout, proc, log)
            if self.isolation == "process":  # our long-lived executor replaces flower-superexec
                self._start(
                    f"warm_exec{i}",
                    [sys.executable, "-m", "lorafed.engine.flower.warm_exec", "--runtime-api-address",
                     f"127.0.0.1:{port}", "--parent-pid", str(proc.pid)],
                )  # fmt: skip
        (self.workdir / "flwr_home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this deployment and return its stdout.

        Raises:
            DeploymentError: A non-zero exit or a timeout.
        """
        cmd = [str(Path(sys.executable).parent / "flwr"), *args]
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
