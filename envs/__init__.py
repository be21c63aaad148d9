"""ServeGym environments: routing, batching and pool decisions over the cluster simulator (``envs.sim``).

Importing the package registers the ids idempotently; ``gym.make("envs:servegym/Route-v0")`` imports it
first, which is what subprocess vector environments need.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = {
    "servegym/Route-v0": "envs.route_env:RouteEnv",
    "servegym/Batch-v0": "envs.batch_env:BatchEnv",
    "servegym/Pools-v0": "envs.pools_env:PoolsEnv",
}

for _id, _entry in ENV_IDS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry)
