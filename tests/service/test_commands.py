"""The service commands' argument handling (the processes themselves run in the e2e tests)."""

from __future__ import annotations

import pytest

from worker.commands.service import is_loopback, worker_argv
from worker.errors import ConfigError


def test_worker_default_queues_are_fetch_and_the_nodes_package_queue() -> None:
    argv = worker_argv(node="n1", queues=None, concurrency=3)
    assert argv[:5] == ["worker", "-Q", "fetch,package.n1", "-n", "n1@%h"]
    assert "-E" in argv and "--concurrency=3" in argv


def test_worker_queues_option() -> None:
    argv = worker_argv(node="n1", queues="package.n1, fetch", concurrency=None)
    assert argv[2] == "package.n1,fetch"
    assert not any(a.startswith("--concurrency") for a in argv)
    with pytest.raises(ConfigError, match="not a queue name"):
        worker_argv(node="n1", queues="fetch,bad queue", concurrency=None)
    with pytest.raises(ConfigError, match="at least 1"):
        worker_argv(node="n1", queues=None, concurrency=0)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("example.com", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_worker_command_rejects_a_bad_node_naming_the_option(tmp_path) -> None:
    import subprocess

    from tests.service.stack import CLI

    out = subprocess.run([CLI, "worker", "--node", "a b"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "--node 'a b'" in out.stderr and "package.NODE" in out.stderr
