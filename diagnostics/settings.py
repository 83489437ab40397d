"""All configuration comes from the environment (django-environ).

Every setting has a default that works for local development against the services
`./stack up` starts, except production secrets: with DJANGO_DEBUG=false,
DJANGO_SECRET_KEY must be set.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = (
    env.str("DJANGO_SECRET_KEY", default="insecure-local-development-key")
    if DEBUG
    else env.str("DJANGO_SECRET_KEY")
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    # OpenAPI 3 schema from the code, with Swagger UI and ReDoc served from the package
    # itself (sidecar), so the docs work on hospital networks without a CDN.
    "drf_spectacular",
    "drf_spectacular_sidecar",
    # Request rate, latency and status per view for Prometheus.
    "django_prometheus",
    "diagnostics",
]

# Django's permission rules, with a user's permissions read in one query (diagnostics.backends).
AUTHENTICATION_BACKENDS = ["diagnostics.backends.OneQueryModelBackend"]

MIDDLEWARE = [
    # /healthz, /readyz and /metrics answer before host checks and HTTPS redirects, so
    # probes and Prometheus can reach a container by its internal address.
    "diagnostics.health.OperationalEndpointsMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's static files from gunicorn itself (no separate web server needed).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Records the channel, IP and user agent of every audited change made by a request.
    "diagnostics.middleware.RequestOriginMiddleware",
    # One JSON line per request, carrying the case id (see diagnostics/logging.py).
    "diagnostics.logging.RequestLogMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "diagnostics.urls"
WSGI_APPLICATION = "diagnostics.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/diagnostics")
}
# Keep connections between requests; health-check them so a restarted database is survived.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("DJANGO_STATIC_ROOT", default=BASE_DIR / "staticfiles")
# Locally, serve straight from the apps; in production from `collectstatic` output.
WHITENOISE_USE_FINDERS = DEBUG

# Production hardening (`python manage.py check --deploy` is clean with DJANGO_DEBUG=false).
# Behind a TLS-terminating proxy, it must set X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

REST_FRAMEWORK = {
    # Token first so an unauthenticated request gets 401 with WWW-Authenticate, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "diagnostics.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Every query is scoped to the user's site; role rules are checked by the services,
    # which the admin calls too.
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "EXCEPTION_HANDLER": "diagnostics.api.errors.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.JSONParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI (drf-spectacular): the schema at /api/schema/ is committed as docs/openapi.yaml and
# CI fails when they differ (tests/test_openapi.py).
SPECTACULAR_SETTINGS = {
    "TITLE": "Brain-MRI diagnostics API",
    "DESCRIPTION": (
        "Upload brain MRI slices, poll the model's predictions, record the radiologist's "
        "reading and register webhooks. Authenticate with `Authorization: Token <key>`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "LabelEnum": "diagnostics.models.Label",
        "StatusEnum": "diagnostics.models.Status",
        "ReviewStatusEnum": "diagnostics.models.ReviewStatus",
        "WebhookEventEnum": "diagnostics.models.WebhookEvent",
    },
}

# --- Uploads -------------------------------------------------------------------------
# A slice larger than this is refused with 413 before anything is stored.
MAX_IMAGE_BYTES = env.int("MAX_IMAGE_BYTES", default=20 * 1024 * 1024)
# Decoded size guard against decompression bombs (checked from the header, before decoding).
MAX_IMAGE_PIXELS = env.int("MAX_IMAGE_PIXELS", default=6000 * 6000)
MIN_IMAGE_SIDE = env.int("MIN_IMAGE_SIDE", default=32)
MAX_IMAGES_PER_CASE = env.int("MAX_IMAGES_PER_CASE", default=64)
DATA_UPLOAD_MAX_NUMBER_FILES = MAX_IMAGES_PER_CASE
# Files above this spill to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = env.int("FILE_UPLOAD_MAX_MEMORY_SIZE", default=5 * 1024 * 1024)
# Keys the pseudonymous UIDs of de-identified DICOM uploads (HMAC-SHA256; diagnostics.dicom).
# A secret: whoever holds it can test a guessed original UID. Changing it splits every study
# uploaded before from its later slices.
DICOM_PSEUDONYM_KEY = (
    env.str("DICOM_PSEUDONYM_KEY", default="insecure-local-development-pseudonym-key")
    if DEBUG
    else env.str("DICOM_PSEUDONYM_KEY")
)

# --- Object storage (S3-compatible) ----------------------------------------------------
S3_ENDPOINT_URL = env.str("S3_ENDPOINT_URL", default="http://127.0.0.1:8333")
S3_BUCKET = env.str("S3_BUCKET", default="mri-scans")
S3_ACCESS_KEY_ID = env.str("S3_ACCESS_KEY_ID", default="devkey" if DEBUG else environ.Env.NOTSET)
S3_SECRET_ACCESS_KEY = env.str(
    "S3_SECRET_ACCESS_KEY", default="devsecret" if DEBUG else environ.Env.NOTSET
)
S3_REGION = env.str("S3_REGION", default="us-east-1")

# --- Jobs (Celery on Redis) ------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
# Hard limit for one classification; the broker's visibility timeout must stay above it so
# a slow job is not handed to a second worker while the first still runs.
CLASSIFY_TIME_LIMIT_S = env.int("CLASSIFY_TIME_LIMIT_S", default=120)
CELERY_VISIBILITY_TIMEOUT_S = env.int("CELERY_VISIBILITY_TIMEOUT_S", default=600)
CELERY_WORKER_CONCURRENCY = env.int("CELERY_WORKER_CONCURRENCY", default=1)
# "threads" runs jobs as threads sharing one model: measured fastest and smallest on a CPU
# node (bench/results/worker.md); prefork (processes) stays the default, the pool the
# fault tests (tests/e2e/test_faults.py) were written against.
CELERY_WORKER_POOL = env.str("CELERY_WORKER_POOL", default="prefork")
# How often a transient failure (S3 or database unreachable) is retried before the image fails.
CLASSIFY_MAX_RETRIES = env.int("CLASSIFY_MAX_RETRIES", default=5)
# A worker takes the jobs waiting for it as one batch: up to CLASSIFY_BATCH_SIZE, or what
# arrived within CLASSIFY_BATCH_WAIT_MS of the first (bench/results/worker.md measured it).
# Database writes are per batch; CLASSIFY_THREADS threads per worker process take images
# from S3 through decoding to the model (one more than the model's LiteRT interpreters, so
# a fetch is always under way).
CLASSIFY_BATCH_SIZE = env.int("CLASSIFY_BATCH_SIZE", default=32)
CLASSIFY_BATCH_WAIT_MS = env.int("CLASSIFY_BATCH_WAIT_MS", default=20)
CLASSIFY_THREADS = env.int("CLASSIFY_THREADS", default=3)
# How many times a worker may start on one image before it fails: bounds an input that
# crashes the model or kills the worker.
CLASSIFY_MAX_ATTEMPTS = env.int("CLASSIFY_MAX_ATTEMPTS", default=3)
if CELERY_VISIBILITY_TIMEOUT_S <= CLASSIFY_TIME_LIMIT_S + 5:
    raise ImproperlyConfigured(
        "CELERY_VISIBILITY_TIMEOUT_S must exceed CLASSIFY_TIME_LIMIT_S + 5, or Redis hands "
        "a running job to a second worker"
    )
# The sweeper (`celery -A workers beat`) re-sends jobs that PostgreSQL says should exist.
SWEEP_INTERVAL_S = env.int("SWEEP_INTERVAL_S", default=30)
SWEEP_RECEIVED_AFTER_S = env.int("SWEEP_RECEIVED_AFTER_S", default=30)
SWEEP_QUEUED_AFTER_S = env.int("SWEEP_QUEUED_AFTER_S", default=300)
SWEEP_BATCH = env.int("SWEEP_BATCH", default=5000)

# --- Review ----------------------------------------------------------------------------
# "Needs review" has no setting: a slice failed or was rejected, or the model flagged its
# prediction, below the model's own review threshold (model.json `review_threshold`).
# Lifetime of the links the case page gives to full-size images (served by the app).
REVIEW_IMAGE_CACHE_S = env.int("REVIEW_IMAGE_CACHE_S", default=300)

# --- Model -----------------------------------------------------------------------------
# Empty means the artifact shipped in ml/ (ml.inference.default_model_dir()).
MODEL_DIR = env.str("MODEL_DIR", default="")
MODEL_RUNTIME = env.str("MODEL_RUNTIME", default="auto")

# --- Operations ------------------------------------------------------------------------
# Readiness (/readyz) gives each check (database, Redis, S3) this long before it counts as down.
READINESS_TIMEOUT_S = env.float("READINESS_TIMEOUT_S", default=3.0)
# A worker writes this file once its model is loaded and removes it when it stops;
# `python -m workers.health` (the compose and Kubernetes probe) checks it.
WORKER_READY_FILE = env.str("WORKER_READY_FILE", default="/tmp/diagnostics-worker-ready")
# Port of the worker's Prometheus endpoint (all its processes together); 0 turns it off.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=9808)

# --- Webhooks --------------------------------------------------------------------------
# Attempts per delivery (exponential backoff from 10 s, capped at an hour), and the time a
# receiver has to answer one attempt.
WEBHOOK_MAX_ATTEMPTS = env.int("WEBHOOK_MAX_ATTEMPTS", default=8)
WEBHOOK_TIMEOUT_S = env.float("WEBHOOK_TIMEOUT_S", default=10.0)
WEBHOOK_BACKOFF_BASE_S = env.float("WEBHOOK_BACKOFF_BASE_S", default=10.0)

# JSON lines (one object per record, with the case id when there is one) or plain text.
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "diagnostics.logging.ContextFilter"}},
    "formatters": {
        "json": {"()": "diagnostics.logging.JsonFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [case=%(case_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
