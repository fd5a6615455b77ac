"""docker-compose.yml cannot run here (no Docker engine): keep it honest against the real code.

Every command is parsed by the real CLI parser (or is Celery/Flower with options that exist),
every ROOTFS_EXPORT_* variable is a settings field whose value the settings accept, every volume
is declared and mounted where the service's settings point, and the queues the workers consume
cover every queue the tasks are routed to.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.service.stack import REPO
from worker.celery import FETCH_QUEUE, TASK_FETCH, TASK_PACKAGE, TASK_RESOLVE, route_task
from worker.cli import build_parser
from worker.commands.service import is_loopback, worker_argv
from worker.settings import ENV_PREFIX, Settings, load_settings

COMPOSE = REPO / "docker-compose.yml"
#: variables other programs read, per the image they configure
FOREIGN_ENV = {
    "postgres": re.compile(r"^POSTGRES_(USER|PASSWORD|DB)$"),
    "*": re.compile(r"^DOCKER_CONFIG$"),
}
_INTERP = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error}: the default, or a stand-in for required."""
    return _INTERP.sub(lambda m: m.group("arg") if m.group("op") == "-" else "required-value",
                       value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services(compose: dict[str, Any], program: str | None = None) -> dict[str, dict[str, Any]]:
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if program is None or (isinstance(cmd, list) and cmd and cmd[0] == program):
            out[name] = svc
    return out


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def settings_of(svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env_of(svc).items():
        monkeypatch.setenv(name, value)
    return load_settings()


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source for the service's volumes (short syntax)."""
    out = {}
    for spec in svc.get("volumes") or []:
        source, target, *_mode = spec.split(":")
        out[target] = source
    return out


def test_every_command_is_accepted_by_the_real_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    ours = services(compose, "rootfs-export")
    assert {"migrate", "api", "fetch-worker", "package-node1", "package-node2"} <= set(ours)
    for name, svc in ours.items():
        try:
            args = parser.parse_args(svc["command"][1:])
        except SystemExit:
            pytest.fail(f"service {name}: the CLI rejects {svc['command']}")
        assert args.handler.startswith("worker.commands.service:"), (name, args.handler)
        assert svc.get("build") == "." and (REPO / "Dockerfile").exists(), name
    assert services(compose)["migrate"]["command"][1:] == ["db", "upgrade"]


def test_celery_and_flower_commands(compose: dict[str, Any]) -> None:
    from flower.options import options as flower_options

    celery = services(compose, "celery")
    assert set(celery) == {"flower"}
    cmd = celery["flower"]["command"]
    assert cmd[:4] == ["celery", "-A", "worker", "flower"]
    for opt in cmd[4:]:
        name = opt.removeprefix("--").split("=", 1)[0].replace("_", "-")
        assert name in flower_options._options, f"flower has no option {opt}"
    for var in env_of(celery["flower"]):
        if not var.startswith(ENV_PREFIX):
            option = var.removeprefix("FLOWER_").lower().replace("_", "-")
            assert var.startswith("FLOWER_") and option in flower_options._options, var


def test_every_variable_is_a_setting_with_a_valid_value(compose: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    for name, svc in compose["services"].items():
        for var in env_of(svc):
            if var.startswith(ENV_PREFIX):
                assert var.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {var}"
            elif name == "flower" and var.startswith("FLOWER_"):
                continue     # checked against Flower's options above
            else:
                allowed = [FOREIGN_ENV.get(name), FOREIGN_ENV["*"]]
                assert any(p and p.match(var) for p in allowed), f"{name}: unexpected {var}"
        with monkeypatch.context() as m:
            for var in list(__import__("os").environ):
                if var.startswith(ENV_PREFIX):
                    m.delenv(var)
            settings_of(svc, m)      # raises ConfigError naming the variable if invalid


def test_urls_point_at_compose_services(compose: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    names = set(compose["services"])
    pg = env_of(compose["services"]["postgres"])
    for name, svc in services(compose).items():
        env = env_of(svc)
        for var in ("ROOTFS_EXPORT_BROKER_URL", "ROOTFS_EXPORT_RESULT_BACKEND",
                    "ROOTFS_EXPORT_DATABASE_URL"):
            if var not in env:
                continue
            url = urlsplit(env[var])
            assert url.hostname in names, f"{name}: {var} points at {url.hostname}"
            if var.endswith("DATABASE_URL"):
                assert url.scheme == "postgresql+psycopg"
                assert url.username == pg["POSTGRES_USER"]
                assert url.password == pg["POSTGRES_PASSWORD"]
                assert url.path == f"/{pg['POSTGRES_DB']}"


def test_api_listens_publicly_only_with_a_token(compose: dict[str, Any]) -> None:
    api = services(compose)["api"]
    args = build_parser().parse_args(api["command"][1:])
    env = env_of(api)
    assert is_loopback(args.host) or env.get("ROOTFS_EXPORT_API_TOKEN"), api
    assert "${ROOTFS_EXPORT_API_TOKEN:?" in str(api["environment"]["ROOTFS_EXPORT_API_TOKEN"])
    assert any(p.split(":")[-1] == str(args.port) for p in api.get("ports", []))
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_workers_cover_every_queue_and_mount_cache_and_outputs(
        compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    declared = set(compose.get("volumes") or {})
    consumed: dict[str, str] = {}
    nodes: dict[str, str] = {}
    output_volumes: dict[str, str] = {}
    cache_volumes = set()
    for name, svc in services(compose, "rootfs-export").items():
        args = parser.parse_args(svc["command"][1:])
        for source in mounts(svc).values():
            assert source in declared or source.startswith("./"), f"{name}: volume {source}"
            if source.startswith("./"):
                assert source == "./docker-config", f"{name}: bind mount {source}"
        if args.command != "worker":
            continue
        with monkeypatch.context() as m:
            settings = settings_of(svc, m)
        node = args.node or settings.node
        argv = worker_argv(node=node, queues=args.queues, concurrency=args.concurrency)
        queues = argv[argv.index("-Q") + 1].split(",")
        vols = mounts(svc)
        assert str(settings.cache_dir) in vols, f"{name}: cache dir not on a volume"
        cache_volumes.add(vols[str(settings.cache_dir)])
        env = env_of(svc)
        assert vols.get(env["DOCKER_CONFIG"]) == "./docker-config", name
        for q in queues:
            consumed[q] = name
            if q.startswith("package."):
                assert q == f"package.{node}", f"{name} consumes {q} but is node {node}"
                assert args.node == env.get("ROOTFS_EXPORT_NODE") == node, name
                out = vols.get(str(settings.output_dir))
                assert out, f"{name}: output dir {settings.output_dir} not on a volume"
                assert out not in output_volumes.values(), f"{name} shares outputs {out}"
                output_volumes[name] = out
                nodes[node] = name
    assert len(cache_volumes) == 1, f"workers must share one cache volume: {cache_volumes}"
    assert len(nodes) >= 2
    # Every queue a task can be routed to has a consumer.
    assert route_task(TASK_RESOLVE, (), {}, {}) == {"queue": FETCH_QUEUE}
    assert route_task(TASK_FETCH, (), {}, {}) == {"queue": FETCH_QUEUE}
    assert FETCH_QUEUE in consumed
    for node in nodes:
        route = route_task(TASK_PACKAGE, (), {"node": node}, {})
        assert route is not None and route["queue"] in consumed
    # The API's default node is one that has a packaging worker.
    api_env = env_of(services(compose)["api"])
    assert api_env["ROOTFS_EXPORT_NODE"] in nodes


def test_dockerfile_copies_what_the_image_needs() -> None:
    text = (REPO / "Dockerfile").read_text()
    copied = [p for line in text.splitlines() if line.startswith("COPY ")
              for p in line.split()[1:-1]]
    for path in copied:
        assert (REPO / path).exists(), f"Dockerfile copies missing {path}"
    for needed in ("pyproject.toml", "alembic.ini", "migrations", "api", "worker"):
        assert needed in copied, needed
    assert "-t bookworm-backports e2fsprogs" in text
    assert "pip install" in text and " -e ." in text   # migrations/ found beside the sources
    assert Path(REPO / "migrations" / "env.py").exists()
