"""deploy/kubernetes/: every manifest is valid for the Kubernetes versions we state, and its
numbers agree with the server's settings (ports, probe paths, the termination grace period).

No cluster is needed. The schemas come from the `kubernetes-validate` package (test extra), in
strict mode, so a misspelt field fails instead of being dropped by the API server. The settings
are resolved from the manifest's FORKSERVER_* variables by forkserver.config, the code the
server itself runs at start, and one live check starts a real server with those variables and
asks the probe paths on its control port.
"""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from forkserver import config
from tests.conftest import ROOT, Server

MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest minor version the files are written for, and a recent one: both are checked, so a
# field removed or changed in between would show. Raise them together with the docs.
KUBERNETES_VERSIONS = ("1.30", "1.34")
# The control listener's contract (metrics_bind): liveness is the master's loop, readiness is
# "a worker of the serving generation is ready and we are not shutting down".
LIVEZ = "/livez"
READYZ = "/readyz"
CONTROL_PATHS = frozenset({LIVEZ, READYZ, "/metrics", "/status"})
# Seconds between the end of graceful_timeout and the kubelet's SIGKILL: the master's own exit
# and the runtime's signal delivery must fit in it.
GRACE_MARGIN = 5.0


def manifest_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCUMENTS = manifest_documents()


