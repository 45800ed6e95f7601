"""AWS list prices used to turn counted requests and items into money: the one place they are written.

us-east-1 on-demand list prices as we know them (not re-checked against AWS's pricing pages from this
offline machine: check before relying on a figure): standard-queue requests, each 64 KB chunk of a
request's payload billed as one request; on-demand write request units, one per KB (rounded up) of each
item written.
"""

from __future__ import annotations

PRICES_AS_OF = "us-east-1 list prices, assumed (not re-checked offline)"
SQS_STANDARD_USD_PER_MILLION_REQUESTS = 0.40
SQS_BILLING_CHUNK_BYTES = 64 * 1024
DYNAMODB_ON_DEMAND_USD_PER_MILLION_WRU = 0.625
DYNAMODB_WRU_BYTES = 1024


def request_charges_usd(sqs_requests: float, write_units: float) -> dict[str, float]:
    sqs = sqs_requests * SQS_STANDARD_USD_PER_MILLION_REQUESTS / 1e6
    dynamodb = write_units * DYNAMODB_ON_DEMAND_USD_PER_MILLION_WRU / 1e6
    return {"sqs_usd": sqs, "dynamodb_usd": dynamodb, "total_usd": sqs + dynamodb}


# CloudWatch Logs (Standard log class): ingestion per GB (each event's bytes plus 26 bytes of metadata, as
# PutLogEvents counts them) and storage per GB-month (compressed: an upper bound). PutLogEvents and
# FilterLogEvents carry no per-request charge; vended and Infrequent Access classes are cheaper.
CLOUDWATCH_LOGS_INGESTION_USD_PER_GB = 0.50
CLOUDWATCH_LOGS_STORAGE_USD_PER_GB_MONTH = 0.03
