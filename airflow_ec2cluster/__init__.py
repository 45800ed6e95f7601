"""airflow-ec2cluster: run a batch job on a temporary EC2 cluster fed by SQS."""

__version__ = "0.1.0"
