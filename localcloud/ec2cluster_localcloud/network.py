"""The local cloud's network model: what an instance reaches, decided from its VPC's state as AWS decides it.

Pure: the input is what EC2's Describe* calls answer (plain dicts in boto3's response shapes: the instance
from DescribeInstances, and a ``Network`` of DescribeVpcs, DescribeSubnets, DescribeRouteTables,
DescribeInternetGateways, DescribeNatGateways, DescribeVpcEndpoints and DescribeSecurityGroups), the output
a ``Reachability``: for each destination in ``DESTINATIONS`` (the AWS services an instance of this project
talks to, and "the internet", where a package index is) whether the instance reaches it over HTTPS, through
what, and why not. The instance runner and the server enforce it (``ec2cluster_localcloud.blackhole``).

The rules, as on AWS:
- The subnet's route table is its explicit association, else the VPC's main table.
- A destination goes, in this order: to an interface endpoint of its service in the VPC with private DNS
  enabled (the service's name resolves to the endpoint's addresses inside the VPC, from every subnet, public
  IP or not); to a gateway endpoint (S3, DynamoDB) whose prefix-list route is in the subnet's table (a
  prefix list is more specific than 0.0.0.0/0); else by the table's route for a public address. AWS's
  public service addresses and the internet are not modelled one by one: only a 0.0.0.0/0 route (a route or
  an egress rule to a narrower public CIDR is taken not to cover them).
- A route to an internet gateway (attached to the VPC) carries only the traffic of an instance with a public
  IPv4 address. A route to a NAT gateway works when the NAT gateway is available, public, and its own
  subnet routes 0.0.0.0/0 to an internet gateway. A route in state blackhole, or to anything else (peering,
  transit gateway, an instance or interface), reaches nothing here.
- Security groups are stateful and their rules only allow: the instance's groups (those of its primary
  network interface; none given at launch means the VPC's default group) must allow egress TCP 443 (a rule
  of protocol -1, or tcp with a port range covering 443) to the destination: 0.0.0.0/0 for a public
  address, the endpoint's prefix list (or 0.0.0.0/0) for a gateway endpoint, a CIDR covering one of the
  endpoint's subnets or one of the endpoint's groups for an interface endpoint. An interface endpoint's own
  groups (none given at its creation means the VPC's default group, whose one inbound rule admits only
  members of that same group: a real AWS gotcha) must allow inbound TCP 443 from the instance: a CIDR
  covering its private address or its subnet, or one of its groups.

Not modelled: network ACLs (the default ACL allows everything; custom ACLs are ignored), the VPC's DNS
attributes private DNS needs (enableDnsSupport and enableDnsHostnames; DescribeVpcs does not carry them),
endpoint policies, IPv6, and the availability zone of an interface endpoint's addresses (any of its subnets
serves the whole VPC, as on AWS across zones).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SERVICES = ("sqs", "dynamodb", "s3", "sts", "ec2", "logs")
INTERNET = "internet"
DESTINATIONS = (*SERVICES, INTERNET)
GATEWAY_ENDPOINT_SERVICES = frozenset({"s3", "dynamodb"})
HTTPS_PORT = 443
ANYWHERE = ipaddress.ip_network("0.0.0.0/0")
ENDPOINT_SERVICE_RE = re.compile(r"^com\.amazonaws\.(?P<region>[a-z0-9-]+)\.(?P<service>[a-z0-9-]+)$")
# A SigV4 credential scope's service name -> the destination its requests go to. A service the model does
# not know goes to its public endpoint: the internet.
SIGNING_NAME_DESTINATIONS = {service: service for service in SERVICES}

Answer = Mapping[str, Any]


def destination_of(signing_name: str) -> str:
    """The destination a request signed for ``signing_name`` (sqs, dynamodb, iam, ...) travels to."""
    return SIGNING_NAME_DESTINATIONS.get(signing_name, INTERNET)


@dataclass(frozen=True)
class Network:
    """One region's VPC state, as EC2's Describe* calls answer it (lists of boto3's response items)."""

    region: str
    vpcs: Sequence[Answer] = ()
    subnets: Sequence[Answer] = ()
    route_tables: Sequence[Answer] = ()
    internet_gateways: Sequence[Answer] = ()
    nat_gateways: Sequence[Answer] = ()
    vpc_endpoints: Sequence[Answer] = ()
    security_groups: Sequence[Answer] = ()

    def subnet(self, subnet_id: str | None) -> Answer | None:
        return next((s for s in self.subnets if s.get("SubnetId") == subnet_id), None)

    def group(self, group_id: str) -> Answer | None:
        return next((g for g in self.security_groups if g.get("GroupId") == group_id), None)

    def default_group_id(self, vpc_id: str) -> str | None:
        group = next(
            (g for g in self.security_groups if g.get("VpcId") == vpc_id and g.get("GroupName") == "default"),
            None,
        )
        return group["GroupId"] if group else None

    def route_table_of(self, subnet_id: str, vpc_id: str) -> Answer | None:
        """The subnet's explicitly associated route table, else its VPC's main table."""
        main = None
        for table in self.route_tables:
            for association in table.get("Associations") or ():
                if not _association_live(association):
                    continue
                if association.get("SubnetId") == subnet_id:
                    return table
                if association.get("Main") and table.get("VpcId") == vpc_id:
                    main = table
        return main

    def internet_gateway_attached(self, gateway_id: str, vpc_id: str) -> bool:
        for gateway in self.internet_gateways:
            if gateway.get("InternetGatewayId") == gateway_id:
                return any(
                    attachment.get("VpcId") == vpc_id and attachment.get("State") in ("available", "attached")
                    for attachment in gateway.get("Attachments") or ()
                )
        return False

    def nat_gateway(self, nat_id: str) -> Answer | None:
        return next((n for n in self.nat_gateways if n.get("NatGatewayId") == nat_id), None)

    def endpoint(self, endpoint_id: str) -> Answer | None:
        return next((e for e in self.vpc_endpoints if e.get("VpcEndpointId") == endpoint_id), None)

    def endpoint_service(self, endpoint: Answer) -> str | None:
        """The service an endpoint of this region is for (sqs, s3, ...), None for another region's."""
        match = ENDPOINT_SERVICE_RE.match(endpoint.get("ServiceName") or "")
        if match is None or match["region"] != self.region:
            return None
        return match["service"]


def _association_live(association: Answer) -> bool:
    state = (association.get("AssociationState") or {}).get("State", "associated")
    return state in ("associated", "associating")


def endpoint_type(endpoint: Answer) -> str:
    """Gateway or Interface (EC2's default, when CreateVpcEndpoint names none, is Gateway)."""
    return endpoint.get("VpcEndpointType") or "Gateway"


@dataclass(frozen=True)
class Verdict:
    """Whether one destination is reached: ``path`` says through what, ``reason`` (when not) why not."""

    destination: str
    reachable: bool
    path: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Reachability:
    """One instance's verdicts, one per destination of ``DESTINATIONS``."""

    instance_id: str
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)

    def reaches(self, destination: str) -> bool:
        verdict = self.verdicts.get(destination)
        return verdict is not None and verdict.reachable

    @property
    def reachable(self) -> tuple[str, ...]:
        return tuple(d for d, v in self.verdicts.items() if v.reachable)

    @property
    def unreachable(self) -> dict[str, str]:
        """Destination -> why the instance does not reach it."""
        return {d: v.reason for d, v in self.verdicts.items() if not v.reachable}

    def to_dict(self) -> dict[str, Any]:
        return {
            "reachable": {d: v.path for d, v in self.verdicts.items() if v.reachable},
            "unreachable": self.unreachable,
        }

    @classmethod
    def from_dict(cls, instance_id: str, data: Mapping[str, Any]) -> Reachability:
        verdicts = {d: Verdict(d, True, path) for d, path in (data.get("reachable") or {}).items()}
        verdicts.update(
            {d: Verdict(d, False, "", reason) for d, reason in (data.get("unreachable") or {}).items()}
        )
        return cls(instance_id, verdicts)

    def summary(self) -> str:
        """One line: what the instance reaches and through what, and what it does not, with the reasons."""

        def grouped(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
            by_text: dict[str, list[str]] = {}
            for destination, text in pairs:
                by_text.setdefault(text, []).append(destination)
            return by_text

        paths = grouped((d, v.path) for d, v in self.verdicts.items() if v.reachable)
        line = "reaches " + (
            "; ".join(f"{', '.join(ds)} through {path}" for path, ds in paths.items()) or "nothing"
        )
        for reason, destinations in grouped(self.unreachable.items()).items():
            line += f"; not {', '.join(destinations)}: {reason}"
        return line


# Security groups


def _covers_https(rule: Answer) -> bool:
    protocol = str(rule.get("IpProtocol", ""))
    if protocol == "-1":
        return True
    if protocol not in ("tcp", "6"):
        return False
    low, high = rule.get("FromPort"), rule.get("ToPort")
    if low is None or high is None:
        return False
    if int(low) == -1 and int(high) == -1:
        return True
    return int(low) <= HTTPS_PORT <= int(high)


def _networks(rule: Answer) -> Iterable[ipaddress.IPv4Network]:
    for address_range in rule.get("IpRanges") or ():
        try:
            yield ipaddress.ip_network(address_range.get("CidrIp", ""), strict=False)
        except ValueError:
            continue


def _https_rules(network: Network, group_ids: Iterable[str], direction: str) -> Iterable[Answer]:
    """The rules (``IpPermissionsEgress`` or ``IpPermissions``) of these groups that allow TCP 443."""
    for group_id in group_ids:
        group = network.group(group_id)
        for rule in (group or {}).get(direction) or ():
            if _covers_https(rule):
                yield rule


@dataclass(frozen=True)
class Target:
    """What egress must allow for one path: public addresses, a prefix list, or an endpoint's subnets."""

    public: bool = False  # a 0.0.0.0/0 rule covers it
    prefix_list_id: str | None = None
    cidrs: tuple[ipaddress.IPv4Network, ...] = ()  # an interface endpoint's subnets
    group_ids: tuple[str, ...] = ()  # an interface endpoint's groups


def egress_allows(network: Network, group_ids: Sequence[str], target: Target) -> bool:
    for rule in _https_rules(network, group_ids, "IpPermissionsEgress"):
        for cidr in _networks(rule):
            if target.public and cidr.prefixlen == 0:
                return True
            if any(endpoint_cidr.subnet_of(cidr) for endpoint_cidr in target.cidrs if cidr.version == 4):
                return True
        if target.prefix_list_id and any(
            p.get("PrefixListId") == target.prefix_list_id for p in rule.get("PrefixListIds") or ()
        ):
            return True
        if target.group_ids and any(
            pair.get("GroupId") in target.group_ids for pair in rule.get("UserIdGroupPairs") or ()
        ):
            return True
    return False


def ingress_allows(
    network: Network,
    group_ids: Sequence[str],
    source_groups: Sequence[str],
    source_address: ipaddress.IPv4Address | None,
    source_subnet: ipaddress.IPv4Network | None,
) -> bool:
    for rule in _https_rules(network, group_ids, "IpPermissions"):
        for cidr in _networks(rule):
            if source_address is not None and source_address in cidr:
                return True
            if source_subnet is not None and source_subnet.subnet_of(cidr):
                return True
        if any(pair.get("GroupId") in source_groups for pair in rule.get("UserIdGroupPairs") or ()):
            return True
    return False


# The model


@dataclass(frozen=True)
class _Instance:
    instance_id: str
    subnet_id: str | None
    vpc_id: str | None
    public_ip: str | None
    private_ip: ipaddress.IPv4Address | None
    subnet_cidr: ipaddress.IPv4Network | None
    group_ids: tuple[str, ...]
    group_note: str


def _instance(instance: Answer, network: Network) -> _Instance:
    subnet_id = instance.get("SubnetId")
    vpc_id = instance.get("VpcId")
    subnet = network.subnet(subnet_id)
    if vpc_id is None and subnet is not None:
        vpc_id = subnet.get("VpcId")
    groups: list[str] = [g["GroupId"] for g in instance.get("SecurityGroups") or () if g.get("GroupId")]
    for interface in instance.get("NetworkInterfaces") or ():
        if (interface.get("Attachment") or {}).get("DeviceIndex", 0) == 0:
            groups += [g["GroupId"] for g in interface.get("Groups") or () if g.get("GroupId")]
    group_ids = tuple(dict.fromkeys(groups))
    note = ", ".join(group_ids)
    if not group_ids and vpc_id is not None:
        default = network.default_group_id(vpc_id)
        group_ids = (default,) if default else ()
        note = f"{default} (the VPC's default group: none given at launch)"
    try:
        private_ip = ipaddress.IPv4Address(instance.get("PrivateIpAddress") or "")
    except ValueError:
        private_ip = None
    try:
        subnet_cidr = ipaddress.IPv4Network((subnet or {}).get("CidrBlock") or "", strict=False)
    except ValueError:
        subnet_cidr = None
    return _Instance(
        instance_id=instance.get("InstanceId", ""),
        subnet_id=subnet_id,
        vpc_id=vpc_id,
        public_ip=instance.get("PublicIpAddress") or None,
        private_ip=private_ip,
        subnet_cidr=subnet_cidr,
        group_ids=group_ids,
        group_note=note,
    )


def _public_route(table: Answer) -> Answer | None:
    """The route a public IPv4 address takes: only a 0.0.0.0/0 route covers it (see the module docstring)."""
    for route in table.get("Routes") or ():
        cidr = route.get("DestinationCidrBlock")
        if cidr and ipaddress.ip_network(cidr, strict=False) == ANYWHERE:
            return route
    return None


def _route_target(route: Answer) -> str:
    for key in (
        "GatewayId",
        "NatGatewayId",
        "TransitGatewayId",
        "VpcPeeringConnectionId",
        "NetworkInterfaceId",
        "InstanceId",
        "EgressOnlyInternetGatewayId",
        "CarrierGatewayId",
        "LocalGatewayId",
    ):
        if route.get(key):
            return str(route[key])
    return "nothing"


def _public_path(network: Network, instance: _Instance, table: Answer) -> tuple[str | None, str]:
    """(how a public address is reached, None when it is not; why not)."""
    table_id = table.get("RouteTableId")
    route = _public_route(table)
    if route is None:
        return None, (
            f"route table {table_id} of subnet {instance.subnet_id} has no route to 0.0.0.0/0 "
            "(no internet gateway or NAT gateway route)"
        )
    target = _route_target(route)
    if route.get("State") == "blackhole":
        return None, f"route table {table_id}: the route to 0.0.0.0/0 ({target}) is a blackhole"
    if target.startswith("igw-"):
        if not network.internet_gateway_attached(target, instance.vpc_id or ""):
            return None, f"route table {table_id}: internet gateway {target} is not attached to the VPC"
        if instance.public_ip is None:
            return None, (
                f"no public IP: the route to 0.0.0.0/0 goes to internet gateway {target}, which carries "
                "only the traffic of instances with a public IPv4 address (launch with "
                "AssociatePublicIpAddress=true, or route through a NAT gateway, or use VPC endpoints)"
            )
        return f"internet gateway {target}", ""
    if target.startswith("nat-"):
        return _nat_path(network, instance, target)
    return (
        None,
        f"route table {table_id}: the route to 0.0.0.0/0 goes to {target}, which reaches nothing here",
    )


def _nat_path(network: Network, instance: _Instance, nat_id: str) -> tuple[str | None, str]:
    nat = network.nat_gateway(nat_id)
    if nat is None:
        return None, f"NAT gateway {nat_id} does not exist"
    if nat.get("State") != "available":
        return None, f"NAT gateway {nat_id} is {nat.get('State')}, not available"
    if nat.get("ConnectivityType") == "private":
        return None, f"NAT gateway {nat_id} is private: it does not reach the internet"
    if not any(address.get("PublicIp") for address in nat.get("NatGatewayAddresses") or ()):
        return None, f"NAT gateway {nat_id} has no public (Elastic) IP address"
    nat_subnet = nat.get("SubnetId")
    nat_table = network.route_table_of(nat_subnet, nat.get("VpcId") or instance.vpc_id or "")
    route = _public_route(nat_table) if nat_table else None
    target = _route_target(route) if route else "nothing"
    if (
        route is None
        or route.get("State") == "blackhole"
        or not target.startswith("igw-")
        or not network.internet_gateway_attached(target, nat.get("VpcId") or instance.vpc_id or "")
    ):
        return None, (
            f"NAT gateway {nat_id} is in subnet {nat_subnet}, whose route table does not route 0.0.0.0/0 "
            "to an internet gateway attached to the VPC (a NAT gateway belongs in a public subnet)"
        )
    return f"NAT gateway {nat_id}", ""


def _interface_endpoint(network: Network, instance: _Instance, service: str) -> Answer | None:
    for endpoint in network.vpc_endpoints:
        if (
            endpoint.get("VpcId") == instance.vpc_id
            and endpoint_type(endpoint) == "Interface"
            and endpoint.get("State", "available").lower() == "available"
            and endpoint.get("PrivateDnsEnabled")
            and network.endpoint_service(endpoint) == service
        ):
            return endpoint
    return None


def _gateway_endpoint_route(
    network: Network, instance: _Instance, table: Answer, service: str
) -> tuple[Answer, str | None] | None:
    """(the gateway endpoint for ``service`` routed from ``table``, its prefix list id), or None."""
    for endpoint in network.vpc_endpoints:
        if (
            endpoint.get("VpcId") != instance.vpc_id
            or endpoint_type(endpoint) != "Gateway"
            or endpoint.get("State", "available").lower() != "available"
            or network.endpoint_service(endpoint) != service
        ):
            continue
        endpoint_id = endpoint.get("VpcEndpointId")
        for route in table.get("Routes") or ():
            if route.get("GatewayId") == endpoint_id and route.get("State") != "blackhole":
                return endpoint, route.get("DestinationPrefixListId")
        if table.get("RouteTableId") in (endpoint.get("RouteTableIds") or ()):
            return endpoint, None
    return None


def _via_interface_endpoint(network: Network, instance: _Instance, endpoint: Answer) -> Verdict:
    service = network.endpoint_service(endpoint) or "?"
    endpoint_id = endpoint.get("VpcEndpointId")
    path = f"interface endpoint {endpoint_id} (private DNS)"
    subnet_ids = list(endpoint.get("SubnetIds") or ())
    if not subnet_ids:
        return Verdict(service, False, path, f"interface endpoint {endpoint_id} has no subnets")
    cidrs = []
    for subnet_id in subnet_ids:
        subnet = network.subnet(subnet_id)
        if subnet and subnet.get("CidrBlock"):
            cidrs.append(ipaddress.IPv4Network(subnet["CidrBlock"], strict=False))
    endpoint_groups = tuple(g["GroupId"] for g in endpoint.get("Groups") or () if g.get("GroupId"))
    groups_note = ", ".join(endpoint_groups)
    if not endpoint_groups:
        default = network.default_group_id(instance.vpc_id or "")
        endpoint_groups = (default,) if default else ()
        groups_note = f"{default} (the VPC's default group: none given at its creation)"
    target = Target(cidrs=tuple(cidrs), group_ids=endpoint_groups)
    if not egress_allows(network, instance.group_ids, target):
        return Verdict(
            service,
            False,
            path,
            f"the instance's security groups ({instance.group_note}) allow no egress TCP 443 to interface "
            f"endpoint {endpoint_id} (its subnets {', '.join(subnet_ids)})",
        )
    if not ingress_allows(
        network, endpoint_groups, instance.group_ids, instance.private_ip, instance.subnet_cidr
    ):
        return Verdict(
            service,
            False,
            path,
            f"interface endpoint {endpoint_id}'s security groups ({groups_note}) allow no inbound TCP 443 "
            f"from the instance (its groups {instance.group_note})",
        )
    return Verdict(service, True, path)


def _verdict(network: Network, instance: _Instance, table: Answer, destination: str) -> Verdict:
    if destination != INTERNET:
        endpoint = _interface_endpoint(network, instance, destination)
        if endpoint is not None:
            return _via_interface_endpoint(network, instance, endpoint)
        if destination in GATEWAY_ENDPOINT_SERVICES:
            found = _gateway_endpoint_route(network, instance, table, destination)
            if found is not None:
                endpoint, prefix_list_id = found
                path = f"gateway endpoint {endpoint.get('VpcEndpointId')}"
                target = Target(public=True, prefix_list_id=prefix_list_id)
                if egress_allows(network, instance.group_ids, target):
                    return Verdict(destination, True, path)
                return Verdict(
                    destination,
                    False,
                    path,
                    f"the instance's security groups ({instance.group_note}) allow no egress TCP 443 to "
                    f"{path}'s prefix list {prefix_list_id} or to 0.0.0.0/0",
                )
    path, reason = _public_path(network, instance, table)
    if path is None:
        return Verdict(destination, False, "", reason)
    if not egress_allows(network, instance.group_ids, Target(public=True)):
        return Verdict(
            destination,
            False,
            path,
            f"the instance's security groups ({instance.group_note}) allow no egress TCP 443 to 0.0.0.0/0",
        )
    return Verdict(destination, True, path)


def reachability(instance: Answer, network: Network) -> Reachability:
    """What ``instance`` (DescribeInstances' item) reaches in ``network``: one verdict per destination."""
    facts = _instance(instance, network)

    def everything(reason: str) -> Reachability:
        return Reachability(facts.instance_id, {d: Verdict(d, False, "", reason) for d in DESTINATIONS})

    if facts.subnet_id is None or facts.vpc_id is None:
        return everything("the instance is in no subnet")
    table = network.route_table_of(facts.subnet_id, facts.vpc_id)
    if table is None:
        return everything(f"subnet {facts.subnet_id} has no route table (and its VPC no main table)")
    return Reachability(facts.instance_id, {d: _verdict(network, facts, table, d) for d in DESTINATIONS})
