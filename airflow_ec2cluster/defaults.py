"""Every default of the provider, in one place: names, retention, and the defaults of each task's arguments.

The operators, the sensor, the trigger, the hook and the commands take their defaults from here, so one
value never drifts between two signatures. Values shared with the worker (a separate distribution that never
imports the provider) are the worker's own: the task-log shards and the records' retention.
"""

from __future__ import annotations

from ec2cluster_worker import records

# -- names ---------------------------------------------------------------------------------------------------
# The state table shared by all clusters (created when missing).
DEFAULT_STATE_TABLE = "ec2cluster-state"
# The worker's instance profile (and its role's name in the IAM policies).
DEFAULT_INSTANCE_PROFILE = "ec2cluster-worker"

# -- records -------------------------------------------------------------------------------------------------
# Every record (META item, worker bundle, the workers' own) expires this long after its last write.
DEFAULT_RETENTION_SECONDS = records.DEFAULT_RETENTION_SECONDS
# Task-log partitions, when the launch's worker configuration does not say.
DEFAULT_LOG_SHARDS = records.DEFAULT_LOG_SHARDS

# The workers' CloudWatch Logs group keeps their lines this many days (one of CloudWatch's retentions).
DEFAULT_LOG_RETENTION_DAYS = 30

# -- enqueue -------------------------------------------------------------------------------------------------
# Ten tasks a message: one task-log item and a tenth of the SQS requests per task, and a slow task holds
# back at most nine others.
DEFAULT_TASKS_PER_MESSAGE = 10
DEFAULT_VISIBILITY_TIMEOUT = 120
DEFAULT_MAX_RECEIVE_COUNT = 3
DEFAULT_QUEUE_RETENTION_SECONDS = 4 * 24 * 3600
# The dead-letter queue keeps its messages as long as SQS allows, to inspect and re-drive them.
DEAD_LETTER_RETENTION_SECONDS = 14 * 24 * 3600
# Concurrent SendMessageBatch calls: enough to hide latency, few enough to stay polite.
DEFAULT_SEND_CONCURRENCY = 4

# -- launch --------------------------------------------------------------------------------------------------
# What the workers run on: on-demand unless asked ("spot", "spot-then-on-demand"); EC2 Fleet's strategies.
DEFAULT_CAPACITY = "on-demand"
DEFAULT_SPOT_STRATEGY = "price-capacity-optimized"
DEFAULT_ON_DEMAND_STRATEGY = "lowest-price"
# Root volume size when neither the operator nor the AMI gives one.
DEFAULT_ROOT_VOLUME_GB = 8
# IMDSv2 hop limit: 1 keeps instance metadata from containers (2 when containers on the instance need it).
DEFAULT_METADATA_HOP_LIMIT = 1

# -- drain (QueueDrainedSensor, DrainSettings, Policy) -------------------------------------------------------
DEFAULT_IDLE_TIMEOUT = 600
DEFAULT_HEARTBEAT_TIMEOUT = 120
DEFAULT_MAX_TASK_SECONDS = 3600
DEFAULT_BOOT_TIMEOUT = 600
# The image's interpreters the bootstrap tries, in order (the launch's ``python``): stock images name theirs
# python3; a Deep Learning AMI's environments live under /opt (pass that path).
DEFAULT_PYTHONS = ("python3", "/usr/bin/python3", "/usr/local/bin/python3")
# Where the launch stores the cluster's bundle when no bucket is named: one bucket per account and region.
DEFAULT_BUNDLE_BUCKET_FORMAT = "ec2cluster-{account}-{region}"
DEFAULT_BUNDLE_PREFIX = "ec2cluster/bundles/"
# Two consecutive empty reads: enough because "drained" also needs the messages accounted for (finished +
# dead-lettered >= enqueued), a check that a stale zero cannot pass while messages are still queued or held.
# Each extra read costs a poke interval of idle instances (drain latency <= 2 intervals + teardown).
DEFAULT_DRAINED_CHECKS = 2
# Workers in a row that stop at start with the same error before the drain stops replacing them and fails
# (a broken handler fails every new worker: replacing it would only bill boots).
DEFAULT_REPEATED_FAILURE_LIMIT = 3
# With no worker left, launches may fail on capacity this long before the drain fails (EC2 pools refill in
# minutes; AWS Batch waits indefinitely, which bills nothing but never ends a run).
DEFAULT_CAPACITY_TIMEOUT = 900
# A launch short of what it asked waits this long before the next, doubling per failure up to the max.
DEFAULT_LAUNCH_BACKOFF = 30
DEFAULT_LAUNCH_BACKOFF_MAX = 300
# Dead-lettered messages sampled for the summary (their task ids and last errors).
DEFAULT_DEAD_LETTER_SAMPLE = 100
# The trigger's rounds in a row that may fail on AWS errors (after botocore's own retries) before it fails.
DEFAULT_MAX_ERROR_ROUNDS = 5

# -- teardown ------------------------------------------------------------------------------------------------
# The instance_terminated waiter: every 5 s, for up to 10 minutes.
DEFAULT_WAITER_DELAY = 5
DEFAULT_WAITER_MAX_ATTEMPTS = 120