def the(kind: str) -> dict[str, Any]:
    found = [doc for _name, doc in DOCUMENTS if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = the("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment should run one container: forkserver"
    return containers[0]


def server_environ() -> dict[str, str]:
    """The container's FORKSERVER_* variables, as the server would see them."""
    environ = {}
    for var in container().get("env", []):
        if not var["name"].startswith(config.ENV_PREFIX):
            continue
        assert "value" in var, (f"{var['name']} must have a literal value, so that this test "
                                "can check it against the settings")
        environ[var["name"]] = var["value"]
    return environ


def resolved(tmp_path: Path) -> Any:
    """Settings from the manifest's variables, resolved as `forkserver` does at start (no
    config file: tmp_path is empty). A variable that names no setting fails here, by name."""
    try:
        return config.resolve({}, None, server_environ(), str(tmp_path))
    except config.ConfigError as error:
        pytest.fail(f"deploy/kubernetes/deployment.yaml: {error}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def container_port(port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container port it reaches."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's {sorted(named)}"
    return named[port]


# -- schemas -----------------------------------------------------------------------------------


def test_the_manifest_set_is_complete():
    kinds = sorted(doc["kind"] for _name, doc in DOCUMENTS)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", DOCUMENTS, ids=[f"{n}:{d['kind']}" for n, d in DOCUMENTS])
def test_manifest_is_valid_for_kubernetes(name, doc, version):
    try:
        checked = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.path)
        pytest.fail(f"{name}: {doc['kind']} is not valid for Kubernetes {version}: "
                    f"{where}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(f"{name}: {error.message}")
    assert checked == version, f"validated against {checked}, not the stated {version}"


def test_strict_validation_catches_a_misspelt_field():
    """The check above can fail: strict mode refuses a field the API does not know."""
    deployment = yaml.safe_load((MANIFESTS / "deployment.yaml").read_text())
    probe = deployment["spec"]["template"]["spec"]["containers"][0].pop("livenessProbe")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# -- the numbers agree with the settings -----------------------------------------------------


def test_every_forkserver_variable_is_a_setting_and_parses(tmp_path):
    settings = resolved(tmp_path)
    # Spot checks that the values arrived as the manifest means them.
    assert settings.bind == ("0.0.0.0:8000",)
    assert settings.metrics_bind == "0.0.0.0:9000"
    assert settings.error_log_format == "json"


def test_container_ports_are_the_bound_ports(tmp_path):
    settings = resolved(tmp_path)
    assert len(settings.bind) == 1, "one HTTP listener per pod"
    assert container_port("http") == port_of(settings.bind[0])
    assert container_port("control") == port_of(settings.metrics_bind)
    service_ports = the("Service")["spec"]["ports"]
    assert [container_port(p["targetPort"]) for p in service_ports] == [container_port("http")]


@pytest.mark.parametrize("probe,path", [("startupProbe", READYZ), ("readinessProbe", READYZ),
                                        ("livenessProbe", LIVEZ)])
def test_probes_ask_the_control_listener(tmp_path, probe, path):
    settings = resolved(tmp_path)
    get = container()[probe]["httpGet"]
    assert get["path"] == path
    assert get["path"] in CONTROL_PATHS
    assert get.get("scheme", "HTTP") == "HTTP"
    assert container_port(get["port"]) == port_of(settings.metrics_bind), \
        f"{probe} must ask the master's control port (metrics_bind), not a worker"


def test_grace_period_covers_the_delay_and_the_drain(tmp_path):
    settings = resolved(tmp_path)
    grace = the("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = settings.shutdown_delay + settings.graceful_timeout + GRACE_MARGIN
    assert grace >= needed, (f"terminationGracePeriodSeconds {grace} < shutdown_delay "
                             f"{settings.shutdown_delay} + graceful_timeout "
                             f"{settings.graceful_timeout} + {GRACE_MARGIN} margin")
    assert settings.shutdown_delay > 0, "without shutdown_delay the endpoint-removal race is open"


def test_probe_budgets_match_the_timeouts(tmp_path):
    settings = resolved(tmp_path)
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.boot_timeout, \
        "the startup probe must wait as long as boot_timeout lets a worker boot"
    readiness = container()["readinessProbe"]
    # A proxy that follows the readiness probe rather than the endpoint list must see 503
    # before the delay ends and the listeners close.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.shutdown_delay


def test_workers_follow_the_cpu_limit():
    environ = {v["name"] for v in container().get("env", [])}
    assert not environ & {"FORKSERVER_WORKERS", "WEB_CONCURRENCY"}, \
        "leave workers to the default, which reads the container's cpu.max"
    resources = container()["resources"]
    limit = resources["limits"]["cpu"]
    assert str(limit).isdigit(), f"a whole number of CPUs (workers = ceil(limit)), not {limit!r}"
    assert resources["requests"] == resources["limits"], "requests == limits: Guaranteed QoS"


def test_pod_is_locked_down():
    pod = the("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be writable scratch space"


def test_no_prestop_hook():
    """shutdown_delay does a preStop sleep's job (docs/kubernetes.md); both would add up."""
    assert "preStop" not in container().get("lifecycle", {})


def test_objects_select_the_deployments_pods():
    deployment = the("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": the("Service")["spec"]["selector"],
        "PodDisruptionBudget": the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), f"{kind} selects no pod of the Deployment"
    hpa = the("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["minReplicas"] >= 2, "one pod drained by the PDB must leave others serving"
    assert "cpu" in container()["resources"]["requests"], "CPU utilisation needs a CPU request"


# -- live: the probe paths answer on a real server started with the manifest's settings -------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers.get("Cache-Control", ""), \
                response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Cache-Control", ""), error.read().decode()


def test_probe_paths_answer_on_a_server_with_the_manifests_settings(tmp_path):
    resolved(tmp_path)  # an unknown variable fails here, by name, rather than at start
    control = free_port()
    env = {**server_environ(), "FORKSERVER_APP": "tests.apps.basic:app",
           "FORKSERVER_METRICS_BIND": f"127.0.0.1:{control}", "FORKSERVER_ACCESS_LOG": ""}
    env.pop("FORKSERVER_BIND")  # Server passes --bind 127.0.0.1:0, which beats it anyway
    server = Server(tmp_path, "tests.apps.basic:app", workers=1, env=env)
    try:
        server.start()
        for path, body in ((LIVEZ, "ok"), (READYZ, "ready")):
            status, cache, text = get(control, path)
            assert (status, text.strip()) == (200, body), f"GET {path}: {status} {text!r}"
            assert cache == "no-store", f"GET {path}: Cache-Control {cache!r}"
    finally:
        server.stop(signal.SIGQUIT)  # QUIT skips the shutdown delay
