"""The Azure deployment (infra/, azure.yaml, Dockerfile, requirements.lock) held against the code.

The container app's environment variables must be settings bridge/config.py reads, so that a renamed
setting cannot leave the deployment setting a name nobody reads; the production settings must all be
set; no secret may sit in a parameter default or an output; the termination grace period must cover the
drain and the goodbye; the probes must hit /healthz and /readyz; and the image's lock must pin every
runtime dependency. scripts/check-infra runs checkov and parses the Bicep; these tests need neither.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bridge.config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
APP = INFRA / "modules" / "containerapp.bicep"

# Read by Azure's SDKs rather than bridge/config.py: DefaultAzureCredential picks the user-assigned
# identity by AZURE_CLIENT_ID; Application Insights exporters read their connection string.
AZURE_RUNTIME_NAMES = {"AZURE_CLIENT_ID", "APPLICATIONINSIGHTS_CONNECTION_STRING"}
# What a production bridge on Azure cannot run without.
REQUIRED = {
    "TWILIO_AUTH_TOKEN",
    "BRIDGE_PUBLIC_URL",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_DEPLOYMENT",
    "BRIDGE_DATABASE",
    "BRIDGE_ADMIN_TOKEN",
    "AZURE_CLIENT_ID",
}
SECRET_WORDS = re.compile(r"token|secret|password|key|connectionstring", re.IGNORECASE)
# A name ending so refers to a secret (a Key Vault URI, a resource name or id) without holding it.
REFERENCE_SUFFIXES = ("uri", "url", "name", "id")
GOODBYE_SECONDS = 10


def config_setting_names() -> set[str]:
    """The environment variables bridge/config.py reads: its list when it has one, else its source."""
    listed = getattr(bridge.config, "SETTING_NAMES", None)
    if listed is not None:
        return set(listed)
    source = Path(bridge.config.__file__).read_text(encoding="utf-8")
    names = set(re.findall(r"""\benv(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']""", source))
    names |= set(re.findall(r"""\(\s*env\s*,\s*["']([A-Z][A-Z0-9_]+)["']""", source))
    return names


def app_env() -> dict[str, str]:
    """Each environment variable the container app sets, with the text of its entry."""
    text = APP.read_text(encoding="utf-8")
    entries: dict[str, str] = {}
    for match in re.finditer(r"\{\s*name:\s*'([A-Z][A-Z0-9_]*)'(.*?)\}", text, re.DOTALL):
        entries[match.group(1)] = match.group(2)
    return entries


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def params(path: Path) -> list[tuple[str, str, str | None, list[str]]]:
    """(name, type, default or None, decorators) for each ``param`` of a Bicep file."""
    found = []
    decorators: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("@"):
            decorators.append(stripped)
            continue
        match = re.match(r"param\s+(\w+)\s+(\w+)(?:\s*=\s*(.+))?$", stripped)
        if match:
            found.append((match.group(1), match.group(2), match.group(3), decorators))
        if stripped and not stripped.startswith("//"):
            decorators = []
    return found


def outputs(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    return re.findall(r"^output\s+(\w+)\s+\w+\s*=\s*(.+)$", text, re.MULTILINE)


def looks_secret(name: str) -> bool:
    return bool(SECRET_WORDS.search(name)) and not name.lower().endswith(REFERENCE_SUFFIXES)


def test_the_app_sets_only_settings_the_bridge_reads() -> None:
    env = app_env()
    assert len(env) >= len(REQUIRED), f"found too few env entries in {APP.name}: {sorted(env)}"
    known = config_setting_names()
    assert "TWILIO_AUTH_TOKEN" in known and "BRIDGE_PUBLIC_URL" in known, "could not read bridge/config.py"
    unknown = set(env) - known - AZURE_RUNTIME_NAMES
    assert not unknown, f"{APP.name} sets variables bridge/config.py does not read: {sorted(unknown)}"


def test_the_app_sets_every_production_setting() -> None:
    missing = REQUIRED - set(app_env())
    assert not missing, f"{APP.name} does not set {sorted(missing)}"


def test_secrets_reach_the_app_as_secret_references() -> None:
    for name, entry in app_env().items():
        if looks_secret(name):
            assert "secretRef:" in entry and "value:" not in entry, f"{name} must be a secretRef"
    text = APP.read_text(encoding="utf-8")
    for secret in ("twilio-auth-token", "bridge-admin-token"):
        assert re.search(rf"name:\s*'{secret}',\s*keyVaultUrl:", text), f"{secret} must come from Key Vault"


def test_database_url_has_no_password() -> None:
    text = APP.read_text(encoding="utf-8")
    url = re.search(r"name:\s*'BRIDGE_DATABASE'\s*value:\s*'(postgresql://[^']*)'", text)
    assert url, "BRIDGE_DATABASE is not a postgresql:// URL"
    assert re.match(r"postgresql://\$\{\w+\}@\$\{\w+\}:5432/", url.group(1)), url.group(1)
    assert "sslmode=require" in url.group(1)


def test_no_secret_in_a_parameter_default() -> None:
    checked = 0
    for path in bicep_files():
        for name, kind, default, decorators in params(path):
            if looks_secret(name):
                checked += 1
                where = f"{path.relative_to(ROOT)}: param {name}"
                assert default is None, f"{where} has a default"
                assert "@secure()" in decorators, f"{where} is not @secure()"
                assert kind == "string", where
    assert checked >= 4  # the two tokens, in main.bicep and in the Key Vault module


def test_no_secret_in_an_output() -> None:
    for path in bicep_files():
        secure = {name for name, _, _, decorators in params(path) if "@secure()" in decorators}
        for name, value in outputs(path):
            where = f"{path.relative_to(ROOT)}: output {name}"
            assert not looks_secret(name), where
            assert not re.search(r"listKeys|listSecrets|ConnectionString|\.value\b", value), where
            assert not any(re.search(rf"\b{s}\b", value) for s in secure), where


def test_parameter_file_only_refers_to_the_environment() -> None:
    text = (INFRA / "main.parameters.json").read_text(encoding="utf-8")
    declared = {name for name, *_ in params(INFRA / "main.bicep")}
    mapped = re.findall(r'"(\w+)":\s*\{\s*"value":\s*"([^"]*)"', text)
    assert mapped
    for name, value in mapped:
        assert name in declared, f"main.parameters.json sets {name}, which main.bicep does not declare"
        assert re.fullmatch(r"\$\{\w+(=[^}]*)?\}", value), f"{name} must come from the azd environment"
        if looks_secret(name):
            assert "=" not in value, f"{name} must have no default"


def _int_expr(expr: str, names: dict[str, int]) -> int:
    tree = ast.parse(expr.strip(), mode="eval").body

    def ev(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return ev(node.left) + ev(node.right)
        raise AssertionError(f"cannot evaluate {ast.dump(node)}")

    return ev(tree)


def test_termination_grace_covers_drain_and_goodbye() -> None:
    text = APP.read_text(encoding="utf-8")
    grace_var = re.search(r"terminationGracePeriodSeconds:\s*(\w+)", text)
    assert grace_var, "no terminationGracePeriodSeconds"
    values: dict[str, int] = {}
    for name, kind, default, _ in params(APP):
        if kind == "int" and default is not None:
            values[name] = int(default)
    for name, expr in re.findall(r"^var\s+(\w+)\s*=\s*([\w\s+]+)$", text, re.MULTILINE):
        values[name] = _int_expr(expr, values)
    assert "BRIDGE_DRAIN_SECONDS" in app_env() and "string(drainSeconds)" in app_env()["BRIDGE_DRAIN_SECONDS"]
    main_drain = {n: d for n, _, d, _ in params(INFRA / "main.bicep")}["drainSeconds"]
    max_drain = re.search(r"@maxValue\((\d+)\)\s*param drainSeconds", text)
    assert max_drain
    for drain in (int(main_drain or 0), values["drainSeconds"], int(max_drain.group(1))):
        values["drainSeconds"] = drain
        for name, expr in re.findall(r"^var\s+(\w+)\s*=\s*([\w\s+]+)$", text, re.MULTILINE):
            values[name] = _int_expr(expr, values)
        grace = values[grace_var.group(1)]
        assert grace > drain + GOODBYE_SECONDS, f"grace {grace} s does not cover drain {drain} s + goodbye"
        assert grace <= 600, "Container Apps allows at most 600 s"


def test_probes_hit_health_and_readiness() -> None:
    text = APP.read_text(encoding="utf-8")
    probes = dict(re.findall(r"type:\s*'(\w+)'\s*httpGet:\s*\{\s*path:\s*'([^']+)'", text))
    assert probes.get("Liveness") == "/healthz"
    assert probes.get("Readiness") == "/readyz"
    assert re.search(r"minReplicas:\s*1\b", text)
    assert re.search(r"concurrentRequests:", text)


def test_azure_yaml_service_matches_the_app_tag() -> None:
    azure = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    assert re.search(r"^services:\s*\n\s+bridge:\s*$", azure, re.MULTILINE)
    assert "'azd-service-name': 'bridge'" in APP.read_text(encoding="utf-8")
    for hook in re.findall(r"run:\s*(\S+)", azure):
        assert (ROOT / hook).is_file(), hook


def test_dockerfile_serves_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER\s+(?!root\b|0\b)\w+", final, re.MULTILINE)
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'CMD ["bridge", "serve", "--host", "0.0.0.0"]' in final
    assert "build-essential" not in final
    assert "EXPOSE 8080" in final


def _image_environment() -> dict[str, str]:
    """Markers as in the image: CPython 3.11 on Linux."""
    env = default_environment()
    env.update(
        python_version="3.11",
        python_full_version="3.11.0",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def test_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lock_text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pinned = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", lock_text, re.MULTILINE)
    }
    assert "--hash=sha256:" in lock_text
    env = _image_environment()
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"requirements.lock lacks {requirement.name}: run scripts/lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pinned[name]}, outside {requirement.specifier}: "
            "run scripts/lock"
        )


def test_config_names_are_found() -> None:
    names = config_setting_names()
    assert {"BRIDGE_DRAIN_SECONDS", "BRIDGE_MAX_CALLS", "AZURE_OPENAI_ENDPOINT"} <= names
