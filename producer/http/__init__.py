"""`memfleet serve`: the network front door, an ASGI producer.

`app.create_app` builds it from small parts: `apikeys` (who may act for whom), `auth` (the
request's key, its user and its rate), `mem0_routes` (the subset of the mem0 platform API that
`mem0.MemoryClient` calls), `api_routes` (memfleet's own JSON API), `mcp_tools` (MCP, bound to a
user key), `metrics` (Prometheus) and `errors` (limits, and errors that name the problem).
"""
