"""One import name: ServeGym works from a user project that has its own ``envs`` and ``agents`` packages."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import envs, agents, gymnasium as gym, servegym
assert envs.MINE and agents.MINE, "the user's own packages"
env = gym.make("servegym/Route-v0")
obs, info = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(int(info["action_mask"].argmax()))
import servegym.envs.route_env as route_env
print(route_env.__name__, env.observation_space.contains(obs))
"""


def test_ids_work_beside_a_users_own_envs_package(tmp_path: Path) -> None:
    for name in ("envs", "agents"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=None
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["servegym.envs.route_env", "True"]


def test_no_module_imports_the_bare_folder_names() -> None:
    """Every import goes through ``servegym.``: a bare ``import envs`` would load a second copy of the module."""
    root = Path(__file__).resolve().parents[1]
    bare = []
    for folder in ("perfmodel", "envs", "agents", "serving", "experiments", "servegym", "tests"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if len(words) >= 2 and words[0] in ("import", "from"):
                    top = words[1].split(".")[0]
                    if top in ("perfmodel", "envs", "agents", "serving", "experiments"):
                        bare.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not bare, "\n".join(bare)
