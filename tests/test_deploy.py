"""Static checks of the recipes in deploy/: they parse, and they name what Till really serves.

Docker and Kubernetes do not run here, so these tests read the files instead: every YAML
document parses; the Kubernetes objects have the fields that matter and point at each other;
ports, probe paths, image names, commands and every TILL_* variable agree with what `till`
accepts (till.cli), reads (till.server.settings) and serves (the routes of till/server/app.py),
so renaming a setting or a route breaks a test here rather than a deployment. Where the real
tool is installed, it checks its own file: `haproxy -c`, `nginx -t` (both nginx files, with
local upstreams, rewritten as tests/lb.py does), and `systemd-analyze verify`. No network, no
containers: the whole module runs in about a second.
"""

from __future__ import annotations

import ast
import configparser
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.lb import render
from till.cli import build_parser
from till.server.settings import _ENV, Settings, from_env
from till.tokens import Keyring, KeyringError

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8787  # the port the image exposes and every recipe targets
APP = "till"  # the app label in k8s, the compose services' prefix, the systemd user
PROBE_PATHS = {"/healthz", "/readyz"}
# A real keyring entry: kid, then 32 bytes of base64 (43 characters unpadded).
KEYRING_ENTRY = re.compile(
    r"\b[A-Za-z0-9_-]{1,16}:[A-Za-z0-9+/_-]{42,44}={0,2}(?![A-Za-z0-9+/_=-])"
)


# --- helpers --------------------------------------------------------------------------------


@functools.cache  # read-only use: every test reads the same parsed files
def load_yaml(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in load_yaml(p)]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_objects() if d["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    found = k8s_kind(kind)
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def till_deployment() -> dict[str, Any]:
    (dep,) = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == APP]
    return dep


def till_container() -> dict[str, Any]:
    containers = till_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == APP]
    return container


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "docker-compose.yml")
    return doc


def till_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    found = {name: s for name, s in services.items() if name.startswith(f"{APP}-")}
    assert len(found) == 3, f"expected three Till workers in docker-compose.yml: {sorted(found)}"
    return found


def committed_files() -> list[Path]:
    """Files under deploy/, less those deploy/.gitignore keeps out (a local till.env)."""
    ignored = set((DEPLOY / ".gitignore").read_text().split())
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name not in ignored)


def env_mapping(environment: dict[str, Any] | list[str] | None) -> dict[str, str]:
    """A compose `environment` (mapping or KEY=VALUE list) as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile / compose env_file syntax), comments skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[name.strip()] = value.strip()
    return values


def assert_settings(names: Iterable[str], where: str) -> None:
    unknown = sorted(set(names) - set(_ENV))
    assert not unknown, f"{where}: not variables Till reads (till/server/settings.py): {unknown}"


def seconds(value: object) -> float:
    """A duration as compose, systemd and Kubernetes write it: 45, '45s', '1min', '2m'."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?", text)
    assert m, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m[2]]
    return float(m[1]) * scale


def graceful_timeout() -> float:
    """How long `till serve` lets open requests finish after SIGTERM (TILL_GRACEFUL_TIMEOUT)."""
    return Settings().graceful_timeout


@functools.cache
def served_get_paths() -> frozenset[str]:
    """The fixed GET routes declared in till/server/app.py: `Route("/path", ..., methods=[...])`.

    Read from the source (ast), not by importing the app: the same answer without a second of
    imports.
    """
    tree = ast.parse((ROOT / "till/server/app.py").read_text())
    paths = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Route"):
            continue
        path = node.args[0] if node.args else None
        methods = {k.arg: k.value for k in node.keywords}.get("methods")
        if (
            isinstance(path, ast.Constant)
            and isinstance(path.value, str)
            and "{" not in path.value
            and isinstance(methods, ast.List)
            and any(isinstance(m, ast.Constant) and m.value == "GET" for m in methods.elts)
        ):
            paths.add(path.value)
    assert PROBE_PATHS & paths, "no health routes found in till/server/app.py: update this helper"
    return frozenset(paths)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    out, buf = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue  # Docker drops comment lines, inside a continuation too
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (buf + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def instruction(steps: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in steps if w == word]
    assert len(found) == 1, f"deploy/Dockerfile final stage: expected one {word}, found {found}"
    return found[0]


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows a key more than once; optionxform keeps keys' case.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


def directives(path: Path) -> list[str]:
    """A config file (nginx, HAProxy) as its directives, one a line, without comments."""
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.split()))
    return lines


def upstream_servers(path: Path) -> list[str]:
    text = path.read_text()
    block = re.search(r"^[ \t]*upstream till \{\n(.*?)^[ \t]*\}", text, re.M | re.S)
    assert block, f"{path}: no `upstream till` block"
    return re.findall(r"^[ \t]*server[ \t]+([^\s;]+)", block[1], re.M)


