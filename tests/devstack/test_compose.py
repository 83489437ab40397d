"""docker-compose.yml, the Dockerfile and .env.example agree with each other and the settings.

No Docker engine is needed: the files are parsed, not run.
"""

import re
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ["migrate", "web", "worker", "beat", "worker-gpu", "flower"]
LONG_RUNNING = ["postgres", "redis", "s3", "web", "worker", "worker-gpu", "flower", "prometheus"]
# Read by Flower itself, not by the project's settings.
FLOWER_ENV = {"FLOWER_BASIC_AUTH"}
# What the settings need from a deployment; the local defaults would be wrong in containers.
REQUIRED_APP_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_REGION",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "DJANGO_ALLOWED_HOSTS",
    "MODEL_DIR",
}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def command_text(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def dockerfile_stages() -> set[str]:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.MULTILINE | re.IGNORECASE))


def settings_env_names() -> set[str]:
    """Every variable diagnostics/settings.py reads with django-environ (env(...), env.str(...))."""
    settings = (PROJECT_ROOT / "diagnostics" / "settings.py").read_text()
    return set(re.findall(r"\benv(?:\.\w+)?\(\s*\"([A-Z][A-Z0-9_]*)\"", settings))


def interpolated_names(node) -> set[str]:
    """The ${NAME...} variables compose fills in from .env, anywhere in the parsed file."""
    if isinstance(node, dict):
        return set().union(*(interpolated_names(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(interpolated_names(item) for item in node))
    if isinstance(node, str):
        return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", node))
    return set()


def test_the_stack_has_every_service(services):
    assert set(services) == {
        "postgres",
        "redis",
        "s3",
        "migrate",
        "web",
        "worker",
        "beat",
        "worker-gpu",
        "flower",
        "prometheus",
    }


def test_backing_services_use_official_images_and_keep_data_in_volumes(compose, services):
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:")
    for name in ("postgres", "redis", "s3"):
        [volume] = services[name]["volumes"]
        assert volume.split(":")[0] in compose["volumes"]


def test_redis_persists_the_queue(services):
    assert "--appendonly yes" in command_text(services["redis"])


def test_s3_accepts_the_keys_the_services_use(compose, services):
    assert "-s3" in services["s3"]["command"]
    [config] = services["s3"]["configs"]
    assert f"-s3.config={config['target']}" in services["s3"]["command"]
    identities = compose["configs"][config["source"]]["content"]
    assert "${S3_ACCESS_KEY_ID" in identities and "${S3_SECRET_ACCESS_KEY" in identities


def test_python_services_run_the_project_entry_points(services):
    migrate = command_text(services["migrate"])
    assert "manage.py migrate" in migrate and "manage.py bootstrap_storage" in migrate
    assert command_text(services["web"]).startswith("gunicorn diagnostics.wsgi:application")
    for name in ("worker", "worker-gpu"):
        assert command_text(services[name]).startswith("celery -A workers worker")
    assert command_text(services["beat"]).startswith("celery -A workers beat")


def test_the_gpu_worker_takes_only_classification_and_the_cpu_worker_both_queues(services):
    from workers.app import CLASSIFY_QUEUE, QUEUES

    gpu = services["worker-gpu"]["command"]
    assert gpu[gpu.index("-Q") + 1] == CLASSIFY_QUEUE == "classify"
    # No queue option: every queue of the app, so housekeeping (`celery`) always has a worker.
    cpu = services["worker"]["command"]
    assert not any(arg.startswith(("-Q", "--queues", "-X", "--exclude-queues")) for arg in cpu)
    assert set(QUEUES) == {"classify", "celery"}


def test_python_services_build_from_stages_of_the_one_dockerfile(services):
    stages = dockerfile_stages()
    targets_by_image = {}
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert build["target"] in stages
        targets_by_image.setdefault(services[name]["image"], set()).add(build["target"])
    # Two targets under one tag would overwrite each other's image.
    assert all(len(targets) == 1 for targets in targets_by_image.values())
    assert services["worker-gpu"]["build"]["target"] != services["worker"]["build"]["target"]


def test_app_and_web_start_only_after_migrations_succeed(services):
    migrate_dependencies = services["migrate"]["depends_on"]
    assert migrate_dependencies["postgres"]["condition"] == "service_healthy"
    assert migrate_dependencies["s3"]["condition"] == "service_healthy"
    for name in ("web", "worker", "beat", "worker-gpu", "flower"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"


def test_gpu_worker_reserves_one_nvidia_gpu_in_the_gpu_profile(services):
    worker_gpu = services["worker-gpu"]
    assert worker_gpu["profiles"] == ["gpu"]
    [device] = worker_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_long_running_services_have_healthchecks_and_restart(services):
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["beat"]["restart"] == "unless-stopped"
    assert services["migrate"]["restart"] == "no"


def test_python_services_get_every_setting_a_deployment_needs(services):
    for name in APP_SERVICES:
        assert REQUIRED_APP_ENV <= set(services[name]["environment"]), name
    assert services["web"]["environment"]["DJANGO_DEBUG"] == "false"


def test_python_services_set_only_variables_the_settings_read(services):
    read_by_settings = settings_env_names()
    assert REQUIRED_APP_ENV <= read_by_settings
    for name in APP_SERVICES:
        assert set(services[name]["environment"]) - FLOWER_ENV <= read_by_settings, name
    assert set(services["flower"]["environment"]) & FLOWER_ENV == FLOWER_ENV


def test_env_example_lists_exactly_the_variables_compose_interpolates(compose):
    lines = (PROJECT_ROOT / ".env.example").read_text().splitlines()
    example_names = {line.split("=")[0] for line in lines if line and not line.startswith("#")}
    assert interpolated_names(compose) == example_names


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    ignored = set((PROJECT_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".devstack", ".env"} <= ignored


def healthcheck_text(service: dict) -> str:
    return " ".join(service["healthcheck"]["test"])


def test_web_is_healthy_when_ready_and_workers_once_their_model_is_loaded(services):
    # /readyz: database with migrations, Redis and S3 (diagnostics/health.py).
    assert "http://127.0.0.1:8000/readyz" in healthcheck_text(services["web"])
    for name in ("worker", "worker-gpu"):
        # The readiness file the pool process writes after loading the model (workers/health.py).
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "workers.health"]


def test_flower_monitors_the_workers_behind_a_login(services):
    flower = services["flower"]
    assert command_text(flower).startswith("celery -A workers flower --port=5555")
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["ports"] == ["127.0.0.1:${FLOWER_PORT:-5555}:5555"]
    assert "http://127.0.0.1:5555/healthcheck" in healthcheck_text(flower)


def test_prometheus_scrapes_the_api_and_every_worker_where_they_serve_metrics(services):
    from django.conf import settings

    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((PROJECT_ROOT / "ops" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["diagnostics-api"]["static_configs"] == [{"targets": ["web:8000"]}]
    assert "--bind=0.0.0.0:8000" in command_text(services["web"])
    [workers] = jobs["diagnostics-workers"]["dns_sd_configs"]
    assert workers["names"] == ["worker", "worker-gpu"]
    assert workers["port"] == settings.WORKER_METRICS_PORT


def test_the_grafana_dashboard_charts_metrics_the_code_exports():
    import json

    dashboard = json.loads((PROJECT_ROOT / "ops" / "grafana-dashboard.json").read_text())
    queries = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    source = "".join(
        (PROJECT_ROOT / path).read_text()
        for path in ("workers/instruments.py", "workers/metrics.py")
    )
    charted = set(re.findall(r"\b(diagnostics_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b", queries))
    assert len(charted) == 7
    for name in charted:
        assert f'"{name}"' in source, name
    assert "django_http_requests_latency_seconds_by_view_method_bucket" in queries


def test_the_image_holds_the_project_compiled():
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    [packages] = re.findall(r"^RUN python -m compileall -q (.+)$", dockerfile, re.MULTILINE)
    compiled = set(packages.split())
    # What the web, worker and beat services import; a package renamed would start slower.
    assert {"diagnostics", "workers", "ml"} <= compiled
    assert all((PROJECT_ROOT / package / "__init__.py").is_file() for package in compiled)
