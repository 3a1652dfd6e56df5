"""The Docker images and compose files against the real command lines.

Static checks (no Docker engine needed): every command and ENTRYPOINT/CMD parses with the real
argparse parser of `cortex` / `neuron`, and the settings a container ends up with (image ENV, then
compose environment, then command flags, resolved by common.config exactly as the process does)
are consistent: health checks probe the port the server listens on, neurons advertise the address
other services reach them at and register with cortex's port, the drain time fits in the stop
grace period, every CORTEX_*/NEURON_* variable is a real setting. The compose files need PyYAML;
`docker-compose config` runs too where the binary exists.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import resolve
from tests.helpers import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose files (pip install pyyaml)")

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
MULTIHOST = DOCKER / "docker-compose.multihost.yml"
DOCKERFILES = {"cortex": DOCKER / "cortex.Dockerfile", "neuron": DOCKER / "neuron.Dockerfile"}
# Variables a container may set besides our own settings.
FOREIGN_ENV = re.compile(r"^(NCCL_|CUDA_|CUPY_|NVIDIA_|PYTHON|PIP_|LOG_FORMAT$|PATH$|DEBIAN_FRONTEND$)")
# Example values for ${VAR} references without a default, as an operator would set them.
EXAMPLE_ENV = {"NEURON_ADVERTISE": "10.0.0.12:50061", "CORTEX_ADDR": "10.0.0.11:50051"}


# ---------------------------------------------------------------- the real command lines

def cli(component: str):
    if component == "cortex":
        from cortex import cli as module
    else:
        from neuron import cli as module
    assert hasattr(module, "build_parser"), f"{component}.cli has no build_parser()"
    return module


def parse(component: str, argv: list[str]):
    """Parse like the process does; argparse errors become test failures with the message."""
    parser = cli(component).build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"`{component} {shlex.join(argv)}` is rejected by the {component} CLI (exit {err.code})")


def effective_settings(component: str, argv: list[str], env: dict[str, str], monkeypatch) -> dict:
    """The settings `component serve` resolves from argv and the container's environment."""
    module = cli(component)
    args = parse(component, argv)
    assert args.command == "serve", f"{component} is started with {argv}, not `serve`"
    prefix = component.upper()
    with monkeypatch.context() as m:
        for name in [k for k in os.environ if k.startswith(prefix + "_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, str(value))
        return resolve(args, module.SETTINGS, prefix, args.config)


def known_env(component: str) -> set[str]:
    return {f"{component.upper()}_{s.name.upper()}" for s in cli(component).SETTINGS}


def check_env_names(where: str, env: dict) -> None:
    from tools.gen_config_docs import ENV_ONLY
    known = known_env("cortex") | known_env("neuron") | {name for name, *_ in ENV_ONLY}
    for name in env:
        if name.startswith(("CORTEX_", "NEURON_")):
            assert name in known, f"{where}: {name} is not a setting of cortex or neuron ({sorted(known)})"
        else:
            assert FOREIGN_ENV.match(name), f"{where}: unexpected variable {name}"


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# ---------------------------------------------------------------- Dockerfiles

@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def read_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """ARG defaults before the first FROM, and the stages with their (KEYWORD, args) lines."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def exec_form(where: str, text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(f"{where} must be in exec form (a JSON array), so signals reach the process: {text}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.all("HEALTHCHECK")
    assert " CMD " in f" {check} ", f"HEALTHCHECK without CMD: {check}"
    return exec_form("HEALTHCHECK CMD", f" {check}".split(" CMD ", 1)[1])


def assert_health_command(where: str, command: list[str], listen: str, monkeypatch,
                          env: dict[str, str] | None = None, settings: dict | None = None) -> None:
    """`cortex health [client TLS flags] 127.0.0.1:PORT`, PORT being the one the server listens on, a
    real subcommand; against a TLS server (settings given) it speaks TLS with the server's CA, and
    presents a certificate where the server requires one."""
    assert command[:2] == ["cortex", "health"], (
        f"{where}: the health check must be the gRPC health command `cortex health ADDR`, got {command}")
    with monkeypatch.context() as m:  # the client options default from the container's environment
        for name in [k for k in os.environ if k.startswith("CORTEX_")]:
            m.delenv(name)
        for name, value in (env or {}).items():
            m.setenv(name, str(value))
        args = parse("cortex", command[1:])
    assert args.command == "health" and args.address, f"{where}: {command}"
    host, port = args.address.rsplit(":", 1)
    assert host in ("127.0.0.1", "localhost"), f"{where}: probe the server from inside the container: {command}"
    assert int(port) == port_of(listen), f"{where}: health check probes port {port}, the server listens on {listen}"
    if settings and settings.get("tls_cert"):
        assert args.client_tls_ca == settings["tls_ca"], f"{where}: a TLS server is probed over TLS with its CA"
        if settings["tls_require_client_cert"]:
            assert args.client_tls_cert and args.client_tls_key, (
                f"{where}: the server requires client certificates, so the probe must present one")


@pytest.mark.parametrize("component", ["cortex", "neuron"])
def test_dockerfile(component, monkeypatch):
    path = DOCKERFILES[component]
    args, stages = read_dockerfile(path)
    assert len(stages) >= 2, f"{path.name}: multi-stage build expected (a build stage, then the runtime image)"
    final = stages[-1]
    if component == "cortex":
        assert re.match(r"python:3\.12-slim", final.base), f"cortex runs on a slim Python 3.12 base: {final.base}"
    else:
        assert re.match(r"nvidia/cuda:12\.[\d.]+-runtime-ubuntu", final.base), (
            f"neuron runs on NVIDIA's CUDA 12 runtime image: {final.base}")
        assert final.base == stages[0].base, "build and runtime stages of the neuron use the same base"
        build_runs = " ".join(stages[0].all("RUN"))
        assert '".[cuda12]"' in build_runs or "'.[cuda12]'" in build_runs, "neuron installs the cuda12 extra"

    # Nothing to build with in the final image; the package arrives as a finished venv.
    final_runs = " ".join(final.all("RUN"))
    for tool in ("build-essential", "gcc", "g++", "make", "python3-pip", "python3-venv", "python3-dev", "pip install"):
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", final_runs), f"{path.name}: {tool} in the final stage"
    assert any("--from=" in c for c in final.all("COPY")), f"{path.name}: the final stage copies the built venv"

    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{path.name}: the server must not run as root"

    env = env_of(final)
    check_env_names(path.name, env)
    (entrypoint,) = [exec_form("ENTRYPOINT", e) for e in final.all("ENTRYPOINT")]
    (cmd,) = [exec_form("CMD", c) for c in final.all("CMD")]
    assert entrypoint == [component], f"{path.name}: ENTRYPOINT is the `{component}` console script"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert component in scripts
    settings = effective_settings(component, cmd, env, monkeypatch)
    assert settings["listen"].startswith("0.0.0.0:"), f"{path.name}: listen on all interfaces in a container"
    assert str(port_of(settings["listen"])) in " ".join(final.all("EXPOSE")).split()
    assert_health_command(f"{path.name} HEALTHCHECK", healthcheck_command(final), settings["listen"], monkeypatch)
    if component == "neuron":
        assert settings["model_root"] == ["/models"], "the neuron reads checkpoints from the /models mount"
        assert env.get("NCCL_NVLS_ENABLE") == "0"


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed_out in (".git", ".venv"):
        assert needed_out in patterns, f".dockerignore should leave out {needed_out}"
    for needed_in in ("pyproject.toml", "README.md", "cortex", "neuron", "common"):
        assert needed_in not in patterns and f"/{needed_in}" not in patterns, f"the images need {needed_in}"
    copied = set()
    for path in DOCKERFILES.values():
        for stage in read_dockerfile(path)[1]:
            for copy in stage.all("COPY"):
                if "--from=" not in copy:
                    copied.update(copy.split()[:-1])
    for source in copied:
        assert (ROOT / source).exists(), f"a Dockerfile copies {source}, which is not in the repo"


# ---------------------------------------------------------------- compose files

def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with `env` standing for the shell."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        assert op == ":?" or name in EXAMPLE_ENV, f"${{{name}}} has no default and no example value"
        return EXAMPLE_ENV[name]
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def load_compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def component_of(service: dict) -> str:
    dockerfile = service.get("build", {}).get("dockerfile", "")
    for component, path in DOCKERFILES.items():
        if dockerfile.endswith(path.name):
            return component
    pytest.fail(f"cannot tell whether a service is cortex or neuron: {service.get('image')}")


def image_env(component: str) -> dict[str, str]:
    return env_of(read_dockerfile(DOCKERFILES[component])[1][-1])


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", duration):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def service_settings(name: str, service: dict, monkeypatch) -> tuple[str, dict]:
    component = component_of(service)
    env = interpolate(environment(service), {})
    check_env_names(f"{name}.environment", env)
    command = interpolate(service.get("command") or read_cmd(component), {})
    assert isinstance(command, list), f"{name}: write `command:` as a list, so no shell mangles it"
    return component, effective_settings(component, command, {**image_env(component), **env}, monkeypatch)


def read_cmd(component: str) -> list[str]:
    stage = read_dockerfile(DOCKERFILES[component])[1][-1]
    return exec_form("CMD", stage.all("CMD")[-1])


def check_common(name: str, service: dict, component: str, settings: dict, monkeypatch) -> None:
    env = {**image_env(component), **interpolate(environment(service), {})}
    assert_health_command(f"{name}.healthcheck", interpolate(service["healthcheck"]["test"], {})[1:],
                          settings["listen"], monkeypatch, env, settings)
    assert service["healthcheck"]["test"][0] == "CMD", f"{name}: exec-form health check (no shell needed)"
    assert service.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name}: restart policy"
    from neuron.cli import STOP_GRACE_SECONDS
    grace = seconds(service.get("stop_grace_period", "10s"))
    need = settings["drain_seconds"] + STOP_GRACE_SECONDS + 5
    assert grace >= need, (f"{name}: stop_grace_period {grace:.0f}s must outlast the drain "
                           f"({settings['drain_seconds']:.0f}s) plus the stop grace, or docker SIGKILLs the drain")


def gpu_reservations(name: str, service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert devices, f"{name}: a neuron reserves its GPUs (deploy.resources.reservations.devices)"
    for d in devices:
        assert d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []), f"{name}: {d}"
        assert ("device_ids" in d) != ("count" in d), f"{name}: give device_ids or count: {d}"
    return devices


def test_single_host_compose(monkeypatch):
    doc = load_compose(COMPOSE)
    services = doc["services"]
    assert "cortex" in services
    neurons = {n: s for n, s in services.items() if "build" in s and component_of(s) == "neuron"}
    assert len(neurons) >= 2, "the fleet has at least two neurons"
    _, cortex = service_settings("cortex", services["cortex"], monkeypatch)
    check_common("cortex", services["cortex"], "cortex", cortex, monkeypatch)
    cortex_port = port_of(cortex["listen"])
    published = [interpolate(str(p), {}) for p in services["cortex"].get("ports", [])]
    assert any(p.endswith(f":{cortex_port}") for p in published), "cortex's gRPC port is published for clients"

    gpu_ids: list[str] = []
    for name, service in neurons.items():
        component, settings = service_settings(name, service, monkeypatch)
        check_common(name, service, component, settings, monkeypatch)
        # Registration by service name, at the port cortex really listens on.
        assert settings["cortex"] == f"cortex:{cortex_port}", f"{name} registers with {settings['cortex']!r}"
        advertise_host, advertise_port = settings["advertise"].rsplit(":", 1)
        assert advertise_host in (name, service.get("hostname")), (
            f"{name} advertises {settings['advertise']!r}: cortex must reach it by its service name")
        assert int(advertise_port) == port_of(settings["listen"])
        assert service["depends_on"]["cortex"]["condition"] == "service_healthy"
        for d in gpu_reservations(name, service):
            gpu_ids += [str(i) for i in d.get("device_ids", [])]
        mounts = service.get("volumes", [])
        assert any(str(m).split(":")[1:] == ["/models", "ro"] for m in mounts), f"{name}: /models mounted read-only"
        assert "/models" in settings["model_root"]
        env = environment(service)
        assert "NCCL_SOCKET_IFNAME" in env, f"{name}: NCCL_SOCKET_IFNAME set"
        assert env.get("NCCL_NVLS_ENABLE") == "0", f"{name}: NVLink multicast off"
    assert len(gpu_ids) == len(set(gpu_ids)), f"two neurons reserve the same GPU: {gpu_ids}"
    assert "models" in doc.get("volumes", {}), "the models volume is declared"
    advertised = [service_settings(n, s, monkeypatch)[1]["advertise"] for n, s in neurons.items()]
    assert len(set(advertised)) == len(advertised), "every neuron advertises its own address"


def test_prometheus_scrapes_the_fleet_where_it_serves_metrics(monkeypatch):
    """The optional prometheus service's targets are cortex's HTTP port and every neuron's metrics
    port, as the processes resolve them, by service name."""
    services = load_compose(COMPOSE)["services"]
    prometheus = services["prometheus"]
    assert prometheus.get("profiles") == ["metrics"], "Prometheus is optional (profile metrics)"
    mount = next(str(v) for v in prometheus["volumes"] if "prometheus.yml" in str(v))
    config = yaml.safe_load((DOCKER / mount.split(":")[0].removeprefix("./")).read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    _, cortex = service_settings("cortex", services["cortex"], monkeypatch)
    expected = {f"cortex:{port_of(cortex['http_listen'])}"}
    for name, service in services.items():
        if "build" in service and component_of(service) == "neuron":
            expected.add(f"{name}:{port_of(service_settings(name, service, monkeypatch)[1]['metrics_listen'])}")
    assert targets == expected
    published = [interpolate(str(p), {}) for p in services["cortex"].get("ports", [])]
    assert any(p.endswith(f":{port_of(cortex['http_listen'])}") for p in published), "the HTTP API is published"


def test_multihost_compose(monkeypatch):
    services = load_compose(MULTIHOST)["services"]
    assert services["cortex"].get("profiles") == ["head"], "cortex runs only on the head host (profile)"
    neurons = {n: s for n, s in services.items() if component_of(s) == "neuron"}
    assert neurons
    for name, service in {**neurons, "cortex": services["cortex"]}.items():
        component, settings = service_settings(name, service, monkeypatch)
        check_common(name, service, component, settings, monkeypatch)
        assert service.get("network_mode") == "host", f"{name}: host networking (NCCL's ports, advertised IPs)"
    for name, service in neurons.items():
        _, settings = service_settings(name, service, monkeypatch)
        assert settings["cortex"] and settings["advertise"], f"{name} joins by cortex address, advertising its own"
        assert "depends_on" not in service, f"{name}: cortex may be on another host; the neuron retries instead"
        gpu_reservations(name, service)
        assert any(str(m).endswith(":/models:ro") for m in service.get("volumes", [])), f"{name}: /models read-only"
        assert "NCCL_SOCKET_IFNAME" in environment(service)
        # The advertised address comes from the operator: no default that would silently be wrong.
        assert "${NEURON_ADVERTISE:?" in " ".join(service["command"])


@pytest.mark.parametrize("path,extra", [(COMPOSE, []), (MULTIHOST, ["--profile", "head"])],
                         ids=["single-host", "multihost"])
def test_docker_compose_config_validates(path, extra):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env = {**os.environ, **EXAMPLE_ENV}
    result = subprocess.run([binary, "-f", str(path), *extra, "config", "-q"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", [COMPOSE, MULTIHOST], ids=["single-host", "multihost"])
def test_compose_wires_api_keys_cluster_token_and_tls_as_secrets(path, monkeypatch):
    doc = load_compose(path)
    declared = doc.get("secrets", {})
    for name, secret in declared.items():
        assert "file" in secret and "secrets" in interpolate(secret["file"], {}), f"secret {name}: {secret}"
    for name, service in doc["services"].items():
        if "build" not in service:
            continue  # not ours (prometheus)
        component, settings = service_settings(name, service, monkeypatch)
        files = ["cluster_token_file", "tls_cert", "tls_key", "tls_ca"] + (["api_keys"] if component == "cortex" else [])
        mounted = set(service.get("secrets", []))
        for setting in files:
            value = settings[setting]
            assert value.startswith("/run/secrets/"), f"{name}: {setting} must come from a Docker secret: {value!r}"
            secret = value.removeprefix("/run/secrets/")
            assert secret in mounted, f"{name}: {setting} reads {value}, but the service does not mount {secret}"
            assert secret in declared, f"{path.name}: secret {secret} is not declared"
        if component == "neuron":
            assert settings["tls_require_client_cert"], f"{name}: neurons take only cortex and peers (mutual TLS)"



def test_prometheus_scrapes_cortex_over_https_with_the_fleet_ca(monkeypatch):
    services = load_compose(COMPOSE)["services"]
    _, cortex = service_settings("cortex", services["cortex"], monkeypatch)
    assert cortex["tls_cert"], "the compose cortex serves TLS, its HTTP port included"
    prometheus = services["prometheus"]
    mount = next(str(v) for v in prometheus["volumes"] if "prometheus.yml" in str(v))
    config = yaml.safe_load((DOCKER / mount.split(":")[0].removeprefix("./")).read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cortex"]
    assert job.get("scheme") == "https", "cortex's /metrics is on its HTTPS port"
    ca = job["tls_config"]["ca_file"]
    assert ca == cortex["tls_ca"] and ca.removeprefix("/run/secrets/") in prometheus.get("secrets", [])
