# syntax=docker/dockerfile:1
# One image for every Python service (migrate, web, worker); the `gpu` stage adds CUDA for
# worker-gpu. Build: docker compose build (targets `app` and `gpu`).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies only, so a code change does not reinstall them.
FROM base AS deps
COPY requirements.txt /tmp/requirements.txt
# requirements.txt is the runtime only; the local stack's embedded servers are dev-only.
RUN python -m venv /opt/venv && pip install -r /tmp/requirements.txt

# The CUDA libraries from pip, for exactly the TensorFlow the CPU image has.
FROM deps AS gpu-deps
RUN set -e; \
    tensorflow_version="$(python -c 'from importlib.metadata import version; print(version("tensorflow"))')"; \
    pip install "tensorflow[and-cuda]==${tensorflow_version}"

FROM base AS runtime
RUN useradd --system --uid 10001 --create-home --home-dir /home/app app
WORKDIR /app
EXPOSE 8000
CMD ["gunicorn", "diagnostics.wsgi:application", "--bind=0.0.0.0:8000", "--workers=2"]

FROM runtime AS app
COPY --from=deps /opt/venv /opt/venv
COPY --chown=app:app . /app
# The admin's static files, served by whitenoise from gunicorn.
RUN DJANGO_SECRET_KEY=collectstatic-only DJANGO_DEBUG=false S3_ACCESS_KEY_ID=- \
    S3_SECRET_ACCESS_KEY=- DICOM_PSEUDONYM_KEY=- python manage.py collectstatic --noinput -v0
# PYTHONDONTWRITEBYTECODE keeps processes from writing into /app, so the project's modules
# are compiled here, once: else every process compiles them again when it starts (0.1 s of
# a worker's cold start).
RUN python -m compileall -q diagnostics workers ml
USER app

FROM runtime AS gpu
COPY --from=gpu-deps /opt/venv /opt/venv
COPY --from=app --chown=app:app /app /app
USER app
