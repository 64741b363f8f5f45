"""A long-lived ClientApp executor for a SuperNode started with ``--isolation process``.

flwr 1.42's ``flwr-clientapp`` serves exactly one task and exits (``run_clientapp`` ends in
``flwr_exit``), and its SuperExec starts one such process per message, so every round pays a Python
start, ``import torch`` and the model load. This process replaces ``flower-superexec`` for one
SuperNode: it polls the node's Runtime API (``AcquireTask``) and runs each ClientApp task in
this same interpreter, with the task steps of ``flwr.supernode.runtime.run_clientapp`` (pull
input, load the app, call it, push the reply and the task output) but without its per-task
``flwr_exit``/signal handlers. Module state (lorafed's ``_federation`` cache) survives across
messages and runs. Trusted local use only: the app code is imported into this process.

    python -m lorafed.engine.flower.warm_exec --runtime-api-address 127.0.0.1:PORT [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import os
import time
from logging import ERROR, INFO

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

POLL_S = 0.05


def _client(address: str, extra: list) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=extra[0]), *extra[1:]],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str, installed: set[str]) -> bool:
    """Run one ClientApp task in this process; True when it completed."""
    client = _client(address, ["flwr-clientapp", RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        if fab.hash_str not in installed:  # the FAB is unpacked once per content hash
            install_from_fab(fab.content, skip_prompt=True)
            installed.add(fab.hash_str)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app = load(run.fab_id, run.fab_version, fab.hash_str)  # a module already imported is reused
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # pylint: disable=broad-exception-caught
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else (
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION)  # fmt: skip
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "Failed to push the reply", exc_info=ex)
            status, details = SubStatus.FAILED, f"reply push failed: {ex}"
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, poll_s: float = POLL_S) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at ``address`` until killed."""
    client = _client(address, ["SuperExec"])
    installed: set[str] = set()
    log(INFO, "warm ClientApp executor on %s (pid %d)", address, os.getpid())
    while True:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        if res.HasField("task") and res.token:
            t = time.perf_counter()
            ok = run_task(address, res.token, installed)
            log(INFO, "task %d %s in %.2f s", res.task.task_id, "done" if ok else "failed", time.perf_counter() - t)
            continue
        time.sleep(poll_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--parent-pid", type=int)
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between AcquireTask polls")
    args = ap.parse_args()
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    serve(args.runtime_api_address, args.poll)


if __name__ == "__main__":
    main()
