"""The launch preflight: can an instance in each subnet reach what the job needs? (pure)

Read from the VPC as EC2 describes it, before anything is launched, so that a broken layout fails with its
cause and its fix instead of instances that boot, reach nothing and die:

- the subnet's route table (its own association, else the VPC's main table) and where a destination goes: a
  gateway endpoint's prefix-list route for S3 or DynamoDB; the VPC-local route for an interface endpoint with
  private DNS (its DNS name resolves to addresses in the VPC); else 0.0.0.0/0, to an internet gateway
  (usable only with a public IP) or to a NAT gateway (usable when the NAT gateway is public and its own subnet
  routes to an internet gateway);
- the instance's security groups: some egress rule must allow TCP 443 to that destination (0.0.0.0/0, the
  endpoint's prefix list, or the VPC's CIDR for interface endpoints), and an interface endpoint's own groups
  must let the instance in (an endpoint created without groups uses the VPC's default group, whose inbound
  rule admits only members of that same group);
- the image's architecture against the instance type's.

Network ACLs are not read (AWS's default ACL allows everything; a custom one is rare and not diagnosed), nor
are the VPC's DNS attributes that private DNS needs (enableDnsSupport and enableDnsHostnames, on by default in
a default VPC).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PUBLIC = "public"
PRIVATE = "private"
NETWORK_MODES = (PUBLIC, PRIVATE)
# "The internet": what a package index (PyPI) is to an instance. No VPC endpoint reaches it.
INTERNET = "internet"
GATEWAY_ENDPOINT_SERVICES = frozenset({"s3", "dynamodb"})
ANYWHERE = "0.0.0.0/0"
HTTPS = 443
# Public IPv4 addresses are billed per address-hour (AWS, since February 2024).
PUBLIC_IPV4_DOLLARS_PER_HOUR = 0.005


@dataclass(frozen=True)
class NetworkFacts:
    """The VPC state the preflight reads, in EC2's Describe* shapes (see EC2ClusterHook.network_facts)."""

    region: str
    subnets: Mapping[str, Mapping[str, Any]]  # DescribeSubnets, by SubnetId
    vpcs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # DescribeVpcs, by VpcId
    route_tables: Sequence[Mapping[str, Any]] = ()
    internet_gateways: Sequence[Mapping[str, Any]] = ()
    nat_gateways: Sequence[Mapping[str, Any]] = ()
    endpoints: Sequence[Mapping[str, Any]] = ()  # DescribeVpcEndpoints
    security_groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by GroupId


@dataclass(frozen=True)
class Path:
    """How an instance's packets reach a destination: through what, and to which destination (for egress)."""

    via: str  # "internet gateway igw-…", "NAT gateway nat-…", "gateway endpoint vpce-…", ...
    cidr: str | None = None  # the destination's addresses as an egress rule must cover them
    prefix_list: str | None = None  # a gateway endpoint's prefix list
    endpoint_groups: tuple[str, ...] = ()  # an interface endpoint's security groups (which must let it in)


@dataclass(frozen=True)
class SubnetReport:
    """One subnet's verdict: what it reaches, and each problem with its fix."""

    subnet_id: str
    zone: str
    paths: Mapping[str, Path | None]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def route_table_of(facts: NetworkFacts, subnet_id: str) -> Mapping[str, Any] | None:
    """The subnet's explicit route table association, else its VPC's main table."""
    vpc_id = facts.subnets[subnet_id]["VpcId"]
    main = None
    for table in facts.route_tables:
        for association in table.get("Associations", []):
            if association.get("SubnetId") == subnet_id:
                return table
            if association.get("Main") and table.get("VpcId") == vpc_id:
                main = table
    return main


def _active(route: Mapping[str, Any]) -> bool:
    return route.get("State", "active") == "active"


