"""docker-compose.yaml cannot run here (no Docker engine): check that it parses and names only real things."""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

import yaml
from ec2cluster_localcloud import cli

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_compose_parses_with_the_two_services():
    services = compose()["services"]
    assert set(services) == {"localcloud", "airflow"}
    # Airflow shares the local cloud's network namespace so that the cloud needs to listen on loopback only.
    assert services["airflow"]["network_mode"] == "service:localcloud"


def test_every_path_the_compose_file_names_exists():
    services = compose()["services"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (ROOT / build / "Dockerfile").is_file()
        for volume in service.get("volumes", []):
            host_path = volume.split(":", 1)[0]
            assert (ROOT / host_path).exists(), volume


def test_every_path_the_dockerfile_copies_exists():
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source


def test_the_commands_it_runs_exist():
    services = compose()["services"]
    entrypoint = services["localcloud"]["entrypoint"]
    scripts = {
        e.name for e in distribution("ec2cluster-localcloud").entry_points if e.group == "console_scripts"
    }
    assert entrypoint[0] in scripts
    parser = cli.build_parser()
    parser.parse_args(entrypoint[1:])  # exits (SystemExit) if a flag does not exist


def test_the_airflow_image_matches_the_pinned_airflow():
    pinned = re.search(r"^apache-airflow==(\S+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert f"apache/airflow:{pinned}-" in (ROOT / "Dockerfile").read_text()