# --- every file ----------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert DEPLOY / "docker-compose.yml" in files
    for path in files:
        load_yaml(path)
    for path, doc in k8s_objects():
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{path}: a document has no {field}"
        assert doc["metadata"].get("name"), f"{path}: a {doc['kind']} has no name"


def test_deploy_readme_names_every_recipe() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in committed_files():
        if path.name not in {"README.md", ".gitignore"}:
            assert path.name in readme, f"deploy/README.md never mentions {path.name}"


def test_no_keyring_or_key_is_committed() -> None:
    """Placeholders only: no value under deploy/ would open a token."""
    for path in [*committed_files(), ROOT / ".dockerignore"]:
        text = path.read_text()
        assert not KEYRING_ENTRY.search(text), f"{path}: looks like a real keyring entry"
        for prefix in ("till_sk_", "till_admin_", "sk-proj-", "sk-ant-", "AIza"):
            assert not re.search(re.escape(prefix) + r"[A-Za-z0-9]{8}", text), f"{path}: {prefix}"
    placeholders = [
        env_file(DEPLOY / "till.env.example")["TILL_SECRET_KEYS"],
        *(d.get("stringData", {}).get("TILL_SECRET_KEYS") for d in k8s_kind("Secret")),
    ]
    for value in placeholders:
        assert value, "a TILL_SECRET_KEYS placeholder is missing"
        with pytest.raises(KeyringError):
            Keyring.parse(value)


# --- the image -----------------------------------------------------------------------------


def test_dockerfile_builds_a_slim_multi_stage_non_root_image() -> None:
    steps = dockerfile()
    args = dict(rest.split("=", 1) for w, rest in steps if w == "ARG" and "=" in rest)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0]) for w, rest in steps
             if w == "FROM"]  # fmt: skip
    assert len(bases) >= 2, "deploy/Dockerfile: build and final stages expected"
    for base in bases:
        m = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
        assert m and int(m[1]) >= 11, f"deploy/Dockerfile: base {base} is not python:3.11+-slim"

    final = final_stage()
    user = instruction(final, "USER").split(":")[0]
    assert user not in {"root", "0"}, "deploy/Dockerfile: the final stage runs as root"
    assert instruction(final, "EXPOSE").split() == [str(PORT)]
    assert json.loads(instruction(final, "ENTRYPOINT")) == ["till"]
    cmd = json.loads(instruction(final, "CMD"))
    assert cmd == ["serve", "--host", "0.0.0.0"]
    args_ = build_parser().parse_args(cmd)  # a command `till` accepts
    assert args_.func.__name__ == "cmd_serve"
    assert json.loads(instruction(final, "VOLUME")) == ["/data"]
    env = dict(kv.split("=", 1) for kv in instruction(final, "ENV").split())
    assert env["TILL_DATA_DIR"] == "/data"
    assert_settings((k for k in env if k.startswith("TILL_")), "deploy/Dockerfile ENV")
    # The wheel is installed with the server extra, from the build stage's wheels only.
    install = " ".join(rest for w, rest in final if w == "RUN")
    assert "--no-index" in install and '"till-ac[server]"' in install


def test_dockerfile_healthcheck_runs_python_against_healthz() -> None:
    check = instruction(final_stage(), "HEALTHCHECK")
    exec_form = json.loads(check.split(" CMD ", 1)[1])
    assert exec_form[:2] == ["python", "-c"], "no curl in slim images: python does the check"
    code = exec_form[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "'/healthz'" in code and "/healthz" in served_get_paths()


def test_dockerignore_is_an_allowlist() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must exclude everything first (keyrings, venvs)"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {w for step, rest in dockerfile() if step == "COPY" and "--from" not in rest
              for w in rest.split()[:-1]}  # fmt: skip
    assert copied <= allowed, f"COPY of files .dockerignore leaves out: {copied - allowed}"
    assert "deploy" not in allowed


# --- docker compose ------------------------------------------------------------------------


