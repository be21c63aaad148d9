"""ServeGym environments: routing, batching and pool decisions over the cluster simulator (``servegym.envs.sim``).

The Gymnasium ids are registered by ``import servegym`` (``servegym.registration``), which importing this
subpackage has already done.
"""

from servegym.registration import ENV_IDS

__all__ = ["ENV_IDS"]
