# Airflow (official image) with airflow-ec2cluster and its worker installed, pinned by requirements.lock.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root requirements.lock pyproject.toml README.md /opt/ec2cluster/
COPY --chown=airflow:root worker /opt/ec2cluster/worker
COPY --chown=airflow:root airflow_ec2cluster /opt/ec2cluster/airflow_ec2cluster
COPY --chown=airflow:root localcloud /opt/ec2cluster/localcloud
RUN pip install --no-cache-dir -r /opt/ec2cluster/requirements.lock \
    && pip install --no-cache-dir --no-deps /opt/ec2cluster/worker /opt/ec2cluster/localcloud /opt/ec2cluster
