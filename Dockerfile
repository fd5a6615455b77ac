# The rootfs-export image used by docker-compose.yml (API, workers, Flower, migrations).
FROM debian:bookworm-slim
# e2fsprogs >= 1.47.1 (`mke2fs -d -` reading a tar) comes from bookworm-backports.
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" \
        > /etc/apt/sources.list.d/bookworm-backports.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get install -y --no-install-recommends -t bookworm-backports e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rootfs-export
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY api ./api
COPY worker ./worker
# Editable install: `rootfs-export db upgrade` finds migrations/ beside the sources.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -e .
ENV PATH=/opt/venv/bin:$PATH
