"""The Gymnasium ids: one per decision kind, registered by ``import servegym``.

Entry points are strings, so registering costs no simulator import; ``gym.make("servegym:servegym/Route-v0")``
imports this package first, which is what subprocess vector environments need.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = {
    "servegym/Route-v0": "servegym.envs.route_env:RouteEnv",
    "servegym/Batch-v0": "servegym.envs.batch_env:BatchEnv",
    "servegym/Pools-v0": "servegym.envs.pools_env:PoolsEnv",
}


def register_envs() -> None:
    """Register every id once (idempotent: re-imports and spawned workers do not warn)."""
    for env_id, entry in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry)
