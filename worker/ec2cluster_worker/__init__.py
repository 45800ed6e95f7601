"""The worker that runs on every instance of an airflow-ec2cluster cluster (boto3 and stdlib only)."""

__version__ = "0.1.0"
