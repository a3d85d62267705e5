from conftest import T1, sim_config


async def test_a_request_through_the_proxy_reaches_the_simulator_with_a_token(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator))
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers?pageSize=3") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert len(body["data"]) == 3
    assert simulator.token_requests_by_client[T1.client_id] == 1
