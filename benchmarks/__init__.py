"""Benchmarks of airflow-ec2cluster: ``python -m benchmarks NAME [NAME ...] [--json] [--size tiny|full]``.

Every benchmark runs against a moto server on loopback (the local cloud's server, or the whole local cloud),
never real AWS. Call counts come from botocore event hooks and do not vary from run to run; wall-clock
figures are ratios against a reference measured side by side in the same run, on fresh queues of one size.
"""