def _default_route(table: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    for route in (table or {}).get("Routes", []):
        if route.get("DestinationCidrBlock") == ANYWHERE and _active(route):
            return route
    return None


def _attached_gateway(facts: NetworkFacts, gateway_id: str, vpc_id: str) -> bool:
    return any(
        gateway["InternetGatewayId"] == gateway_id
        and any(
            a.get("VpcId") == vpc_id and a.get("State") in ("available", "attached")
            for a in gateway.get("Attachments", [])
        )
        for gateway in facts.internet_gateways
    )


def internet_route(facts: NetworkFacts, subnet_id: str, public_ip: bool) -> tuple[Path | None, str]:
    """The path to the internet (and AWS's public endpoints), or None with the reason."""
    subnet = facts.subnets[subnet_id]
    vpc_id = subnet["VpcId"]
    table = route_table_of(facts, subnet_id)
    route = _default_route(table)
    table_name = (table or {}).get("RouteTableId", "no route table")
    if route is None:
        return None, f"route table {table_name} has no route for 0.0.0.0/0"
    gateway = route.get("GatewayId") or ""
    if gateway.startswith("igw-"):
        if not _attached_gateway(facts, gateway, vpc_id):
            return None, f"route table {table_name} sends 0.0.0.0/0 to {gateway}, not attached to {vpc_id}"
        if not public_ip:
            return None, (
                f"route table {table_name} sends 0.0.0.0/0 to internet gateway {gateway}, which only carries "
                "instances that have a public IP, and network='private' gives none"
            )
        return Path(f"internet gateway {gateway}", cidr=ANYWHERE), ""
    nat_id = route.get("NatGatewayId")
    if nat_id:
        nat = next((n for n in facts.nat_gateways if n["NatGatewayId"] == nat_id), None)
        if nat is None or nat.get("State") != "available":
            state = nat.get("State") if nat else "missing"
            return None, f"route table {table_name} sends 0.0.0.0/0 to NAT gateway {nat_id}, which is {state}"
        if nat.get("ConnectivityType", "public") != "public":
            return None, f"NAT gateway {nat_id} is private: it reaches other networks, not the internet"
        nat_subnet = nat.get("SubnetId")
        if nat_subnet not in facts.subnets:
            return Path(f"NAT gateway {nat_id}", cidr=ANYWHERE), ""  # its subnet was not described: trust it
        upstream, why = internet_route(facts, nat_subnet, public_ip=True)
        if upstream is None:
            return None, f"NAT gateway {nat_id} sits in {nat_subnet}, which has no way out: {why}"
        return Path(f"NAT gateway {nat_id}", cidr=ANYWHERE), ""
    target = next((v for k, v in route.items() if k.endswith("Id") and v), "an unknown target")
    return None, f"route table {table_name} sends 0.0.0.0/0 to {target}, which is not a way to the internet"


def endpoint_service(endpoint: Mapping[str, Any]) -> str:
    """The short service name of an endpoint: com.amazonaws.us-east-1.sqs -> sqs."""
    return endpoint.get("ServiceName", "").rsplit(".", 1)[-1]


def endpoint_path(facts: NetworkFacts, subnet_id: str, service: str) -> Path | None:
    """A VPC endpoint that carries ``service`` from this subnet, if there is one."""
    subnet = facts.subnets[subnet_id]
    table = route_table_of(facts, subnet_id)
    table_id = (table or {}).get("RouteTableId")
    vpc_cidr = _vpc_cidr(facts, subnet["VpcId"])
    for endpoint in facts.endpoints:
        if (
            endpoint.get("VpcId") != subnet["VpcId"]
            or endpoint.get("State", "available").lower() != "available"
        ):
            continue
        if endpoint_service(endpoint) != service:
            continue
        kind = endpoint.get("VpcEndpointType", "Gateway")
        if kind == "Gateway" and table_id in endpoint.get("RouteTableIds", []):
            prefix = next(
                (
                    r.get("DestinationPrefixListId")
                    for r in (table or {}).get("Routes", [])
                    if r.get("GatewayId") == endpoint["VpcEndpointId"]
                ),
                None,
            )
            return Path(f"gateway endpoint {endpoint['VpcEndpointId']}", prefix_list=prefix)
        if kind == "Interface" and endpoint.get("PrivateDnsEnabled"):
            groups = tuple(g["GroupId"] for g in endpoint.get("Groups", []))
            return Path(
                f"interface endpoint {endpoint['VpcEndpointId']}", cidr=vpc_cidr, endpoint_groups=groups
            )
    return None


def _vpc_cidr(facts: NetworkFacts, vpc_id: str) -> str | None:
    vpc = facts.vpcs.get(vpc_id)
    return vpc.get("CidrBlock") if vpc else None


def paths(
    facts: NetworkFacts, subnet_id: str, destinations: Iterable[str], public_ip: bool
) -> dict[str, Path | None]:
    """Each destination's path from this subnet (None: unreachable). An endpoint wins over 0.0.0.0/0."""
    out_path, _ = internet_route(facts, subnet_id, public_ip)
    found: dict[str, Path | None] = {}
    for destination in destinations:
        if destination == INTERNET:
            found[destination] = out_path
        else:
            found[destination] = endpoint_path(facts, subnet_id, destination) or out_path
    return found


def _rule_covers_https(rule: Mapping[str, Any]) -> bool:
    protocol = str(rule.get("IpProtocol", ""))
    if protocol == "-1":
        return True
    if protocol not in ("tcp", "6"):
        return False
    return int(rule.get("FromPort", 0)) <= HTTPS <= int(rule.get("ToPort", 65535))


def _cidr_covers(rule_cidr: str, cidr: str | None) -> bool:
    if cidr is None:
        return rule_cidr == ANYWHERE
    try:
        return ipaddress.ip_network(cidr).subnet_of(ipaddress.ip_network(rule_cidr))
    except (TypeError, ValueError):
        return False


def egress_allows(groups: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Does some egress rule of the instance's groups let TCP 443 out towards ``path``'s destination?"""
    for group in groups:
        for rule in group.get("IpPermissionsEgress", []):
            if not _rule_covers_https(rule):
                continue
            if any(_cidr_covers(r.get("CidrIp", ""), path.cidr) for r in rule.get("IpRanges", [])):
                return True
            if path.prefix_list and any(
                p.get("PrefixListId") == path.prefix_list for p in rule.get("PrefixListIds", [])
            ):
                return True
            if path.endpoint_groups and any(
                pair.get("GroupId") in path.endpoint_groups for pair in rule.get("UserIdGroupPairs", [])
            ):
                return True
    return False


def endpoint_admits(
    facts: NetworkFacts, path: Path, instance_groups: Sequence[str], subnet_cidr: str | None, vpc_id: str
) -> bool:
    """Do an interface endpoint's groups let the instance in on 443 (their rules, or the default group's)?"""
    groups = [facts.security_groups.get(g) for g in path.endpoint_groups]
    if not path.endpoint_groups:
        default = default_group(facts, vpc_id)
        groups = [default] if default else []
    if not groups or any(g is None for g in groups):
        return True  # not described: do not guess
    for group in groups:
        for rule in group.get("IpPermissions", []):
            if not _rule_covers_https(rule):
                continue
            if any(_cidr_covers(r.get("CidrIp", ""), subnet_cidr) for r in rule.get("IpRanges", [])):
                return True
            if any(pair.get("GroupId") in instance_groups for pair in rule.get("UserIdGroupPairs", [])):
                return True
    return False


def default_group(facts: NetworkFacts, vpc_id: str) -> Mapping[str, Any] | None:
    return next(
        (
            g
            for g in facts.security_groups.values()
            if g.get("VpcId") == vpc_id and g.get("GroupName") == "default"
        ),
        None,
    )


def fix_for(facts: NetworkFacts, subnet_id: str, missing: Sequence[str], mode: str) -> str:
    """What would give this subnet the missing destinations: the cheapest sufficient change first."""
    region = facts.region
    table = route_table_of(facts, subnet_id)
    table_id = (table or {}).get("RouteTableId", "its route table")
    fixes = []
    services = [m for m in missing if m != INTERNET]
    if INTERNET in missing:
        fixes.append(f"a NAT gateway in a public subnet and a route 0.0.0.0/0 to it in {table_id}")
    elif services:
        endpoints = [
            f"a gateway endpoint com.amazonaws.{region}.{s} on {table_id} (free)"
            if s in GATEWAY_ENDPOINT_SERVICES
            else f"an interface endpoint com.amazonaws.{region}.{s} with private DNS in this subnet's zone"
            for s in services
        ]
        fixes.append("VPC endpoints: " + "; ".join(endpoints))
        fixes.append(f"or a NAT gateway and a route 0.0.0.0/0 to it in {table_id}")
    if mode == PRIVATE:
        fixes.append(
            "or network='public' in a subnet whose route table sends 0.0.0.0/0 to an internet gateway"
        )
    else:
        fixes.append(
            "or a subnet whose route table sends 0.0.0.0/0 to an internet gateway (as a default VPC's do)"
        )
    return "; ".join(fixes)


def subnet_report(
    facts: NetworkFacts,
    subnet_id: str,
    *,
    mode: str,
    needs: Sequence[str],
    groups: Sequence[Mapping[str, Any]] | None,
    internet_why: str = "",
) -> SubnetReport:
    """Can an instance launched in ``subnet_id`` reach ``needs``? ``groups``: its security groups (None: the
    cluster's own group, which allows all egress)."""
    subnet = facts.subnets[subnet_id]
    zone = subnet.get("AvailabilityZone", "?")
    public_ip = mode == PUBLIC
    found = paths(facts, subnet_id, needs, public_ip)
    problems = []
    missing = [d for d in needs if found[d] is None]
    if missing:
        _, why = internet_route(facts, subnet_id, public_ip)
        what = ", ".join("a package index (the internet)" if m == INTERNET else m for m in missing)
        because = f"; {internet_why} need a package index" if INTERNET in missing and internet_why else ""
        no_endpoint = "no VPC endpoint reaches the internet" if INTERNET in missing else "no VPC endpoint"
        problems.append(
            f"an instance cannot reach {what} ({why}; {no_endpoint}){because}. "
            f"Fix: {fix_for(facts, subnet_id, missing, mode)}"
        )
    if groups is not None:
        group_ids = [g["GroupId"] for g in groups]
        blocked = [d for d, p in found.items() if p is not None and not egress_allows(groups, p)]
        if blocked:
            problems.append(
                f"security groups {', '.join(group_ids)} allow no HTTPS egress (TCP 443) towards "
                f"{', '.join(blocked)}. Fix: add an egress rule for TCP 443 to 0.0.0.0/0 (or to the VPC "
                "endpoints' addresses), or leave security_group_ids out to use the cluster's own group (no "
                "inbound rules, all egress)"
            )
    else:
        group_ids = []
    for destination, path in found.items():
        if path is None or not path.via.startswith("interface endpoint"):
            continue
        if not endpoint_admits(facts, path, group_ids, subnet.get("CidrBlock"), subnet["VpcId"]):
            groups_named = (
                ", ".join(path.endpoint_groups)
                or "the VPC's default group (its only inbound rule admits its own members)"
            )
            problems.append(
                f"{path.via} for {destination} does not admit the instances on TCP 443 "
                f"(its security groups: {groups_named}). Fix: give the endpoint a security group allowing "
                f"TCP 443 from {subnet.get('CidrBlock', 'the subnet')}"
            )
    return SubnetReport(subnet_id, zone, found, tuple(problems))


def architecture_problem(
    image: Mapping[str, Any] | None, instance_type: Mapping[str, Any] | None
) -> str | None:
    """An AMI built for one architecture cannot boot an instance type of another."""
    if not image or not instance_type:
        return None
    arch = image.get("Architecture")
    supported = instance_type.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    if not arch or not supported or arch in supported:
        return None
    return (
        f"image_id: AMI {image.get('ImageId')} is {arch} but instance_type "
        f"{instance_type.get('InstanceType')} runs {', '.join(supported)}; pick a {arch} instance type "
        f"({'e.g. c7g.large' if arch == 'arm64' else 'e.g. c7i.large'}) or a {supported[0]} image"
    )


def vpc_problems(facts: NetworkFacts, subnet_ids: Sequence[str], group_ids: Sequence[str]) -> list[str]:
    """Subnets of one VPC, and security groups of that VPC (groups belong to one VPC)."""
    vpcs = sorted({facts.subnets[s]["VpcId"] for s in subnet_ids})
    if len(vpcs) > 1:
        return [
            f"subnet_ids: the subnets are in several VPCs ({', '.join(vpcs)}); give subnets of one VPC (a "
            "cluster's security group belongs to one)"
        ]
    foreign = [
        g
        for g in group_ids
        if g in facts.security_groups and facts.security_groups[g].get("VpcId") not in vpcs
    ]
    if foreign:
        return [
            f"security_group_ids: {', '.join(foreign)} belong to another VPC than the subnets ({vpcs[0]})"
        ]
    return []


def launch_reports(
    facts: NetworkFacts,
    subnet_ids: Sequence[str],
    *,
    mode: str,
    services: Sequence[str],
    group_ids: Sequence[str],
    internet_why: str = "",
) -> tuple[list[str], list[SubnetReport]]:
    """Every problem of a launch's network (one VPC; each subnet reaches ``services``, and the internet
    when ``internet_why`` says the bootstrap installs from a package index), and each subnet's report.
    ``group_ids`` empty: the cluster's own group (all egress) is created for the launch."""
    problems = vpc_problems(facts, subnet_ids, group_ids)
    if problems:
        return problems, []
    needs = list(dict.fromkeys([*services, *([INTERNET] if internet_why else [])]))
    groups = (
        [facts.security_groups[g] for g in group_ids if g in facts.security_groups] if group_ids else None
    )
    reports = [
        subnet_report(facts, s, mode=mode, needs=needs, groups=groups, internet_why=internet_why)
        for s in subnet_ids
    ]
    return grouped_problems(facts, reports), reports


def grouped_problems(facts: NetworkFacts, reports: Sequence[SubnetReport]) -> list[str]:
    """Each problem once, naming every subnet that has it (a default VPC has six subnets alike)."""
    by_problem: dict[str, list[SubnetReport]] = {}
    for report in reports:
        for problem in report.problems:
            by_problem.setdefault(problem, []).append(report)
    found = []
    for problem, alike in by_problem.items():
        vpc = facts.subnets[alike[0].subnet_id]["VpcId"]
        names = ", ".join(f"{r.subnet_id} ({r.zone})" for r in alike)
        found.append(f"{'subnets' if len(alike) > 1 else 'subnet'} {names} of {vpc}: {problem}")
    return found
