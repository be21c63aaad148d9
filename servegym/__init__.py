"""ServeGym: Gymnasium environments, baselines and a router service for LLM-serving schedulers.

One import name for the whole project, so a user's own ``envs`` or ``agents`` package never shadows it.
The checkout keeps its readable layout (``perfmodel/``, ``envs/``, ``agents/``, ``serving/``,
``experiments/`` at the top level): from a checkout or an editable install those folders are this package's
subpackages through ``__path__`` below; a built wheel places them under ``servegym/`` itself.

Importing ``servegym`` registers the Gymnasium ids (``servegym/Route-v0`` ... and one per scenario) without
importing the simulator, so ``import servegym; gym.make("servegym/Route-v0")`` works from any directory.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "envs" / "__init__.py").is_file() and (_CHECKOUT / "pyproject.toml").is_file():
    __path__.append(str(_CHECKOUT))  # the checkout's top-level folders are the subpackages

from servegym.registration import register_envs  # noqa: E402  (needs __path__ above)

register_envs()