def test_compose_runs_three_workers_on_one_image_with_redis_and_nginx() -> None:
    doc = compose()
    services = doc["services"]
    workers = till_services()
    images = {s["image"] for s in workers.values()}
    assert images == {f"till:{project_version()}"}, f"worker images {images}"
    for name, svc in workers.items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / "deploy/Dockerfile").is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert seconds(svc["stop_grace_period"]) > graceful_timeout(), name
        assert "ports" not in svc, f"{name}: only nginx publishes a port"
        env = env_mapping(svc.get("environment"))
        assert_settings(env, f"docker-compose.yml {name}")
        from_env(env)  # the values are valid too
        assert env["TILL_REDIS_URL"].startswith("redis://redis:")
        assert svc["env_file"] == "till.env"
    assert "till.env" in (DEPLOY / ".gitignore").read_text().split()

    # Redis: AOF on, fsync every second, nothing evicted.
    redis_cmd = services["redis"]["command"]
    flags = dict(zip(redis_cmd[1::2], redis_cmd[2::2], strict=True))
    assert redis_cmd[0] == "redis-server"
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"

    # nginx: starts after every worker is healthy, and is the only trusted proxy.
    nginx = services["nginx"]
    assert {n: d["condition"] for n, d in nginx["depends_on"].items()} == {
        n: "service_healthy" for n in workers
    }
    address = nginx["networks"]["till"]["ipv4_address"]
    for svc in workers.values():
        assert env_mapping(svc["environment"])["TILL_TRUSTED_PROXIES"] == address
    (mount,) = nginx["volumes"]
    source, target, _ = mount.split(":")
    assert target == "/etc/nginx/nginx.conf" and (DEPLOY / source).is_file()
    assert sorted(upstream_servers(DEPLOY / source)) == [f"{n}:{PORT}" for n in sorted(workers)]

    for name, svc in services.items():
        assert "healthcheck" in svc, f"docker-compose.yml: {name} has no healthcheck"


def test_compose_healthchecks_probe_what_till_serves() -> None:
    for name, svc in till_services().items():
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        compile(test[3], name, "exec")
        (path,) = re.findall(r"'(/\w+)'", test[3])
        assert f"', {PORT}," in test[3]
        assert path in PROBE_PATHS & served_get_paths(), f"{name} probes {path}"


# --- nginx ---------------------------------------------------------------------------------


def test_nginx_compose_conf_is_nginx_conf_but_for_where_it_runs() -> None:
    """Only user, pid, logs and the upstream addresses may differ: nothing else drifts."""
    where = re.compile(r"^(user|pid|error_log|access_log) ")

    def shape(path: Path) -> list[str]:
        out = []
        for line in directives(path):
            if where.match(line):
                out.append(line.split()[0])
            elif line.startswith("server ") and ":" in line.split()[1]:
                out.append("server " + " ".join(line.split()[2:]))  # parameters kept
            else:
                out.append(line)
        return out

    assert shape(DEPLOY / "nginx.compose.conf") == shape(DEPLOY / "nginx.conf")


