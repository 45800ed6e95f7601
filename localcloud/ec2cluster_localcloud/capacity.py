"""EC2 capacity in the local cloud: pools that run dry, and vCPU quotas, as an AWS account meets them.

A **pool** is (instance type, availability zone, market), the market being ``on-demand`` or ``spot``. Its
capacity is how many instances of it may be live (pending or running) at once; unlimited unless set.
**vCPU quotas** are per market and instance-family group, as AWS's Service Quotas: the vCPUs of the live
instances of a group may not pass it; unlimited unless set. Usage is counted from the instances the EC2
backend holds, at each launch: an instance that ends frees its room, and a change of the document takes
effect at the next launch (a pool drains, a pool comes back).

The document (JSON; ``LocalCloud(capacity=...)``, ``ec2cluster-localcloud --capacity FILE``, the work
dir's ``capacity.json``)::

    {
      "pools": [
        {"instance_type": "c5.large", "availability_zone": "us-east-1a", "market": "spot", "capacity": 0}
      ],
      "vcpu_quotas": {"on-demand": {"standard": 64}, "spot": {"standard": 32, "g": 0}}
    }

Instance-family groups (``family_group``), after AWS's quota names ("Running On-Demand Standard (A, C, D,
H, I, M, R, T, Z) instances", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", ...):

    standard  A, C, D, H, I, M, R, T, Z (also Im, Is: storage-optimised I variants)
    f         F                           g    G and VT (also Gr)
    p         P                           x    X
    inf       Inf                         dl   DL
    trn       Trn                         hpc  Hpc
    u         High Memory (U)             mac  Mac (Dedicated Hosts on AWS: no quota here)

vCPUs per type come from moto's instance type data (1 for a type it does not know).

RunInstances answers as EC2 does (``refusal``): when fewer than MinCount instances fit, an on-demand
launch over its vCPU quota is ``VcpuLimitExceeded`` (HTTP 400), a spot launch over its quota is
``MaxSpotInstanceCountExceeded`` (HTTP 400), and a pool without room is ``InsufficientInstanceCapacity``
(HTTP 500, a server error: botocore's standard retry mode retries it, as against AWS); otherwise it
launches min(MaxCount, what fits) instances. A ClientToken already used answers with its first launch,
whatever the capacity now.

The server (a process of its own) reads the document from the work dir's file at each launch (re-read
only when it changed); the LocalCloud writes it atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CAPACITY_FILE = "capacity.json"
MARKETS = ("on-demand", "spot")
GROUPS = ("standard", "f", "g", "p", "x", "inf", "dl", "trn", "hpc", "u", "mac")
STANDARD_LETTERS = frozenset("acdhimrtz")
LIVE_STATES = frozenset({"pending", "running"})
# (prefix, group), longest first: the family's leading letters decide.
FAMILY_PREFIXES = (
    ("inf", "inf"),
    ("trn", "trn"),
    ("hpc", "hpc"),
    ("mac", "mac"),
    ("dl", "dl"),
    ("vt", "g"),
    ("gr", "g"),
    ("u", "u"),
    ("f", "f"),
    ("g", "g"),
    ("p", "p"),
    ("x", "x"),
)
INSUFFICIENT_CAPACITY = "InsufficientInstanceCapacity"
VCPU_LIMIT = "VcpuLimitExceeded"
SPOT_LIMIT = "MaxSpotInstanceCountExceeded"
STATUS = {INSUFFICIENT_CAPACITY: 500, VCPU_LIMIT: 400, SPOT_LIMIT: 400}
SPOT_NO_CAPACITY_MESSAGE = "There is no Spot capacity available that matches your request."
SPOT_LIMIT_MESSAGE = "Max spot instance count exceeded"


class CapacityError(ValueError):
    """A capacity document, or a change to it, that is not valid."""


def family_group(instance_type: str) -> str:
    """The vCPU quota group of an instance type (``c5.large`` -> ``standard``, ``g5.xlarge`` -> ``g``)."""
    family = instance_type.split(".", 1)[0].lower()
    for prefix, group in FAMILY_PREFIXES:
        if family.startswith(prefix):
            return group
    if family[:1] in STANDARD_LETTERS:
        return "standard"
    raise CapacityError(f"{instance_type}: no instance-family group for this type")


def vcpus(instance_type: str) -> int:
    """Default vCPUs of ``instance_type`` (moto's instance type data; 1 when it does not know the type)."""
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    info = INSTANCE_TYPES.get(instance_type) or {}
    return int((info.get("VCpuInfo") or {}).get("DefaultVCpus") or 1)


def _count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CapacityError(f"{what} must be a whole number, 0 or more, or null (unlimited), not {value!r}")
    return value


def _market(market: Any) -> str:
    if market not in MARKETS:
        raise CapacityError(f"market must be one of {', '.join(MARKETS)}, not {market!r}")
    return market


def _group(group: Any) -> str:
    if group not in GROUPS:
        raise CapacityError(f"group must be one of {', '.join(GROUPS)}, not {group!r}")
    return group


def normalise(document: Mapping[str, Any] | None) -> dict[str, Any]:
    """The document checked and in its canonical form (pools sorted, unlimited entries dropped)."""
    document = document or {}
    if not isinstance(document, Mapping):
        raise CapacityError("a capacity document is a JSON object with 'pools' and 'vcpu_quotas'")
    unknown = set(document) - {"pools", "vcpu_quotas"}
    if unknown:
        raise CapacityError(f"unknown keys in the capacity document: {', '.join(sorted(unknown))}")
    pools: dict[tuple[str, str, str], int] = {}
    for entry in document.get("pools") or []:
        if not isinstance(entry, Mapping):
            raise CapacityError(f"a pool is an object, not {entry!r}")
        extra = set(entry) - {"instance_type", "availability_zone", "market", "capacity"}
        if extra:
            raise CapacityError(f"unknown keys in a pool: {', '.join(sorted(extra))}")
        instance_type, zone = entry.get("instance_type"), entry.get("availability_zone")
        if not isinstance(instance_type, str) or not instance_type:
            raise CapacityError(f"a pool needs its instance_type: {dict(entry)}")
        if not isinstance(zone, str) or not zone:
            raise CapacityError(f"a pool needs its availability_zone: {dict(entry)}")
        market = _market(entry.get("market"))
        count = _count(entry.get("capacity"), f"the capacity of {instance_type} {zone} {market}")
        if count is not None:
            pools[(instance_type, zone, market)] = count
    quotas: dict[str, dict[str, int]] = {}
    given = document.get("vcpu_quotas") or {}
    if not isinstance(given, Mapping):
        raise CapacityError("vcpu_quotas is an object: market -> {group: vCPUs}")
    for market, groups in given.items():
        _market(market)
        if not isinstance(groups, Mapping):
            raise CapacityError(f"vcpu_quotas[{market!r}] is an object: group -> vCPUs")
        for group, limit in groups.items():
            count = _count(limit, f"the {market} vCPU quota of {_group(group)}")
            if count is not None:
                quotas.setdefault(market, {})[group] = count
    return {
        "pools": [
            {"instance_type": t, "availability_zone": z, "market": m, "capacity": n}
            for (t, z, m), n in sorted(pools.items())
        ],
        "vcpu_quotas": {market: dict(sorted(quotas[market].items())) for market in sorted(quotas)},
    }


def with_pool(document: Mapping[str, Any], instance_type: str, zone: str, market: str, count: int | None):
    """A copy of the document with one pool's capacity set (None: unlimited)."""
    document = normalise(document)
    _market(market)
    _count(count, "capacity")
    pools = [
        p
        for p in document["pools"]
        if (p["instance_type"], p["availability_zone"], p["market"]) != (instance_type, zone, market)
    ]
    if count is not None:
        pools.append(
            {"instance_type": instance_type, "availability_zone": zone, "market": market, "capacity": count}
        )
    return normalise({**document, "pools": pools})


def with_quota(document: Mapping[str, Any], market: str, group: str, limit: int | None):
    """A copy of the document with one vCPU quota set (None: unlimited)."""
    document = normalise(document)
    quotas = copy.deepcopy(document["vcpu_quotas"])
    quotas.setdefault(_market(market), {})[_group(group)] = _count(limit, "vcpus")
    return normalise({**document, "vcpu_quotas": quotas})


def load(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A document from a dict, a JSON file's path, or None (everything unlimited)."""
    if source is None:
        return normalise({})
    if isinstance(source, Mapping):
        return normalise(source)
    try:
        return normalise(json.loads(Path(source).read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise CapacityError(f"{source}: not JSON: {error}") from None


def write(path: Path, document: Mapping[str, Any]) -> None:
    """Replace the file atomically (the server sees the old document or the new one, never half)."""
    document = normalise(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".capacity-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class CapacityFile:
    """The document as last written to ``path`` (re-read when the file changed; unlimited without it).
    A file that does not parse keeps the last good document (and says so once, on stderr)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._document = normalise({})

    def read(self) -> dict[str, Any]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return normalise({})
        stamp = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._document = load(self.path)
                except (CapacityError, OSError) as error:
                    import sys

                    print(f"ec2cluster-localcloud: ignoring {self.path}: {error}", file=sys.stderr)
                self._stamp = stamp
            return self._document


# -- Room for new instances -------------------------------------------------------------------------------


class CapacityHeadroom:
    """Room for new instances per pool: the document's limits less the live instances' use.

    ``live``: (instance type, zone, market) of every live instance; ``zones``: the region's zones (named
    in an InsufficientInstanceCapacity message as where the type can be had)."""

    def __init__(
        self, document: Mapping[str, Any], live: Iterable[tuple[str, str, str]], zones: Iterable[str] = ()
    ) -> None:
        document = normalise(document)
        self.zones = sorted(zones)
        self.pool_limit = {
            (p["instance_type"], p["availability_zone"], p["market"]): p["capacity"]
            for p in document["pools"]
        }
        self.quota = {
            (market, group): limit
            for market, groups in document["vcpu_quotas"].items()
            for group, limit in groups.items()
        }
        self.pool_used: Counter = Counter()
        self.quota_used: Counter = Counter()
        for instance_type, zone, market in live:
            self._use(instance_type, zone, market, 1)

    def _use(self, instance_type: str, zone: str, market: str, count: int) -> None:
        self.pool_used[(instance_type, zone, market)] += count
        with contextlib.suppress(CapacityError):
            self.quota_used[(market, family_group(instance_type))] += count * vcpus(instance_type)

    def pool_room(self, instance_type: str, zone: str, market: str) -> float:
        limit = self.pool_limit.get((instance_type, zone, market))
        if limit is None:
            return math.inf
        return max(0, limit - self.pool_used[(instance_type, zone, market)])

    def quota_room(self, instance_type: str, market: str) -> float:
        try:
            key = (market, family_group(instance_type))
        except CapacityError:
            return math.inf
        limit = self.quota.get(key)
        if limit is None:
            return math.inf
        return max(0, limit - self.quota_used[key]) // vcpus(instance_type)

    def fits(self, instance_type: str, availability_zone: str, market: str) -> float:
        return min(
            self.pool_room(instance_type, availability_zone, market), self.quota_room(instance_type, market)
        )

    def take(self, instance_type: str, availability_zone: str, market: str, count: int) -> None:
        self._use(instance_type, availability_zone, market, count)

    def copy(self) -> CapacityHeadroom:
        twin = copy.copy(self)
        twin.pool_used = Counter(self.pool_used)
        twin.quota_used = Counter(self.quota_used)
        return twin

    def why_not(
        self, instance_type: str, availability_zone: str, market: str, wanted: int = 1
    ) -> tuple[str, str]:
        """(code, message) of EC2's refusal of ``wanted`` instances that do not fit."""
        if self.quota_room(instance_type, market) < wanted:
            if market == "spot":
                return SPOT_LIMIT, SPOT_LIMIT_MESSAGE
            limit = self.quota[(market, family_group(instance_type))]
            return VCPU_LIMIT, (
                f"You have requested more vCPU capacity than your current vCPU limit of {limit} allows for "
                "the instance bucket that the specified instance type belongs to. Please visit "
                "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."
            )
        if market == "spot":
            return INSUFFICIENT_CAPACITY, SPOT_NO_CAPACITY_MESSAGE
        message = (
            f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you "
            f"requested ({availability_zone}). Our system will be working on provisioning additional "
            "capacity."
        )
        elsewhere = [
            zone
            for zone in self.zones
            if zone != availability_zone and self.pool_room(instance_type, zone, market) >= wanted
        ]
        if elsewhere:
            message += (
                f" You can currently get {instance_type} capacity by not specifying an Availability Zone in "
                f"your request or choosing {', '.join(elsewhere)}."
            )
        return INSUFFICIENT_CAPACITY, message

    def refusal(
        self, instance_type: str, availability_zone: str, market: str, min_count: int, max_count: int
    ) -> tuple[int, tuple[str, str] | None]:
        """(instances to launch, None) or (0, (code, message)) for a RunInstances of min..max."""
        fits = self.fits(instance_type, availability_zone, market)
        if fits < min_count:
            return 0, self.why_not(instance_type, availability_zone, market, min_count)
        return int(min(max_count, fits)), None


def headroom_of(backend: Any, document: Mapping[str, Any]) -> CapacityHeadroom:
    """The room now in moto's EC2 ``backend`` (one region) under ``document``."""
    live = [
        (
            instance.instance_type,
            instance.availability_zone,
            "spot" if instance.lifecycle == "spot" else "on-demand",
        )
        for instance in backend.all_instances()
        if instance.state in LIVE_STATES
    ]
    zones = [zone.name for zone in backend.describe_availability_zones()]
    return CapacityHeadroom(document, live, zones)


# -- The moto patch --------------------------------------------------------------------------------------

EC2_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def error_body(code: str, message: str) -> str:
    import uuid

    return EC2_ERROR_XML.format(code=code, message=_xml(message), request_id=uuid.uuid4())


def _launch_target(response: Any) -> tuple[str, str]:
    """(instance type, zone) of the RunInstances ``response`` is handling, as moto will place it."""
    backend = response.ec2_backend
    instance_type = response._get_param("InstanceType")
    if not instance_type and response._get_param("LaunchTemplate"):
        with contextlib.suppress(Exception):
            instance_type = backend._get_template_from_args(response._get_param("LaunchTemplate")).data.get(
                "InstanceType"
            )
    subnet_id = response._get_param("SubnetId") or next(
        (
            ni.get("SubnetId")
            for ni in response._get_param("NetworkInterfaces", []) or []
            if ni.get("SubnetId")
        ),
        None,
    )
    if subnet_id:
        try:
            zone = backend.get_subnet(subnet_id).availability_zone
        except Exception:  # no such subnet: RunInstances answers that itself
            zone = ""
    else:
        zone = response._get_param("Placement.AvailabilityZone") or f"{response.region}a"
    return instance_type or "m1.small", zone


class LaunchRefusedError(Exception):
    """Raised instead of answering, for a caller inside the server (CreateFleet) that lists refusals."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def make_run_instances_respect_capacity(document_of) -> None:
    """RunInstances launches min(MaxCount, what fits) instances, or refuses as EC2 does (see above).

    ``document_of()``: the capacity document now. Without any limit it launches MaxCount (moto launches
    MinCount). A response with ``ec2cluster_raise_refusals`` set (CreateFleet's launches) gets a
    LaunchRefusedError instead of an error answer."""
    from moto.ec2.responses.instances import InstanceResponse

    original = InstanceResponse.run_instances
    marker = "ec2cluster_capacity"
    probe = original
    while probe is not None:
        if getattr(probe, marker, False):
            return
        probe = getattr(probe, "__wrapped__", None)

    def run_instances(self):
        token = self._get_param("ClientToken")
        if token and any(
            instance.client_token == token
            for reservation in self.ec2_backend.reservations.values()
            for instance in reservation.instances
        ):
            return original(self)  # a replay: its first launch's answer, whatever the capacity now
        min_count = int(self._get_param("MinCount", 1) or 1)
        max_count = int(self._get_param("MaxCount", min_count) or min_count)
        instance_type, zone = _launch_target(self)
        market = "spot" if self._get_param("InstanceMarketOptions.MarketType") == "spot" else "on-demand"
        headroom = headroom_of(self.ec2_backend, document_of())
        count, refused = headroom.refusal(instance_type, zone, market, min_count, max(min_count, max_count))
        if refused is not None:
            code, message = refused
            if getattr(self, "ec2cluster_raise_refusals", False):
                raise LaunchRefusedError(code, message)
            return error_body(code, message), {"status": STATUS[code], "Content-Type": "text/xml"}
        self.params["MinCount"] = count  # moto launches MinCount instances
        return original(self)

    setattr(run_instances, marker, True)
    run_instances.__wrapped__ = original
    InstanceResponse.run_instances = run_instances


def parse_pool(text: str) -> tuple[str, str, str, int | None]:
    """``TYPE ZONE MARKET COUNT`` (COUNT ``unlimited``) from the command line."""
    parts = text.split()
    if len(parts) != 4:
        raise CapacityError(f"a pool is 'INSTANCE_TYPE ZONE MARKET COUNT', not {text!r}")
    return parts[0], parts[1], _market(parts[2]), _limit(parts[3])


def _limit(text: str) -> int | None:
    if text in ("unlimited", "none", "null"):
        return None
    if not re.fullmatch(r"\d+", text):
        raise CapacityError(f"a count is a whole number or 'unlimited', not {text!r}")
    return int(text)
