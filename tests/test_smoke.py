"""The server answers health checks and the owner key works on both backends."""

from __future__ import annotations

from agentpost.environments.v1 import environment_pb2
from grpc_health.v1 import health_pb2

from tests.harness import Harness, Org, auth


async def test_health_serving_without_credentials(harness: Harness) -> None:
    response = await harness.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_owner_key_reads_its_organization(harness: Harness, org: Org) -> None:
    got = await harness.whoami(org.owner_secret)
    assert got.id == org.id
    listed = await harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
    )
    assert [env.slug for env in listed.environments] == ["default"]
