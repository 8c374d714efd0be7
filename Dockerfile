# The image every node of cluster.yaml and of the KubeRay manifests (k8s/) runs: Ray's GPU
# image at the pinned Ray and Python versions, with this project's dependencies baked in, so a
# node — and every spot replacement — starts in the time of an image pull instead of
# pip-installing the CUDA stack. Build and push: docs/cluster.md. The tag's format is Ray's
# ({Ray version}-{Python}-{platform}; -gpu is the CUDA build) and follows ray==2.60.0 in
# pyproject.toml (tests/test_cluster.py checks both).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/bdat_ray
# Dependencies first, from pyproject.toml alone, so this layer is rebuilt only when they
# change: an editable install of the empty package pulls every pinned dependency plus the
# `cluster` extra (MLflow's basic-auth app, boto3 for S3, psycopg2 for a PostgreSQL store).
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir bdat_ray analysis && pip install --no-cache-dir -e '.[cluster]'
# The code; on a `ray up` cluster file_mounts sync newer code over it at every start.
COPY --chown=ray:users bdat_ray bdat_ray
COPY --chown=ray:users analysis analysis
COPY --chown=ray:users search_spaces search_spaces
RUN pip install --no-cache-dir --no-deps -e . && python -c "import bdat_ray.sweep, mlflow.server.auth"