@pytest.mark.parametrize("name", ["nginx.conf", "nginx.compose.conf"])
def test_nginx_accepts_the_config(name: str, tmp_path: Path) -> None:
    """`nginx -t` on the file, rewritten by tests/lb.py for local upstreams and a temp dir."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not exe:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    servers = [f"127.0.0.1:{8001 + i}" for i in range(len(upstream_servers(DEPLOY / name)))]
    conf = tmp_path / "nginx.conf"
    conf.write_text(render((DEPLOY / name).read_text(), servers, "127.0.0.1:8080", tmp_path))
    done = subprocess.run(
        [exe, "-t", "-q", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "e.log")],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


# --- HAProxy -------------------------------------------------------------------------------


def haproxy_lines() -> list[str]:
    return directives(DEPLOY / "haproxy.cfg")


def test_haproxy_cfg_is_set_up_for_streams() -> None:
    lines = haproxy_lines()
    for name in ("client", "server", "tunnel"):
        (value,) = [ln.split()[2] for ln in lines if ln.startswith(f"timeout {name} ")]
        assert seconds(value) >= 3600, f"timeout {name} {value}: streams need an hour"
    for required in ("balance leastconn", "option forwardfor", "option http-no-delay",
                     "option httpchk", "http-check expect status 200"):  # fmt: skip
        assert required in lines, f"haproxy.cfg: no `{required}`"
    for forbidden in ("option httplog", "option http-server-close", "option http-buffer-request"):
        assert forbidden not in lines, f"haproxy.cfg: `{forbidden}`"
    (check,) = [ln for ln in lines if ln.startswith("http-check send ")]
    path = check.split(" uri ")[1].split()[0]
    assert path in PROBE_PATHS & served_get_paths()
    # Logs: the path without its query string (?key= can carry a token).
    (fmt,) = [ln for ln in lines if ln.startswith("log-format ")]
    assert "%HPO" in fmt
    assert not re.search(r"%(\{[^}]*\})?(r|HU|HQ|hr|hrl|CC)\b", fmt), fmt
    # The same layout as nginx.conf: same instances, same client port.
    servers = [ln.split()[2] for ln in lines if ln.startswith("server ")]
    assert servers == upstream_servers(DEPLOY / "nginx.conf")
    (bind,) = [ln for ln in lines if ln.startswith("bind ")]
    (listen,) = [ln for ln in directives(DEPLOY / "nginx.conf") if ln.startswith("listen ")]
    assert bind.split()[1].rsplit(":", 1)[1] == listen.split()[1].rsplit(":", 1)[-1]


def test_haproxy_accepts_the_config() -> None:
    exe = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else ""
    )
    if not exe:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run installs it)")
    done = subprocess.run(
        [exe, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True, timeout=20
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_has_every_object_a_deployment_needs() -> None:
    kinds = {d["kind"] for _, d in k8s_objects()}
    needed = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
              "Secret", "ConfigMap"}  # fmt: skip
    assert needed <= kinds, f"deploy/k8s lacks {needed - kinds}"
    # `kubectl apply -f deploy/k8s/` must never apply the placeholder keyring over a real one.
    for path, doc in k8s_objects():
        if doc["kind"] == "Secret":
            assert path.parent != K8S, f"{path}: keep the Secret out of deploy/k8s/ itself"


def test_k8s_deployment_probes_ports_and_security() -> None:
    dep = till_deployment()
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    container = till_container()
    assert container["image"] == f"till:{project_version()}", "same image as docker-compose.yml"
    assert build_parser().parse_args(container["args"]).func.__name__ == "cmd_serve"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT} and Settings().port == PORT

    served = served_get_paths()
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in [*probes.values(), container["startupProbe"]["httpGet"]]:
        assert probe["path"] in served, f"Till serves no GET {probe['path']}"
        assert ports.get(probe["port"], probe["port"]) == PORT

    # Draining: the Service stops sending (preStop) before SIGTERM, then open streams finish.
    (sleep,) = container["lifecycle"]["preStop"]["exec"]["command"][1:]
    assert pod["terminationGracePeriodSeconds"] > float(sleep) + graceful_timeout()

    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"


def test_k8s_objects_point_at_each_other() -> None:
    dep = till_deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    container = till_container()

    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == APP]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get(port["targetPort"], port["targetPort"]) == PORT

    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 3
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"

    pdb = one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or (
        pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    ), "the PodDisruptionBudget must allow one pod to go"

    names = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_objects()}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        else:
            assert ("Secret", source["secretRef"]["name"]) in names


def test_k8s_environment_is_what_till_reads() -> None:
    config = one("ConfigMap")["data"]
    assert_settings(config, "deploy/k8s ConfigMap")
    from_env(config)  # the values are valid too
    for secret in k8s_kind("Secret"):
        assert_settings(secret.get("stringData", {}), "deploy/k8s Secret")
        assert "TILL_SECRET_KEYS" in secret["stringData"]
    assert_settings((e["name"] for e in till_container().get("env", [])), "deploy/k8s env")


# --- systemd -------------------------------------------------------------------------------


def test_systemd_unit_runs_till_hardened_with_a_graceful_stop() -> None:
    u = unit("till.service")
    assert {"Unit", "Service", "Install"} <= set(u.sections())
    s = u["Service"]
    assert s["User"] == APP
    assert s["EnvironmentFile"] == "/etc/till/till.env"
    exec_start = shlex.split(s["ExecStart"])
    assert exec_start[0] == "/opt/till/.venv/bin/till"
    assert build_parser().parse_args(exec_start[1:]).func.__name__ == "cmd_serve"
    assert s["Restart"] == "on-failure"
    assert s["KillSignal"] == "SIGTERM"
    assert s["KillMode"] == "mixed", "SIGTERM to the main process only, which drains workers"
    assert seconds(s["TimeoutStopSec"]) > graceful_timeout()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():  # fmt: skip
        assert s[key] == value, f"till.service: {key}={s.get(key)}"
    env = dict(kv.split("=", 1) for kv in shlex.split(s["Environment"]))
    assert_settings(env, "till.service Environment=")
    assert env["TILL_DATA_DIR"] in s["ReadWritePaths"].split()
    assert u["Install"]["WantedBy"] == "multi-user.target"

    example = env_file(DEPLOY / "till.env.example")
    assert_settings(example, "deploy/till.env.example")
    from_env(example)


def test_systemd_template_is_the_unit_with_a_port_per_instance() -> None:
    def shape(name: str) -> list[str]:
        return [
            line for line in (DEPLOY / name).read_text().splitlines()
            if line and not line.startswith(("#", "Description=", "ExecStart="))
        ]  # fmt: skip

    assert shape("till@.service") == shape("till.service")
    exec_start = shlex.split(unit("till@.service")["Service"]["ExecStart"])
    assert exec_start[1:] == ["serve", "--port", "%i"]


@pytest.mark.parametrize("name", ["till.service", "till@.service"])
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """systemd's own parser: any unknown key or bad value is a warning, and fails here."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    # /opt/till is not installed here: point ExecStart at an executable that is.
    text = (DEPLOY / name).read_text().replace("/opt/till/.venv/bin/till", "/bin/true")
    (tmp_path / name).write_text(text)
    target = tmp_path / name.replace("@.", "@8001.")
    done = subprocess.run([exe, "verify", str(target)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
