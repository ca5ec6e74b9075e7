"""The station's local admin channel: rollback and install-from-file, over a private ipc socket.

    kaizen station rollback TASK --config station.toml
    kaizen station install PACK.kpk --config station.toml

Admin commands change what a station serves, so they never travel on the inference endpoint
(which any local process, e.g. a camera's, may reach, possibly over tcp://127.0.0.1). The
admin server is a ROUTER bound on ``ipc://<folder>/admin.ipc``: the folder is created mode
0700 (an existing one must be ours and 0700), the socket file is chmod 0600 after the bind,
so only the station's own user (and root) can connect. tcp://, inproc:// and abstract
``ipc://@name`` endpoints are refused. Protocol: runtime/PROTOCOL.md ("Admin link").

    with AdminServer(station, "ipc:///run/kaizen/admin/admin.ipc") as server:
        with AdminClient(server.endpoint) as client:
            client.install("/srv/incoming/pick-4.kpk")   # same checks as a delivered pack
            client.rollback("pick")
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq

from .endpoint import InferenceClient, InferenceServer
from .errors import ConfigError, KaizenError
from .protocol import Message, error_reply, ok_reply

ADMIN_TYPES = frozenset({"status_request", "rollback_request", "install_request"})
ADMIN_MAX_BYTES = 64 * 1024
MAX_IPC_PATH = 107  # sun_path is 108 bytes on Linux, NUL included


def check_admin_endpoint(endpoint: str, field: str = "admin_endpoint") -> Path:
    """The socket path of an admin endpoint; ConfigError unless it is ipc:///ABSOLUTE/PATH."""
    scheme, sep, rest = endpoint.partition("://")
    if scheme != "ipc" or not sep or not rest.startswith("/"):
        raise ConfigError(f"{field} {endpoint!r} must be ipc:///ABSOLUTE/PATH: admin commands "
                          "are protected by the socket's file permissions, so never tcp://, "
                          "inproc:// or an abstract ipc://@name")
    if len(rest.encode()) > MAX_IPC_PATH:
        raise ConfigError(f"{field} {endpoint!r}: the path is over {MAX_IPC_PATH} bytes, the "
                          "limit of a unix socket path; choose a shorter runtime folder")
    return Path(rest)


def ensure_private_dir(folder: Path) -> None:
    """Create `folder` mode 0700, or check that an existing one is ours and 0700."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"admin folder {folder} must belong to this user (uid {os.getuid()}) "
                          f"with mode 0700, it has uid {st.st_uid} mode "
                          f"{stat.S_IMODE(st.st_mode):o}: fix it (chmod 700) or remove it")


class AdminServer(InferenceServer):
    """status / rollback / install for the station's own user, on a private ipc socket."""

    thread_name = "kaizen-admin"
    served_types = ADMIN_TYPES

    def __init__(self, backend, endpoint: str, **kwargs):
        self.socket_path = check_admin_endpoint(endpoint)
        kwargs.setdefault("max_bytes", ADMIN_MAX_BYTES)
        super().__init__(backend, endpoint, **kwargs)

    def start(self) -> AdminServer:
        ensure_private_dir(self.socket_path.parent)
        super().start()
        return self

    def _after_bind(self, sock: zmq.Socket) -> None:
        os.chmod(self.socket_path, 0o600)

    def _dispatch(self, request: Message) -> Message:
        if request.msg_type == "status_request":
            return ok_reply(request, {"station": self.backend.status(),
                                      "endpoint": self.stats.snapshot()})
        if request.msg_type == "rollback_request":
            return _manifest_reply(request, getattr(self.backend, "rollback", None),
                                   request.body["task_id"])
        path = request.body["path"]
        if "\0" in path or not os.path.isabs(path):
            return error_reply(request, "bad_body", f"install_request path {path[:200]!r} must be "
                               "an absolute path on the station (the client resolves it)")
        if not os.path.isfile(path):
            return error_reply(request, "PackError", f"{path[:200]}: no such pack file on the "
                               "station")
        return _manifest_reply(request, getattr(self.backend, "install", None), path)


def _manifest_reply(request: Message, operation, arg: str) -> Message:
    """Run backend.rollback/install(arg) -> {task_id, version}; a KaizenError -> error reply."""
    if operation is None:
        return error_reply(request, "unsupported_type", f"this backend cannot serve "
                           f"{request.msg_type}")
    try:
        manifest = operation(arg)
    except KaizenError as err:
        return error_reply(request, type(err).__name__, str(err))
    return ok_reply(request, {"task_id": manifest.task_id, "version": manifest.version})


class AdminClient(InferenceClient):
    """The client side of the admin channel (`kaizen station rollback|install`)."""

    def __init__(self, endpoint: str, timeout_ms: int = 30000, **kwargs):
        check_admin_endpoint(endpoint)
        super().__init__(endpoint, timeout_ms, **kwargs)

    def rollback(self, task_id: str) -> dict:
        """Return `task_id` to its previous pack: {"task_id", "version"} now active."""
        return self._ok_body(Message("rollback_request", {"task_id": task_id}))

    def install(self, path) -> dict:
        """Install a .kpk from this machine's disk (absolute path sent): {"task_id", "version"}."""
        return self._ok_body(Message("install_request", {"path": str(Path(path).resolve())}))

    def _ok_body(self, message: Message) -> dict:
        reply = self.request(message)
        return {k: v for k, v in reply.body.items() if k != "status"}
