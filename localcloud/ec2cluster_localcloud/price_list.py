"""The AWS Price List API's GetProducts, which moto lacks, answered from the local cloud's ``prices.py``.

The answer has the documented shape (``FormatVersion``, ``PriceList``: each product a JSON document with its
``product.attributes`` and ``terms.OnDemand...priceDimensions...pricePerUnit.USD``, ``NextToken``): one
Linux, shared-tenancy, on-demand product per instance type the table prices, in whatever region is asked
(the local cloud prices every region alike). ``TERM_MATCH`` filters select as AWS's do (every filter's field
equals its value); pages of ``MaxResults`` (default 100). IAM (``pricing:GetProducts``) is the enforcer's,
in front of this.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ec2cluster_localcloud import prices

_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/pricing/aws4_request")
PAGE_SIZE = 100
EFFECTIVE = "2025-01-01T00:00:00Z"


def product(instance_type: str, region: str, usd_per_hour: float) -> dict[str, Any]:
    sku = "LC" + re.sub(r"[^A-Z0-9]", "", instance_type.upper())
    description = f"${usd_per_hour} per On Demand Linux {instance_type} Instance Hour"
    term, dimension = f"{sku}.JRTCKXETXF", f"{sku}.JRTCKXETXF.6YS6EN2CT7"
    return {
        "product": {
            "productFamily": "Compute Instance",
            "sku": sku,
            "attributes": {
                "servicecode": "AmazonEC2",
                "instanceType": instance_type,
                "regionCode": region,
                "operatingSystem": "Linux",
                "tenancy": "Shared",
                "preInstalledSw": "NA",
                "capacitystatus": "Used",
                "licenseModel": "No License required",
                "usagetype": f"BoxUsage:{instance_type}",
                "operation": "RunInstances",
            },
        },
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {
                term: {
                    "offerTermCode": "JRTCKXETXF",
                    "sku": sku,
                    "effectiveDate": EFFECTIVE,
                    "termAttributes": {},
                    "priceDimensions": {
                        dimension: {
                            "rateCode": dimension,
                            "unit": "Hrs",
                            "beginRange": "0",
                            "endRange": "Inf",
                            "appliesTo": [],
                            "description": description,
                            "pricePerUnit": {"USD": f"{usd_per_hour:.10f}"},
                        }
                    },
                }
            }
        },
        "version": "local",
        "publicationDate": EFFECTIVE,
    }


def get_products(params: dict[str, Any]) -> dict[str, Any]:
    """GetProducts' answer for ``params`` (the request's JSON body)."""
    if params.get("ServiceCode") != "AmazonEC2":
        return {"FormatVersion": "aws_v1", "PriceList": []}
    wanted = {f["Field"]: f["Value"] for f in params.get("Filters") or [] if f.get("Type") == "TERM_MATCH"}
    region = wanted.get("regionCode", "us-east-1")
    matching = []
    for instance_type, price in sorted(prices.ON_DEMAND_USD_PER_HOUR.items()):
        item = product(instance_type, region, price)
        attributes = item["product"]["attributes"]
        if all(attributes.get(field) == value for field, value in wanted.items()):
            matching.append(json.dumps(item))
    start = int(params.get("NextToken") or 0)
    size = int(params.get("MaxResults") or PAGE_SIZE)
    answer: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": matching[start : start + size]}
    if start + size < len(matching):
        answer["NextToken"] = str(start + size)
    return answer


def with_price_list(app):
    """``app`` with the Price List API's requests (signed for ``pricing``) answered here."""

    def application(environ, start_response):
        if not _SCOPE.search(environ.get("HTTP_AUTHORIZATION", "")):
            return app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        operation = environ.get("HTTP_X_AMZ_TARGET", "").rsplit(".", 1)[-1]
        if operation == "GetProducts":
            status, payload = "200 OK", get_products(json.loads(body or b"{}"))
        else:
            status = "400 Bad Request"
            payload = {"__type": "InvalidParameterException", "Message": f"{operation} is not served here"}
        data = json.dumps(payload).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("x-amzn-RequestId", str(uuid.uuid4())),
                ("Content-Length", str(len(data))),
            ],
        )
        return [data]

    return application
