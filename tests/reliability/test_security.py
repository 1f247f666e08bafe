"""Security basics: loopback by default, no credentials in the repository or in what a run records or
prints, configs that cannot run code, and a compose file that publishes only the two UIs.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from support.cli import REPO
from support.records import children, client

from flows.cli import build_parser
from flows.config import ConfigError, load_config
from flows.ops.commands import DEFAULT_HOST
from flows.ops.stack import Services
from tasks.redaction import redact, redact_url

from .conftest import PASSWORD

# ---------------------------------------------------------------------------------------------------------
# Servers bind 127.0.0.1 unless told otherwise


def test_serve_defaults_to_loopback():
    assert DEFAULT_HOST == "127.0.0.1"
    assert Services("/tmp/unused-sngp-data").host == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--data-dir", "/tmp/unused-sngp-data"])
    assert args.host == "127.0.0.1"


def _listening(pid: int) -> list[tuple[str, int]]:
    found = []
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            found += [
                (c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            continue
    return found


def test_served_stack_listens_on_loopback_only(stack):
    """The servers `sngp serve` starts with its defaults (conftest.stack), checked at the socket level."""
    ports = {"prefect": stack.prefect_port, "mlflow": stack.mlflow_port}
    for name, child in stack.children.items():
        if name not in ports:
            continue
        sockets = _listening(child.proc.pid)
        assert ("127.0.0.1", ports[name]) in sockets, (name, sockets)
        assert all(ip == "127.0.0.1" for ip, _ in sockets), f"{name} listens beyond loopback: {sockets}"


def test_compose_publishes_only_the_uis_on_loopback():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert "ports" not in services["postgres"], "the database must not be published"
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"mlflow", "prefect-server"}, published
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for name, service in services.items():  # credentials come from docker/.env, never literals
        env = service.get("environment") or {}
        for key, value in env.items() if isinstance(env, dict) else []:
            if "PASSWORD" in key or "://" in str(value):
                assert "${" in str(value) or "@" not in str(value), (name, key, value)
                assert not re.search(r"://[^:/@]+:(?!\$\{)[^@]+@", str(value)), (name, key, value)


# ---------------------------------------------------------------------------------------------------------
# No credentials in the repository

SKIP_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "mlartifacts",
    "mlruns",
    ".sngp_cache",
    "results",
    ".sngp_server",
    "node_modules",
}
TEXT_SUFFIXES = {
    ".py",
    ".yaml",
    ".yml",
    ".toml",
    ".md",
    ".txt",
    ".cfg",
    ".ini",
    ".json",
    ".sh",
    ".example",
    ".env",
    ".dockerignore",
    "",
}
# A secret is a literal value: `password = "..."` in code, `PASSWORD: value` in YAML/.env, a URL with a
# password that is not a documentation placeholder, a private key, a cloud access key.
SECRET_PATTERNS = {
    "password literal": re.compile(
        r"(?i)\b\w*(password|passwd|secret|token|api_key)\w*['\"]?\s*[:=]\s*['\"]([^'\"\s]{6,})['\"]"
    ),
    "password setting": re.compile(
        r"(?i)^\s*\w*(password|passwd|secret|token|api_key)\w*\s*[:=]\s*(?![$<{*]|\w+\()([^\s#'\"]{6,})\s*$"
    ),
    "URL with a password": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:([^@\s/'\"]{2,})@"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
}
PLACEHOLDERS = re.compile(
    r"(?i)^(\*\*\*|password|secret|pass|pw|changeme|change-me.*|<[^>]+>|\$\{[^}]+\}.*|\{[^}]*\}.*|"
    r"your[-_]?\w*|example\w*|none|null|true|false)$"
)


def _repo_files():
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel.parts[0] == "tests" or rel == Path(
            "docker/.env"
        ):  # tests hold fake passwords; .env is ignored
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", "Dockerfile")):
            yield rel, path


def test_no_credentials_in_the_repository():
    findings = []
    checked = 0
    for rel, path in _repo_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        checked += 1
        for number, line in enumerate(text.splitlines(), 1):
            for what, pattern in SECRET_PATTERNS.items():
                if what == "password setting" and path.suffix == ".py":
                    continue  # in code, `password = <expression>` is not a literal
                match = pattern.search(line)
                if match and not (match.groups() and PLACEHOLDERS.match(match.groups()[-1])):
                    findings.append(f"{rel}:{number}: {what}: {line.strip()[:120]}")
    assert checked > 30, f"only {checked} files scanned"
    assert not findings, "\n".join(findings)


def test_env_example_holds_only_placeholders():
    text = (REPO / "docker" / ".env.example").read_text()
    values = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert "change-me" in values["POSTGRES_PASSWORD"]


# ---------------------------------------------------------------------------------------------------------
# YAML: safe loading only (in the code, ruff checks it: S506 and the yaml entries of banned-api in
# pyproject.toml); here, that the config loader refuses what an unsafe loader would run.


def test_config_loader_refuses_python_tags(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {tmp_path / 'PWNED'}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------
# Passwords in URLs are redacted


REDACT_CASES = {
    "postgresql://user:secret@host:5432/db": "postgresql://user:***@host:5432/db",
    "postgresql+psycopg2://u:pw@db:5432/mlflow": "postgresql+psycopg2://u:***@db:5432/mlflow",
    "postgresql://user:p@ss@host/db": "postgresql://user:***@host/db",
    "postgresql://user:pa/ss@host/db": "postgresql://user:***@host/db",
    "postgresql://:secret@host/db": "postgresql://:***@host/db",
    "http://alice:pw@127.0.0.1:5000": "http://alice:***@127.0.0.1:5000",
    "see postgresql://u:x@h/db and http://v:y@k/ now": "see postgresql://u:***@h/db and http://v:***@k/ now",
    "sqlite:////tmp/mlflow.db": "sqlite:////tmp/mlflow.db",
    "http://127.0.0.1:5000/#/experiments/1": "http://127.0.0.1:5000/#/experiments/1",
    "postgresql://user@host/db": "postgresql://user@host/db",
}


@pytest.mark.parametrize("text", list(REDACT_CASES))
def test_redact(text):
    assert redact(text) == REDACT_CASES[text]


@pytest.mark.parametrize("url", ["postgresql://user:secret@host:5432/db", "postgresql://u:p%40ss@h/db"])
def test_serve_redacts_database_urls(url):
    shown = redact_url(url)
    assert "secret" not in shown and "p%40ss" not in shown and ":***@" in shown


def _prefect(api: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        return json.loads(response.read())


def test_password_in_tracking_uri_is_never_recorded_or_printed(concurrent_sqlite, stack):
    """Run 0 of the concurrent batch named the MLflow server as http://alice:PASSWORD@127.0.0.1:Q."""
    run = concurrent_sqlite[0]
    assert "alice:***@" in run.proc.stdout + run.proc.stderr  # the URI was used, and shown redacted
    assert PASSWORD not in run.proc.stdout + run.proc.stderr
    c = client(stack.mlflow_url)
    parent = c.get_run(run.parent_id)
    for r in [parent, *children(c, run.parent_id).values()]:
        blob = json.dumps({"params": r.data.params, "tags": r.data.tags})
        assert PASSWORD not in blob, r.info.run_name
    config = Path(c.download_artifacts(run.parent_id, "config.yaml")).read_text()
    assert PASSWORD not in config
    # Prefect stores and shows flow-run parameters and logs: the password must be in neither.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    flow_run = _prefect(stack.prefect_api_url, f"/flow_runs/{flow_run_id}")
    assert PASSWORD not in json.dumps(flow_run["parameters"])
    logs = _prefect(
        stack.prefect_api_url,
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
    )
    assert logs and PASSWORD not in json.dumps(logs)
    artifacts = _prefect(
        stack.prefect_api_url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    assert artifacts and PASSWORD not in json.dumps(artifacts)
