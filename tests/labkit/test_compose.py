"""docker-compose.yml gives the real-Redis path the README describes.

No Docker engine is needed: the file is read as YAML and checked for what the
course relies on (a pinned Redis on port 6379 with a health check).
"""

from __future__ import annotations

import re
import shlex

from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]  # this repository
COMPOSE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def services() -> dict:
    assert COMPOSE.is_file(), f"{COMPOSE.name} is missing"
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), (
        f"{COMPOSE.name} has no `services:` mapping"
    )
    return document["services"]


@pytest.fixture(scope="module")
def redis_service(services) -> dict:
    assert "redis" in services, f"{COMPOSE.name} has no `redis` service (it has: {sorted(services)})"
    return services["redis"]


def as_words(value) -> list[str]:
    """A compose command or test, in list or string form, as a list of words."""
    return [str(word) for word in value] if isinstance(value, list) else shlex.split(str(value))


def test_compose_has_a_redis_service(redis_service):
    assert isinstance(redis_service, dict)


def test_redis_image_is_a_pinned_redis_tag(redis_service):
    image = str(redis_service.get("image", ""))
    reference = image.split("@")[0]  # a digest pins it too
    has_tag = ":" in reference.rsplit("/", 1)[-1]  # not the port of a registry host
    name, tag = reference.rsplit(":", 1) if has_tag else (reference, "")
    assert name.split("/")[-1] == "redis", f"the redis service runs {image!r}, not a redis image"
    assert "@sha256:" in image or (tag and tag != "latest" and tag[0].isdigit()), (
        f"the redis image {image!r} is not pinned to a version tag (e.g. redis:7-alpine)"
    )


def test_redis_publishes_port_6379(redis_service):
    published = set()
    for port in redis_service.get("ports", []):
        if isinstance(port, dict):  # long syntax
            published.add((str(port.get("published")), str(port.get("target"))))
        else:  # "[ip:]host:container[/proto]"
            parts = str(port).split("/")[0].split(":")
            published.add((parts[-2] if len(parts) > 1 else parts[-1], parts[-1]))
    assert ("6379", "6379") in published, f"the redis service does not publish 6379:6379 (ports: {published})"


def test_redis_has_a_redis_cli_ping_healthcheck(redis_service):
    check = redis_service.get("healthcheck") or {}
    words = as_words(check.get("test", []))
    assert words, "the redis service has no healthcheck test"
    assert "redis-cli ping" in " ".join(words), f"the healthcheck does not run `redis-cli ping`: {words}"


def test_redis_keeps_nothing_on_disk(redis_service):
    words = as_words(redis_service.get("command", []))
    assert "--save" in words and words[words.index("--save") + 1] == "", f"no `--save \"\"` in {words}"
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "no", f"no `--appendonly no` in {words}"


def test_readme_compose_commands_name_existing_services(services):
    if not README.is_file():
        pytest.skip("no README.md yet")
    commands = re.findall(r"docker[ -]compose\s+up\b([^\n`#]*)", README.read_text())
    if not commands:
        pytest.skip("README.md has no `docker compose up` command")
    for arguments in commands:
        named = [word for word in shlex.split(arguments) if not word.startswith("-")]
        missing = [name for name in named if name not in services]
        assert not missing, f"README.md runs `docker compose up{arguments.rstrip()}`, but {COMPOSE.name} has no {missing}"
