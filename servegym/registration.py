"""The Gymnasium ids, registered by ``import servegym``: one per decision kind (``servegym/Route-v0`` ...) and
one per decision kind of each scenario file (``servegym/Route-hetero-conv-v0`` ..., ``conf/scenario/``).

Entry points are strings, so registering costs no simulator import: a scenario id's entry point is
``servegym.envs.scenarios:make``, which reads its file when the environment is made; registering reads only
the files' decision kinds and versions. ``gym.make("servegym:servegym/Route-v0")`` imports this package
first, which is what subprocess vector environments need.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = {
    "servegym/Route-v0": "servegym.envs.route_env:RouteEnv",
    "servegym/Batch-v0": "servegym.envs.batch_env:BatchEnv",
    "servegym/Pools-v0": "servegym.envs.pools_env:PoolsEnv",
}
SCENARIO_IDS: dict[str, tuple[str, str]] = {}  # id -> (scenario, kind), filled by register_envs


def register_envs() -> None:
    """Register every id once (idempotent: re-imports and spawned workers do not warn)."""
    from servegym.envs import scenarios  # YAML only, no simulator

    for env_id, entry in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry)
    for name in scenarios.names():
        for kind, env_id in scenarios.env_ids_of(name).items():
            SCENARIO_IDS[env_id] = (name, kind)
            if env_id not in registry:
                register(id=env_id, entry_point="servegym.envs.scenarios:make", kwargs={"scenario": name, "kind": kind})
