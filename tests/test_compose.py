"""docker/compose.yaml, checked without Docker (images cannot be pulled here).

The file is loaded as YAML and its commands are parsed by the real CLI, so the deployment and
the code cannot drift apart: the ``serve`` command of the api service and the ``index``
command in the file's header must parse, name the same index, database and vector location,
and that location must be a Milvus server URL whose host and port are the Milvus service.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import typer

yaml = pytest.importorskip("yaml")

from regionsearch.cli import app  # noqa: E402  (after the skip)
from regionsearch.store.backends import scheme_for  # noqa: E402
from regionsearch.store.milvus_location import parse_milvus_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
HEALTHY = {"condition": "service_healthy"}


def _defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation, with every variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


def _parse(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``regionsearch ARGS`` with the real CLI: (command name, its parameters)."""
    root = typer.main.get_command(app)
    name, *rest = args
    with click.Context(root) as ctx:
        command = root.get_command(ctx, name)
        assert command is not None, f"no command {name!r}"
        return name, command.make_context(name, rest).params


def _header_command(text: str) -> list[str]:
    """The ``... run --rm api index ...`` command of the header comment, as arguments."""
    lines = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")
    match = re.search(r"run --rm api (index .*?)(?=\s+PHOTOS=|\s+#|$)", joined)
    assert match, "the header shows how to index"
    words = shlex.split(_defaults(match.group(1)))
    return words[: words.index("--vectors") + 2]


def test_services_and_their_health(services):
    assert {"db", "etcd", "minio", "milvus", "api"} <= set(services)
    for name in ("db", "etcd", "minio", "milvus"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    assert services["milvus"]["depends_on"] == {"etcd": HEALTHY, "minio": HEALTHY}
    assert services["api"]["depends_on"] == {"db": HEALTHY, "milvus": HEALTHY}


def test_milvus_finds_etcd_and_minio_by_service_name(services):
    env = services["milvus"]["environment"]
    etcd_host, etcd_port = env["ETCD_ENDPOINTS"].split(":")
    minio_host, minio_port = env["MINIO_ADDRESS"].split(":")
    assert etcd_host == "etcd" and f"0.0.0.0:{etcd_port}" in " ".join(services["etcd"]["command"])
    assert minio_host == "minio" and minio_port == "9000"
    assert not services["etcd"].get("ports") and not services["minio"].get("ports")


def test_named_volumes_are_declared(compose, services):
    used = {
        v.split(":")[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith(("$", ".", "/"))
    }
    assert used and used <= set(compose["volumes"])


def test_api_serves_the_milvus_collection_the_cli_understands(services):
    command = [_defaults(str(a)) for a in services["api"]["command"]]
    name, params = _parse(command)
    assert name == "serve"
    location = parse_milvus_url(params["vectors"])
    assert scheme_for(params["vectors"]).opener == "regionsearch.store.milvus:open_milvus"
    assert not location.lite and location.uri == "http://milvus:19530"
    exposed = {p.rsplit(":", 2)[-1] for p in services["milvus"]["ports"]}
    assert "19530" in exposed
    assert location.collection == params["name"]
    assert params["db_url"].startswith("postgresql+psycopg2://") and "@db:5432/" in params["db_url"]


def test_header_index_command_matches_what_is_served(services, tmp_path):
    _, served = _parse([_defaults(str(a)) for a in services["api"]["command"]])
    command, folder, *options = _header_command(COMPOSE.read_text(encoding="utf-8"))
    mounts = {_defaults(v).split(":")[1] for v in services["api"]["volumes"]}
    assert folder in mounts  # the photos volume
    name, indexed = _parse([command, str(tmp_path), *options])  # the folder must exist here
    assert name == "index"
    for key in ("name", "db_url", "vectors"):
        assert indexed[key] == served[key], key


def test_the_api_image_installs_the_milvus_client(services):
    build = services["api"]["build"]
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).read_text()
    extras = re.search(r'install "\.\[([a-z,]+)\]"', dockerfile)
    assert extras and {"postgres", "milvus"} <= set(extras.group(1).split(","))
